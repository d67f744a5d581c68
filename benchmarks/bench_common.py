"""Shared plumbing of the benchmarks.

* The child-process protocol: the parent (``python -m benchmarks``) starts
  ``python -m benchmarks.bench_<name> --task T --params JSON --result FILE``; the child prints
  ``@@hwbench-progress {...}`` lines that drive the parent's progress bars and writes its result
  as JSON to ``FILE``.
* CPU accounting that counts background threads and helper processes (W&B hands its work to a
  separate ``wandb-core`` process): ``getrusage`` of the process and its reaped children, plus
  samples of live descendants (psutil when installed, ``/proc`` otherwise).
* Robust statistics, machine facts, formatting, and the report model (:class:`Section`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROGRESS_PREFIX = "@@hwbench-progress "
REPO_ROOT = Path(__file__).resolve().parent.parent

TaskFn = Callable[[dict[str, Any]], dict[str, Any]]


# --------------------------------------------------------------------------------------------
# child protocol


def emit_progress(done: float, total: float, desc: str = "") -> None:
    """Tell the parent how far this task is (``done`` of ``total`` units, with a short label)."""
    sys.stdout.write(PROGRESS_PREFIX + json.dumps({"done": done, "total": total, "desc": desc}) + "\n")
    sys.stdout.flush()


def child_main(tasks: Mapping[str, TaskFn], argv: Sequence[str] | None = None) -> int:
    """Entry point of a benchmark module run as a child: run one task, write its JSON result."""
    ap = argparse.ArgumentParser(description="run one benchmark task (used by `python -m benchmarks`)")
    ap.add_argument("--task", required=True, choices=sorted(tasks))
    ap.add_argument("--params", default="{}", help="JSON object of task parameters")
    ap.add_argument("--result", required=True, help="where to write the JSON result")
    args = ap.parse_args(argv)
    params = json.loads(args.params)
    result = tasks[args.task](params)
    tmp = Path(args.result + ".partial")
    tmp.write_text(json.dumps(result, default=_json_default, allow_nan=True))
    os.replace(tmp, args.result)
    return 0


def _json_default(obj: object) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --------------------------------------------------------------------------------------------
# CPU accounting


def _rusage_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _proc_children(pid: int) -> list[int]:
    out: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return out
    for tid in tids:
        try:
            out.extend(int(c) for c in (task_dir / tid / "children").read_text().split())
        except OSError:
            continue
    return out


def _proc_cpu_s(pid: int) -> float | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    # utime, stime are fields 14 and 15 of stat (index 11, 12 after the command name)
    return (int(fields[11]) + int(fields[12])) / ticks


def descendant_cpu_seconds(root_pid: int | None = None, include_root: bool = False) -> dict[int, float]:
    """CPU seconds (user + system) of every live descendant process of ``root_pid`` (default: self),
    and of ``root_pid`` itself with ``include_root``."""
    root_pid = os.getpid() if root_pid is None else root_pid
    out: dict[int, float] = {}
    try:
        import psutil  # type: ignore[import-untyped]

        try:
            root = psutil.Process(root_pid)
            for child in [root, *root.children(recursive=True)] if include_root else root.children(recursive=True):
                try:
                    t = child.cpu_times()
                    out[child.pid] = t.user + t.system
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
        except psutil.NoSuchProcess:
            pass
        return out
    except ImportError:
        pass
    if include_root and (cpu := _proc_cpu_s(root_pid)) is not None:
        out[root_pid] = cpu
    stack = _proc_children(root_pid)
    while stack:
        pid = stack.pop()
        cpu = _proc_cpu_s(pid)
        if cpu is not None:
            out[pid] = cpu
        stack.extend(_proc_children(pid))
    return out


class CPUMeter:
    """Total CPU seconds of this process, its threads and its helper processes over a span.

    ``getrusage(RUSAGE_SELF)`` counts every thread; ``RUSAGE_CHILDREN`` counts children once they
    are reaped; a sampling thread records live descendants (e.g. ``wandb-core``) so that a helper
    that outlives the span, or is never waited for, is still counted (its last sample).
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self._samples: dict[int, float] = {}
        self._base: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._self0 = self._children0 = 0.0
        self._wall0 = 0.0

    def start(self) -> CPUMeter:
        """Start counting (descendants that already exist count from now)."""
        self._self0 = _rusage_s(resource.RUSAGE_SELF)
        self._children0 = _rusage_s(resource.RUSAGE_CHILDREN)
        self._base = descendant_cpu_seconds()
        self._wall0 = time.perf_counter()
        self._thread = threading.Thread(target=self._poll, name="hwbench-cpu-meter", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        for pid, cpu in descendant_cpu_seconds().items():
            self._samples[pid] = max(self._samples.get(pid, 0.0), cpu - self._base.get(pid, 0.0))

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def stop(self) -> dict[str, float]:
        """Stop and return ``self_s``, ``children_s``, ``total_s`` (CPU seconds) and ``wall_s``."""
        self._sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self_s = _rusage_s(resource.RUSAGE_SELF) - self._self0
        reaped = _rusage_s(resource.RUSAGE_CHILDREN) - self._children0
        sampled = sum(self._samples.values())
        children = max(reaped, sampled)
        return {"self_s": self_s, "children_s": children, "total_s": self_s + children,
                "wall_s": time.perf_counter() - self._wall0}


def thread_cpu_seconds(thread: threading.Thread) -> float | None:
    """CPU seconds consumed so far by one live thread (Linux ``pthread_getcpuclockid``), or None."""
    if thread.ident is None or not thread.is_alive() or not hasattr(time, "pthread_getcpuclockid"):
        return None
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100, linear interpolation); NaN for an empty sequence."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    """Median (NaN when empty)."""
    return percentile(values, 50.0)


def trimmed_mean(values: Sequence[float], cut: float = 0.1) -> float:
    """Mean after dropping the lowest and highest ``cut`` fraction (robust to preemption spikes)."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = int(len(xs) * cut)
    xs = xs[k : len(xs) - k] or xs
    return sum(xs) / len(xs)


def bootstrap_ci(values: Sequence[float], stat: Callable[[Sequence[float]], float] = median,
                 n: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of ``stat`` over ``values``."""
    import random

    if len(values) < 2:
        v = stat(values)
        return v, v
    rng = random.Random(seed)
    vals = list(values)
    stats = sorted(stat([vals[rng.randrange(len(vals))] for _ in vals]) for _ in range(n))
    return stats[int(n * alpha / 2)], stats[min(n - 1, int(n * (1 - alpha / 2)))]


def dir_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of all regular files under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                continue
    return total


# --------------------------------------------------------------------------------------------
# machine facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return math.nan


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(dist)
        except PackageNotFoundError:
            return None
    except ImportError:  # pragma: no cover
        return None


def _git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + (" (uncommitted changes)" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_average() -> tuple[float, float, float] | None:
    """1/5/15-minute load averages, or None where unsupported."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, logical cores (and those this process may use), RAM, OS, Python, git commit."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "usable_cores": usable,
        "ram_gib": _mem_total_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "commit": _git_commit(),
    }


VERSIONED = ("healthwatch", "torch", "duckdb", "pyarrow", "polars", "numpy",
             "tensorboard", "wandb", "mlflow", "psutil")


def versions(names: Iterable[str] = VERSIONED) -> dict[str, str | None]:
    """Installed versions of the packages the benchmarks use (None when absent)."""
    return {n: _version(n) for n in names}


# --------------------------------------------------------------------------------------------
# formatting


def fmt_time(seconds: float | None) -> str:
    """Human duration: ``850 ns``, ``12.3 µs``, ``4.56 ms``, ``1.23 s``."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    s = abs(seconds)
    if s < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if s < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if s < 1:
        return f"{seconds * 1e3:.2f} ms" if s < 0.1 else f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(n: float | None) -> str:
    """Human byte count (binary units)."""
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def fmt_rate(per_s: float | None, unit: str = "rows/s") -> str:
    """``2.31 M rows/s`` style rates."""
    if per_s is None or math.isnan(per_s):
        return "—"
    for scale, p in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_s >= scale:
            return f"{per_s / scale:.2f} {p} {unit}"
    return f"{per_s:.0f} {unit}"


def fmt_ratio(x: float | None) -> str:
    """``123×`` (``—`` when unknown)."""
    if x is None or math.isnan(x) or math.isinf(x):
        return "—"
    return f"{x:.0f}×" if x >= 10 else f"{x:.1f}×"


def fmt_count(n: float | None) -> str:
    """Integers with thousands separators (``1,234,567``)."""
    return "—" if n is None else f"{int(n):,}"


# --------------------------------------------------------------------------------------------
# report model

PASS, MISS, NA = "pass", "miss", "n/a"


@dataclass
class Budget:
    """One line of the budget summary: what is measured, the budget, the measurement, the verdict."""

    what: str
    budget: str
    measured: str
    verdict: str  # PASS, MISS or NA
    note: str = ""


@dataclass
class Table:
    """A result table of one benchmark."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Section:
    """Everything one benchmark contributes to the report."""

    key: str
    title: str
    intro: str = ""
    budgets: list[Budget] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class Job:
    """One child-process task: ``python -m benchmarks.<module> --task <task> --params <json>``."""

    key: str
    module: str
    task: str
    params: dict[str, Any]
    desc: str
    timeout_s: float = 1800.0


def verdict(ok: bool | None) -> str:
    """PASS/MISS from a boolean (NA for None)."""
    return NA if ok is None else (PASS if ok else MISS)
