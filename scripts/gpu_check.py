"""One-command check of healthwatch on a machine with one CUDA GPU (called by ``scripts/gpu_check.sh``).

Sections, each run in its own subprocess with its own timeout, each recorded as pass / fail / skip
with a reason, so that one failing or hanging section never loses the others:

* ``env``: torch, CUDA, GPU, and the versions of the optional packages.
* ``nosync_reference``: the reference (demo) model trains on CUDA with every signal on and every
  step logged; the Monitor's own code (its forward hooks, found generically as the hooks whose code
  lives in ``healthwatch.hooks``, and ``after_backward``/``step``/``log`` and any newer entry
  point) runs under ``torch.cuda.set_sync_debug_mode("error")`` on all non-flush steps. Each
  synchronizing call is a failure, reported with the line that made it.
* ``nosync_nemotron_h``: the same with a Hugging Face Nemotron-H tiny config (transformers).
* ``overhead``: paired, interleaved A/B step times of two copies of a GPU-sized reference model
  (one watched by a Monitor, all signals on), batch grown until a step takes ≥ 50 ms.
* ``peers``: logging 275 values per step computed on the GPU: healthwatch (CUDA tensors as they
  are) against TensorBoard ``add_scalar`` and W&B offline, which each pay an ``.item()`` per value.
* ``mamba_install`` / ``mamba_path``: tries to install ``mamba-ssm`` (continues if it cannot), and
  when its kernel imports, cross-checks it against the pure-torch SSD scan and repeats the no-sync
  check on the demo model running on the kernel.

Writes ``gpu-check.json`` (all results) and ``gpu-check.md`` (a short summary) into the output
directory (``--out``, default ``$OUT`` or ``./gpu-check-out``). Without CUDA it stops at once with
exit status 2, a clear message, and a JSON that says why. Exit status 1 when any section failed.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULT_FILE = "gpu-check.json"
SUMMARY_FILE = "gpu-check.md"
RESULT_SCHEMA = 1
STATUSES = ("pass", "fail", "skip")
#: Sections in the order they run, with their own time limits (seconds).
SECTIONS: dict[str, float] = {
    "env": 60,
    "nosync_reference": 120,
    "nosync_nemotron_h": 150,
    "overhead": 150,
    "peers": 150,
    "mamba_install": 150,
    "mamba_path": 120,
}
#: Whole-run budget: the issue asks for the check to finish within 8 minutes, installs included.
DEFAULT_BUDGET_S = 450.0
PROBE_TIMEOUT_S = 60.0
EXIT_OK, EXIT_SECTION_FAILED, EXIT_NO_CUDA = 0, 1, 2
#: Design budget for the hook overhead (DESIGN.md §9).
OVERHEAD_BUDGET_PCT = 1.0
MIN_STEP_S = 0.050


# ------------------------------------------------------------------------------------------------
# arguments and results (pure logic, tested on CPU in tests/scripts/test_gpu_check.py)


def default_out_dir() -> Path:
    """``$OUT`` when set (the device runner's output folder), else ``./gpu-check-out``."""
    return Path(os.environ.get("OUT") or "./gpu-check-out")


def _sections_arg(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {unknown or [text]}; choose from {', '.join(SECTIONS)}")
    return [s for s in SECTIONS if s in names]  # run order is fixed


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (``--help`` lists them); invalid values exit with status 2 and a message."""
    p = argparse.ArgumentParser(
        prog="gpu_check.py",
        description="Run healthwatch's GPU checks (no-sync hooks, overhead, peer logging, mamba-ssm) "
                    "and write gpu-check.json + gpu-check.md.")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: $OUT if set, else ./gpu-check-out)")
    p.add_argument("--sections", type=_sections_arg, default=list(SECTIONS),
                   help=f"comma-separated subset of: {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--budget-s", type=_positive, default=DEFAULT_BUDGET_S,
                   help=f"time budget for all sections together, seconds (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--probe-only", action="store_true",
                   help="only check that CUDA works: exit 0 if so; otherwise write the result files and exit 2")
    p.add_argument("--install-status", type=Path, default=None,
                   help="file of 'name=ok|failed' lines written by gpu_check.sh (recorded in the JSON)")
    # Internal: run one section in this (child) process.
    p.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = default_out_dir()
    if args.section and (args.result is None or args.workdir is None):
        p.error("--section needs --result and --workdir")
    return args


def section_result(status: str, reason: str = "", details: dict[str, Any] | None = None,
                   elapsed_s: float | None = None, timeout_s: float | None = None) -> dict[str, Any]:
    """One section's record; ``status`` is pass, fail or skip, ``reason`` says why (empty on a plain pass)."""
    if status not in STATUSES:
        raise ValueError(f"section status must be one of {STATUSES}, got {status!r}")
    return {"status": status, "reason": reason, "elapsed_s": elapsed_s, "timeout_s": timeout_s,
            "details": details or {}}


def overall_status(sections: dict[str, dict[str, Any]], cuda_available: bool) -> tuple[str, str]:
    """(``pass``/``fail``, reason): fail without CUDA or when any section failed; skips do not fail."""
    if not cuda_available:
        return "fail", "CUDA is not available"
    failed = [name for name, s in sections.items() if s.get("status") == "fail"]
    if failed:
        return "fail", f"section(s) failed: {', '.join(failed)}"
    if not any(s.get("status") == "pass" for s in sections.values()):
        return "fail", "no section passed"
    return "pass", ""


def validate_result(result: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first thing wrong with a result document."""
    for key in ("schema", "status", "reason", "cuda", "sections", "started_at", "finished_at"):
        if key not in result:
            raise ValueError(f"result: missing key {key!r}")
    if result["schema"] != RESULT_SCHEMA:
        raise ValueError(f"result: schema {result['schema']!r}, expected {RESULT_SCHEMA}")
    if result["status"] not in ("pass", "fail"):
        raise ValueError(f"result: status {result['status']!r} is not pass/fail")
    if not isinstance(result["cuda"], dict) or "available" not in result["cuda"]:
        raise ValueError("result: cuda must be an object with 'available'")
    for name, sec in result["sections"].items():
        if name not in SECTIONS:
            raise ValueError(f"result: unknown section {name!r}")
        if sec.get("status") not in STATUSES:
            raise ValueError(f"result: section {name!r} has status {sec.get('status')!r}")
        if sec["status"] != "pass" and not sec.get("reason"):
            raise ValueError(f"result: section {name!r} is {sec['status']} without a reason")


def _fmt_s(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f} s"


def _headline(name: str, sec: dict[str, Any]) -> str:
    """The one number that matters for a section, if it has one."""
    d = sec.get("details") or {}
    if name.startswith("nosync") or name == "mamba_path":
        if "sync_failures" in d:
            return f"{d['sync_failures']} syncs in {d.get('checked_steps', '?')} non-flush steps"
    if name == "overhead" and "overhead_pct" in d:
        return (f"{d['overhead_pct']:+.2f} % (95 % CI {d['ci_pct'][0]:+.2f}..{d['ci_pct'][1]:+.2f}) "
                f"at {d['step_ms_a']:.1f} ms/step")
    if name == "peers" and "per_step_ms" in d:
        parts = [f"{k} {v:.2f} ms" for k, v in d["per_step_ms"].items()]
        return "logging cost per step: " + ", ".join(parts)
    if name == "env" and "device" in d:
        return f"{d['device']} (torch {d.get('torch')}, CUDA {d.get('cuda')})"
    return ""


def render_summary(result: dict[str, Any]) -> str:
    """The Markdown summary of a result document."""
    cuda = result.get("cuda") or {}
    lines = [
        "# healthwatch GPU check",
        "",
        f"- **Result: {result['status'].upper()}**" + (f" — {result['reason']}" if result.get("reason") else ""),
        f"- Started {result.get('started_at')}, finished {result.get('finished_at')}"
        + (f" ({result['elapsed_s']:.0f} s)" if isinstance(result.get("elapsed_s"), (int, float)) else ""),
        f"- GPU: {cuda.get('device') or 'none'}; torch {cuda.get('torch') or '?'}, CUDA {cuda.get('cuda') or '–'}",
    ]
    if result.get("commit"):
        lines.append(f"- healthwatch commit {result['commit']}")
    if result.get("install"):
        lines.append("- Installs: " + ", ".join(f"{k} {v}" for k, v in result["install"].items()))
    lines += ["", "| section | status | time | result |", "|---|---|---|---|"]
    for name, sec in result.get("sections", {}).items():
        text = _headline(name, sec)
        if sec.get("reason"):
            text = (text + "; " if text else "") + sec["reason"]
        text = text.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {name} | {sec['status']} | {_fmt_s(sec.get('elapsed_s'))} | {text} |")
    syncs = [(name, f) for name, sec in result.get("sections", {}).items()
             for f in (sec.get("details") or {}).get("failures", [])]
    if syncs:
        lines += ["", "## Host syncs found in the Monitor's code", ""]
        lines += [f"- {name}, step {f.get('step')}: `{f.get('where')}` — {f.get('error', '')[:160]}"
                  for name, f in syncs[:20]]
    lines.append("")
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``gpu-check.json`` and ``gpu-check.md`` into ``out_dir`` (atomically); returns both paths."""
    validate_result(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in ((RESULT_FILE, json.dumps(result, indent=2, default=str)), (SUMMARY_FILE, render_summary(result))):
        path = out_dir / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def read_install_status(path: Path | None) -> dict[str, str]:
    """``name=status`` lines written by ``gpu_check.sh`` (missing file: empty)."""
    if path is None or not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


# ------------------------------------------------------------------------------------------------
# orchestration


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_child(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group; (exit status or None on timeout, output tail). A timed-out
    child is killed with its whole group, so a hung CUDA call cannot outlive its section."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})}, cwd=str(REPO))
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, (out or "")[-4000:]
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        return None, (out or "")[-4000:]


def probe_cuda(timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """What torch sees, from a subprocess (a broken driver can hang or crash the probing process)."""
    code = (
        "import json, torch\n"
        "d = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'available': torch.cuda.is_available()}\n"
        "if d['available']:\n"
        "    d['device_count'] = torch.cuda.device_count()\n"
        "    d['device'] = torch.cuda.get_device_name(0)\n"
        "    d['capability'] = list(torch.cuda.get_device_capability(0))\n"
        "    d['memory_gib'] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)\n"
        "    torch.ones(1, device='cuda').add_(1).sum().item()  # a kernel really runs\n"
        "print('PROBE ' + json.dumps(d))\n"
    )
    rc, out = run_child([sys.executable, "-c", code], timeout_s)
    if rc is None:
        return {"available": False, "error": f"the CUDA probe hung for {timeout_s:.0f} s"}
    for line in out.splitlines():
        if line.startswith("PROBE "):
            info = json.loads(line[6:])
            if not info["available"]:
                info["error"] = "torch.cuda.is_available() is False (no GPU, no driver, or a CPU-only torch build)"
            return info
    return {"available": False, "error": f"the CUDA probe failed (exit {rc}): {out.strip()[-500:]}"}


def run_section(name: str, timeout_s: float, workdir: Path) -> dict[str, Any]:
    """Run one section in a child process with a time limit; never raises."""
    res_file = workdir / f"{name}.result.json"
    res_file.unlink(missing_ok=True)
    t0 = time.monotonic()
    rc, out = run_child([sys.executable, str(Path(__file__).resolve()), "--section", name, "--result", str(res_file),
                         "--workdir", str(workdir / name)], timeout_s)
    elapsed = time.monotonic() - t0
    if rc is None:
        return section_result("fail", f"timed out after {timeout_s:.0f} s", {"output_tail": out[-2000:]},
                              elapsed, timeout_s)
    if res_file.is_file():
        try:
            sec = json.loads(res_file.read_text())
            sec.update(elapsed_s=elapsed, timeout_s=timeout_s)
            if rc != 0 and sec.get("status") == "pass":
                sec.update(status="fail", reason=f"exited with status {rc} after reporting a pass")
            if sec.get("status") != "pass":
                sec.setdefault("details", {})["output_tail"] = out[-2000:]
            return sec
        except (OSError, ValueError) as exc:
            return section_result("fail", f"unreadable section result: {exc}", {"output_tail": out[-2000:]},
                                  elapsed, timeout_s)
    return section_result("fail", f"exited with status {rc} without a result", {"output_tail": out[-2000:]},
                          elapsed, timeout_s)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    args = parse_args(argv)
    if args.section:
        return _child(args.section, args.result, args.workdir)
    started, t0 = _now(), time.monotonic()
    out_dir: Path = args.out
    result: dict[str, Any] = {
        "schema": RESULT_SCHEMA, "status": "fail", "reason": "", "started_at": started, "finished_at": None,
        "elapsed_s": None, "argv": list(sys.argv if argv is None else argv), "host": platform.node(),
        "python": platform.python_version(), "commit": _git_commit(),
        "install": read_install_status(args.install_status), "cuda": {"available": False}, "sections": {},
    }
    cuda = probe_cuda()
    result["cuda"] = cuda
    if not cuda.get("available"):
        reason = f"CUDA is not available: {cuda.get('error', 'unknown reason')}"
        for name in args.sections:
            result["sections"][name] = section_result("skip", "CUDA is not available")
        result.update(status="fail", reason=reason, finished_at=_now(), elapsed_s=time.monotonic() - t0)
        json_path, _ = write_outputs(result, out_dir)
        print(f"gpu_check: FAILED — {reason}. Results: {json_path}", file=sys.stderr)
        return EXIT_NO_CUDA
    print(f"gpu_check: CUDA ok — {cuda.get('device')} (torch {cuda.get('torch')}, CUDA {cuda.get('cuda')})", flush=True)
    if args.probe_only:
        return EXIT_OK
    workdir = out_dir / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    deadline = t0 + args.budget_s
    for name in args.sections:
        left = deadline - time.monotonic() - 5.0  # keep a moment to write the results
        if left < 15:
            sec = section_result("skip", f"time budget of {args.budget_s:.0f} s exhausted")
        else:
            timeout = min(SECTIONS[name], left)
            print(f"gpu_check: {name} (limit {timeout:.0f} s) ...", flush=True)
            sec = run_section(name, timeout, workdir)
        result["sections"][name] = sec
        print(f"gpu_check: {name}: {sec['status']}" + (f" — {sec['reason']}" if sec.get("reason") else ""), flush=True)
        # Results so far are on disk after every section: a killed run still leaves them.
        status, reason = overall_status(result["sections"], True)
        result.update(status=status, reason=reason, finished_at=_now(), elapsed_s=time.monotonic() - t0)
        write_outputs(result, out_dir)
    json_path, md_path = write_outputs(result, out_dir)
    print(f"gpu_check: {result['status'].upper()}" + (f" — {result['reason']}" if result["reason"] else "")
          + f". Results: {json_path}, {md_path}", flush=True)
    return EXIT_OK if result["status"] == "pass" else EXIT_SECTION_FAILED


# ------------------------------------------------------------------------------------------------
# child side: the sections (CUDA only from here on)


def _child(name: str, result_file: Path, workdir: Path) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))  # benchmarks/ helpers
    try:
        sec = SECTION_FUNCS[name](workdir)
    except _Skip as exc:
        sec = section_result("skip", str(exc))
    except Exception as exc:  # noqa: BLE001 - recorded as the section's failure
        sec = section_result("fail", f"{type(exc).__name__}: {exc}"[:500],
                             {"traceback": traceback.format_exc()[-3000:]})
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(sec, default=str))
    os.replace(tmp, result_file)
    return 0


class _Skip(Exception):
    """A section that cannot run here (a package missing), with the reason."""


def _need(module: str, why: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken extension
        raise _Skip(f"{why}: cannot import {module} ({type(exc).__name__}: {str(exc)[:200]})") from None


def _hooks_dir() -> str:
    import healthwatch.hooks

    return str(Path(healthwatch.hooks.__file__).resolve().parent) + os.sep


class SyncGuard:
    """Runs the Monitor's own code under ``torch.cuda.set_sync_debug_mode("error")``.

    A synchronizing call raises there; the guard records it (step, the line in ``healthwatch.hooks``
    that made it) and lets training go on. ``Monitor.flush`` is exempt (it copies to the host by
    design) and waits for the writer thread, so that the writer never runs while the mode is on.
    """

    #: Monitor entry points; names a version lacks are skipped, newer ones are covered when present.
    METHODS = ("after_backward", "step", "log", "after_optimizer_step", "quant_stats", "router_drops")

    def __init__(self) -> None:
        self.root = _hooks_dir()
        self.failures: list[dict[str, Any]] = []
        self.step: int | None = None
        self.checked_calls = 0
        self.flushes = 0
        self.flush_steps: set[int] = set()
        self.wrapped_hooks = 0
        self.wrapped_methods: list[str] = []
        self._exempt = False

    def call(self, fn: Callable[..., Any], *a: Any, **k: Any) -> Any:
        """Call ``fn`` with the sync debug mode set to error; record a sync instead of raising it."""
        import torch

        if self._exempt:
            return fn(*a, **k)
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        self.checked_calls += 1
        try:
            return fn(*a, **k)
        except RuntimeError as exc:
            if "synchroniz" not in str(exc).lower():
                raise
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(self.root)]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else "?"
            self.failures.append({"step": self.step, "where": where, "error": str(exc)[:300]})
            return None
        finally:
            torch.cuda.set_sync_debug_mode(prev)

    def install(self, mon: Any, model: Any) -> None:
        """Wrap the Monitor's methods, its flush, and every module hook whose code is in ``healthwatch.hooks``."""
        import torch

        for name in self.METHODS:
            orig = getattr(mon, name, None)
            if callable(orig):
                setattr(mon, name, functools.partial(self.call, orig))
                self.wrapped_methods.append(name)
        orig_flush = mon.flush

        def flush(wait: bool = False) -> None:
            prev = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            self._exempt = True
            self.flushes += 1
            if self.step is not None:
                self.flush_steps.add(self.step)
            try:
                orig_flush(wait=True)
            finally:
                self._exempt = False
                torch.cuda.set_sync_debug_mode(prev)

        mon.flush = flush
        self.rescan(model)
        if not self.wrapped_hooks:
            raise RuntimeError("no forward hook of healthwatch.hooks found on the model: nothing to check")

    def _wrap_dict(self, hooks: Any) -> None:
        for key, fn in list((hooks or {}).items()):
            if getattr(fn, "_hw_guarded", False):
                continue
            code = getattr(fn, "__code__", None) or getattr(getattr(fn, "func", None), "__code__", None)
            if code is not None and code.co_filename.startswith(self.root):
                wrapped = functools.wraps(fn)(functools.partial(self.call, fn))
                wrapped._hw_guarded = True  # type: ignore[attr-defined]
                hooks[key] = wrapped
                self.wrapped_hooks += 1

    def rescan(self, model: Any, optimizer: Any = None) -> None:
        """Guard every hook of healthwatch.hooks not guarded yet: module hooks, and optimizer step hooks
        (the Monitor may register those when it discovers the optimizer, after the first step)."""
        import torch.optim.optimizer as topt

        dicts = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
        for module in model.modules():
            for attr in dicts:
                self._wrap_dict(getattr(module, attr, None))
        self._wrap_dict(getattr(topt, "_global_optimizer_pre_hooks", None))
        self._wrap_dict(getattr(topt, "_global_optimizer_post_hooks", None))
        if optimizer is not None:
            self._wrap_dict(getattr(optimizer, "_optimizer_step_pre_hooks", None))
            self._wrap_dict(getattr(optimizer, "_optimizer_step_post_hooks", None))

    def details(self, steps: int) -> dict[str, Any]:
        """What was checked and what was found."""
        return {"sync_failures": len(self.failures), "failures": self.failures[:50],
                "checked_steps": steps - len(self.flush_steps), "flush_steps": sorted(self.flush_steps),
                "checked_calls": self.checked_calls, "wrapped_hooks": self.wrapped_hooks,
                "wrapped_methods": self.wrapped_methods}


def _train_checked(model: Any, batches: Callable[[int], Any], fwd: Callable[[Any, Any], tuple[Any, list[Any]]],
                   workdir: Path, run: str, steps: int, flush_every: int) -> dict[str, Any]:
    """Train ``model`` on CUDA with a Monitor under :class:`SyncGuard`; check the stored losses."""
    import torch

    import healthwatch as hw

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = hw.Monitor(store=workdir / "store", run=run, log_every=1, expert_load_every=1,
                     flush_every_steps=flush_every, flush_every_s=1e9)
    spec = mon.watch(model)
    guard = SyncGuard()
    guard.install(mon, model)
    losses = []
    for step in range(steps):
        guard.step = step
        guard.rescan(model, opt)
        batch = batches(step)
        loss, mtp = fwd(model, batch)
        mon.after_backward()
        opt.step()
        if "after_optimizer_step" in guard.wrapped_methods:
            _call_after_optimizer_step(mon, opt)
        opt.zero_grad(set_to_none=True)
        mon.step(step, tokens=(step + 1) * int(batch.numel()), loss=loss, mtp_losses=mtp, lr=1e-3)
        mon.log({"check/loss_x2": loss.detach() * 2}, step=step)
        losses.append(loss.detach())
    guard.step = None
    mon.close()
    expected = [float(x) for x in torch.stack(losses).cpu()]  # the harness syncs here, outside the guard
    st = hw.open_store(workdir / "store")
    stored = [v for (v,) in st.sql("SELECT value FROM scalars WHERE run = ? AND name = 'loss/train' ORDER BY step",
                                   [run]).fetchall()]
    n_layers = st.sql("SELECT count(DISTINCT layer) FROM layer_stats WHERE run = ? AND metric = 'maxvio'",
                      [run]).fetchone()[0]
    st.close()
    det = guard.details(steps)
    det.update(adapter=spec.adapter, blocks=len(spec.blocks), routers=len(spec.routers), steps=steps,
               stored_loss_rows=len(stored), maxvio_layers=int(n_layers), dropped_rows=mon.dropped_rows)
    if guard.flushes == 0 or det["checked_steps"] <= 0:
        raise RuntimeError(f"cadence produced no flush or no checked step: {det}")
    ok_rows = len(stored) == steps and all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
                                           for a, b in zip(stored, expected))
    if det["sync_failures"]:
        where = sorted({f["where"] for f in guard.failures})
        return section_result("fail", f"{det['sync_failures']} host sync(s) in the Monitor's code: {', '.join(where)}", det)
    if not ok_rows:
        det["expected_losses"], det["stored_losses"] = expected, stored
        return section_result("fail", "stored loss/train rows differ from the losses trained", det)
    if n_layers != len(spec.routers):
        return section_result("fail", f"maxvio stored for {n_layers} layers, {len(spec.routers)} routers", det)
    return section_result("pass", "", det)


def _call_after_optimizer_step(mon: Any, opt: Any) -> None:
    """``mon.after_optimizer_step()``, passing the optimizer when that version asks for it."""
    import inspect

    fn = mon.after_optimizer_step
    target = getattr(fn, "args", (None, fn))[-1]  # the method inside the guard's partial
    required = [p for p in inspect.signature(target).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    fn(opt) if required else fn()


def _need_cuda() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise _Skip("CUDA is not available")
    return torch


def section_env(workdir: Path) -> dict[str, Any]:
    """Versions and the device."""
    torch = _need_cuda()
    from importlib import metadata

    det: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "device": torch.cuda.get_device_name(0),
                           "capability": list(torch.cuda.get_device_capability(0)),
                           "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                           "python": platform.python_version()}
    for dist in ("healthwatch", "transformers", "tensorboard", "wandb", "mamba-ssm", "causal-conv1d", "triton"):
        try:
            det[f"version_{dist}"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            det[f"version_{dist}"] = None
    _need("healthwatch", "healthwatch is not installed (pip install -e .)")
    return section_result("pass", "", det)


def section_nosync_reference(workdir: Path) -> dict[str, Any]:
    """The reference (demo) model on CUDA, every signal on, under the sync debug mode."""
    torch = _need_cuda()
    _need("healthwatch", "healthwatch is not installed")
    from healthwatch.demo.data import SyntheticTokens
    from healthwatch.demo.model import HybridConfig, HybridLM

    torch.manual_seed(0)
    cfg = HybridConfig()  # the demo model: Mamba-2, attention, LatentMoE, NVFP4 fake quant, 2 MTP heads
    model = HybridLM(cfg).cuda()
    data = SyntheticTokens(cfg.vocab_size, 64, 4, seed=0)

    def fwd(m: Any, ids: Any) -> tuple[Any, list[Any]]:
        out = m(ids)
        out.total_loss.backward()
        return out.loss, list(out.mtp_losses)

    return _train_checked(model, lambda s: data.batch_at(s).cuda(), fwd, workdir, "gpu-nosync-reference",
                          steps=16, flush_every=5)


def nemotron_h_tiny() -> Any:
    """The FIELD-NOTES Nemotron-H tiny config (Mamba-2, MoE, attention, MLP)."""
    import transformers as tf

    cfg = tf.NemotronHConfig(
        vocab_size=256, hidden_size=64, hybrid_override_pattern="ME*EM-ME", num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, mamba_num_heads=8, mamba_head_dim=16,
        ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16, expand=2, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=64,
        n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
        max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return tf.NemotronHForCausalLM(cfg)


def section_nosync_nemotron_h(workdir: Path) -> dict[str, Any]:
    """Hugging Face Nemotron-H on CUDA under the sync debug mode."""
    torch = _need_cuda()
    _need("healthwatch", "healthwatch is not installed")
    _need("transformers", "transformers is not installed (pip install transformers==5.23.0)")
    torch.manual_seed(0)
    model = nemotron_h_tiny().cuda().train()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 256, (4, 64), generator=gen) for _ in range(12)]

    def fwd(m: Any, ids: Any) -> tuple[Any, list[Any]]:
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss, []

    return _train_checked(model, lambda s: batches[s].cuda(), fwd, workdir, "gpu-nosync-nemotron-h",
                          steps=12, flush_every=4)


#: GPU-sized reference model for the overhead measurement (batch grows until a step is ≥ 50 ms).
GPU_MODEL = {
    "vocab_size": 32768, "d_model": 1024, "pattern": "M E * E M E M E * E M E", "n_heads": 16,
    "n_kv_heads": 4, "headdim": 64, "chunk_size": 64, "num_experts": 32, "top_k": 4,
    "moe_latent_dim": 512, "moe_ffn": 1024, "shared_expert_ffn": 2048, "mlp_ffn": 2048,
    "precision": "bf16",
}


def section_overhead(workdir: Path) -> dict[str, Any]:
    """Paired, interleaved A/B step times: copy A bare, copy B watched (all signals, every step)."""
    import copy

    torch = _need_cuda()
    _need("healthwatch", "healthwatch is not installed")
    import healthwatch as hw
    from benchmarks.bench_common import bootstrap_ci, median, trimmed_mean
    from healthwatch.demo.data import SyntheticTokens
    from healthwatch.demo.model import HybridConfig, HybridLM

    torch.manual_seed(0)
    cfg = HybridConfig(**GPU_MODEL)
    model_a = HybridLM(cfg).cuda()
    model_b = copy.deepcopy(model_a)
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=1e-4)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-4)
    seq = 512
    mon = hw.Monitor(store=workdir / "store", run="gpu-overhead", log_every=1, expert_load_every=1)
    mon.watch(model_b)
    step_b = 0

    def train(which: str, ids: Any) -> float:
        nonlocal step_b
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if which == "A":
            out = model_a(ids)
            out.total_loss.backward()
            opt_a.step()
            opt_a.zero_grad(set_to_none=True)
        else:
            out = model_b(ids)
            out.total_loss.backward()
            mon.after_backward()
            opt_b.step()
            opt_b.zero_grad(set_to_none=True)
            mon.step(step_b, tokens=(step_b + 1) * ids.numel(), loss=out.loss, mtp_losses=out.mtp_losses, lr=1e-4)
            step_b += 1
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    batch = 4
    while True:  # grow the batch until a bare step takes ≥ 50 ms (a GPU-sized step)
        data = SyntheticTokens(cfg.vocab_size, seq, batch, seed=0)
        ids = data.batch_at(0).cuda()
        for _ in range(2):
            train("A", ids)
            train("B", ids)
        t = median([train("A", ids) for _ in range(3)])
        if t >= MIN_STEP_S or batch >= 64:
            break
        batch *= 2
    pairs = 40
    a_times: list[float] = []
    b_times: list[float] = []
    for k in range(pairs):
        ids = data.batch_at(1 + k).cuda()
        for which in (("A", "B") if k % 2 == 0 else ("B", "A")):  # A B B A A B …: drift cancels
            (a_times if which == "A" else b_times).append(train(which, ids))
    mon.close()
    diffs = [b - a for a, b in zip(a_times, b_times)]
    med_a = median(a_times)
    lo, hi = bootstrap_ci(diffs)
    det = {
        "params": sum(p.numel() for p in model_a.parameters()), "batch": batch, "seq": seq, "pairs": pairs,
        "step_ms_a": med_a * 1e3, "step_ms_b": median(b_times) * 1e3,
        "overhead_pct": 100 * median(diffs) / med_a, "ci_pct": [100 * lo / med_a, 100 * hi / med_a],
        "trimmed_mean_ratio_pct": 100 * (trimmed_mean(b_times) / trimmed_mean(a_times) - 1),
        "budget_pct": OVERHEAD_BUDGET_PCT, "dropped_rows": mon.dropped_rows,
    }
    if med_a < MIN_STEP_S:
        return section_result("fail", f"could not reach a {MIN_STEP_S * 1e3:.0f} ms step (got {med_a * 1e3:.1f} ms)", det)
    if det["ci_pct"][0] > OVERHEAD_BUDGET_PCT:
        return section_result("fail", f"overhead above the {OVERHEAD_BUDGET_PCT} % budget (CI lower bound "
                              f"{det['ci_pct'][0]:.2f} %)", det)
    return section_result("pass", "", det)


#: Peer comparison: steps per logger, and the width of the GPU work that produces the values.
PEERS_STEPS, PEERS_WORK_DIM = 60, 2048


def section_peers(workdir: Path) -> dict[str, Any]:
    """275 values per step from GPU work: healthwatch (tensors) vs TensorBoard / W&B (``.item()`` each)."""
    torch = _need_cuda()
    _need("healthwatch", "healthwatch is not installed")
    import healthwatch as hw
    from benchmarks.bench_common import median
    from benchmarks.bench_peers import value_names
    from healthwatch.demo.model import HybridConfig, HybridLM

    names = value_names()
    n = len(names)
    steps, warmup, dim = PEERS_STEPS, 5, PEERS_WORK_DIM
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(dim, dim, device="cuda", generator=gen) / math.sqrt(dim)

    def produce(step: int) -> tuple[Any, ...]:
        # A few ms of queued GPU work whose result the 275 statistics depend on, as in a trainer:
        # a peer's .item() must wait for it; healthwatch's tensors need not.
        x = torch.randn(n, dim, device="cuda", generator=gen)
        for _ in range(8):
            x = torch.tanh(x @ w)
        return torch.unbind(x.norm(dim=1) / (1 + step))

    def loop(log: Callable[[int, tuple[Any, ...]], None]) -> dict[str, float]:
        total, in_loop = [], []
        for s in range(warmup + steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            vals = produce(s)
            t1 = time.perf_counter()
            log(s, vals)
            t2 = time.perf_counter()
            torch.cuda.synchronize()  # the step's GPU work is done either way
            t3 = time.perf_counter()
            if s >= warmup:
                total.append(t3 - t0)
                in_loop.append(t2 - t1)
        return {"step_ms": median(total) * 1e3, "in_loop_ms": median(in_loop) * 1e3}

    results: dict[str, dict[str, float]] = {"none": loop(lambda s, v: None)}
    first_none = results["none"]
    skipped: dict[str, str] = {}

    # healthwatch: watch a (tiny) CUDA model so that the Monitor's device is the GPU, as in training.
    mon = hw.Monitor(store=workdir / "store", run="gpu-peers", log_every=1, flush_every_s=5.0)
    mon.watch(HybridLM(HybridConfig()).cuda())

    def hw_log(s: int, vals: tuple[Any, ...]) -> None:
        mon.step(s, tokens=s + 1, loss=vals[0], mtp_losses=[vals[1], vals[2]])
        mon.log(dict(zip(names[3:], vals[3:])), step=s)

    results["healthwatch"] = loop(hw_log)
    mon.close()
    try:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(log_dir=str(workdir / "tb"))

        def tb_log(s: int, vals: tuple[Any, ...]) -> None:
            for name, v in zip(names, vals):
                tb.add_scalar(name, v.item(), s)

        results["tensorboard"] = loop(tb_log)
        tb.close()
    except ImportError as exc:
        skipped["tensorboard"] = str(exc)
    try:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(mode="offline", dir=str(workdir), project="hw-gpu-check", name="peers",
                         settings=wandb.Settings(console="off", silent=True))

        def wb_log(s: int, vals: tuple[Any, ...]) -> None:
            run.log({name: v.item() for name, v in zip(names, vals)}, step=s)

        results["wandb"] = loop(wb_log)
        run.finish()
    except ImportError as exc:
        skipped["wandb"] = str(exc)
    # The bare loop again at the end: the baseline is the mean of both runs (drift cancels).
    last_none = loop(lambda s, v: None)
    results["none"] = {k: (first_none[k] + last_none[k]) / 2 for k in first_none}
    base = results["none"]["step_ms"]
    det = {"values_per_step": n, "steps": steps, "results": results, "skipped": skipped,
           "per_step_ms": {k: v["step_ms"] - base for k, v in results.items() if k != "none"}}
    if skipped:
        return section_result("fail" if len(skipped) == 2 else "pass",
                              f"not measured: {', '.join(skipped)} (not installed)", det)
    return section_result("pass", "", det)


MAMBA_PIP = ["mamba-ssm", "causal-conv1d"]
MAMBA_IMPORT = "from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined"


def section_mamba_install(workdir: Path) -> dict[str, Any]:
    """Install mamba-ssm if it is not importable yet; a failure to install is a skip, not a failure."""
    _need_cuda()
    check = [sys.executable, "-c", MAMBA_IMPORT]
    rc, out = run_child(check, 60)
    if rc == 0:
        return section_result("pass", "", {"already_installed": True})
    # Prebuilt wheels matching torch/CUDA are fetched by the packages' setup; no isolated build env, so
    # the installed torch is used (FIELD-NOTES).
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", *MAMBA_PIP]
    rc, out = run_child(cmd, float(os.environ.get("GPU_CHECK_MAMBA_INSTALL_S", "110")))
    det = {"command": " ".join(cmd), "pip_exit": rc, "pip_tail": out[-1500:]}
    if rc != 0:
        why = "timed out" if rc is None else f"exit {rc}"
        return section_result("skip", f"mamba-ssm did not install ({why}); the pure-torch SSD path is used", det)
    rc, out = run_child(check, 60)
    if rc != 0:
        det["import_tail"] = out[-1500:]
        return section_result("skip", "mamba-ssm installed but its kernel does not import", det)
    return section_result("pass", "", det)


def section_mamba_path(workdir: Path) -> dict[str, Any]:
    """mamba-ssm's SSD kernel against the pure-torch scan, then the no-sync check on the kernel path."""
    torch = _need_cuda()
    _need("mamba_ssm.ops.triton.ssd_combined", "mamba-ssm is not usable")
    from healthwatch.demo import ssd
    from healthwatch.demo.data import SyntheticTokens
    from healthwatch.demo.model import HybridConfig, HybridLM

    if not ssd.mamba_kernel_available():
        raise _Skip("healthwatch.demo.ssd does not see the mamba-ssm kernel")
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, length, h, p, g, n, chunk = 2, 128, 4, 16, 1, 16, 32
    x = torch.randn(b, length, h, p, device="cuda", generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(b, length, h, device="cuda", generator=gen))
    A = -torch.rand(h, device="cuda", generator=gen) - 0.5
    B = torch.randn(b, length, g, n, device="cuda", generator=gen)
    C = torch.randn(b, length, g, n, device="cuda", generator=gen)
    kernel = ssd.ssd(x, dt, A, B, C, chunk)
    ref = ssd.ssd_chunked(x, dt, A, B, C, chunk)
    rel = float((kernel - ref).norm() / ref.norm())
    torch.manual_seed(0)
    cfg = HybridConfig()
    model = HybridLM(cfg).cuda()
    data = SyntheticTokens(cfg.vocab_size, 64, 4, seed=0)

    def fwd(m: Any, ids: Any) -> tuple[Any, list[Any]]:
        out = m(ids)
        out.total_loss.backward()
        return out.loss, list(out.mtp_losses)

    sec = _train_checked(model, lambda s: data.batch_at(s).cuda(), fwd, workdir, "gpu-mamba-ssm", steps=10,
                         flush_every=4)
    sec["details"]["kernel_vs_torch_rel_err"] = rel
    # Triton may run the kernel's matmuls in TF32: a few 1e-4 is expected; a wrong binding is O(1).
    if sec["status"] == "pass" and not rel < 1e-2:
        sec.update(status="fail", reason=f"mamba-ssm SSD kernel differs from the pure-torch scan (rel. error {rel:.2e})")
    return sec


SECTION_FUNCS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "env": section_env,
    "nosync_reference": section_nosync_reference,
    "nosync_nemotron_h": section_nosync_nemotron_h,
    "overhead": section_overhead,
    "peers": section_peers,
    "mamba_install": section_mamba_install,
    "mamba_path": section_mamba_path,
}

if __name__ == "__main__":
    sys.exit(main())
