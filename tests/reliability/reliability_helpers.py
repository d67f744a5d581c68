"""Helpers shared by the reliability tests and their worker processes.

Everything here waits on conditions with deadlines (``wait_for``), never on bare sleeps.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Worker processes (kill9_worker.py, …) import this module without pytest's `pythonpath`: put the
# repository root on the path for the checkout-only harness `benchmarks.apphost`.
if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.apphost import free_port, wait_for  # noqa: E402, F401 - shared with the reliability tests

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CORE_TESTS = REPO / "tests" / "core"


#: Patterns that mean a process hit an error, in any process's stderr/stdout.
ERROR_PATTERNS = re.compile(
    r"Traceback \(most recent call last\)|Could not set lock|Conflicting lock|database is locked"
    r"|IO Error|IOException|TProtocolException|Segmentation fault|core dumped",
)


def error_lines(text: str) -> list[str]:
    """Lines of a process's output that show an error (tracebacks, lock errors, IO errors)."""
    return [line for line in text.splitlines() if ERROR_PATTERNS.search(line)]


def module_available(name: str) -> bool:
    """Whether ``name`` can be imported (without importing it when its parent is missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def alerts_cli_available() -> bool:
    """Whether ``healthwatch alerts …`` is wired (the CLI mounts ``healthwatch.alerts.cli``)."""
    if not module_available("healthwatch.alerts.cli"):
        return False
    try:
        from healthwatch.alerts.cli import app  # noqa: F401
    except Exception:  # noqa: BLE001 - an alerts package that fails to import is "not ready"
        return False
    return True


def hw_command(*args: str) -> list[str]:
    """The ``healthwatch`` command line run with this interpreter."""
    return [sys.executable, "-m", "healthwatch.cli", *args]


def run_hw(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``healthwatch ARGS`` to completion and return its result (text output)."""
    return subprocess.run(hw_command(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=child_env())


def child_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: one torch thread, no dynamo, no Streamlit telemetry."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1",
                "PYTHONUNBUFFERED": "1", "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"})
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------
# small filesystems (tmpfs) for read-only and disk-full faults


@dataclass
class SmallFs:
    """A mounted tmpfs of a few hundred KiB: can be made read-only, filled up and freed again."""

    path: Path
    filler: Path | None = None
    log: list[str] = field(default_factory=list)

    def _mount(self, *opts: str) -> bool:
        res = subprocess.run(["mount", *opts, str(self.path)], capture_output=True, text=True)
        self.log.append(f"mount {' '.join(opts)}: rc={res.returncode} {res.stderr.strip()}")
        return res.returncode == 0

    def remount_ro(self, timeout: float = 20) -> None:
        """Make the filesystem read-only (retried while a file is open for writing: EBUSY)."""
        wait_for(lambda: self._mount("-o", "remount,ro"), timeout, "a read-only remount")

    def remount_rw(self, timeout: float = 20) -> None:
        """Make the filesystem writable again."""
        wait_for(lambda: self._mount("-o", "remount,rw"), timeout, "a read-write remount")

    def fill(self) -> int:
        """Fill every free byte with a filler file; returns the bytes written."""
        self.filler = self.path / "filler.bin"
        written = 0
        chunk = b"\0" * 4096
        with open(self.filler, "wb", buffering=0) as fh:
            while True:
                try:
                    written += fh.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        # tmpfs may still hold a partial page: take byte-sized bites until nothing fits.
        with open(self.filler, "ab", buffering=0) as fh:
            for _ in range(4096):
                try:
                    written += fh.write(b"\0")
                except OSError:
                    break
        return written

    def free(self) -> None:
        """Delete the filler file: space returns."""
        if self.filler is not None:
            self.filler.unlink(missing_ok=True)
            self.filler = None

    def unmount(self) -> None:
        """Unmount (lazily, so an open handle cannot make the teardown fail)."""
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


def mount_tmpfs(path: Path, size_kib: int) -> SmallFs | None:
    """Mount a ``size_kib`` tmpfs at ``path``; ``None`` when mounting is not possible here."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return None
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    fs = SmallFs(path)
    probe = path / ".probe"
    try:  # the mount must really be ours and writable
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError:
        fs.unmount()
        return None
    return fs


# --------------------------------------------------------------------------------------------
# training with a real Monitor on the toy model


def toy_model(seed: int = 0) -> Any:
    """The forced-routing toy hybrid model of the core tests (4 blocks, 2 MoE routers)."""
    import torch

    if str(CORE_TESTS) not in sys.path:
        sys.path.insert(0, str(CORE_TESTS))
    from toymodel import ToyLM  # type: ignore[import-not-found]

    torch.manual_seed(seed)
    return ToyLM()


def train(mon: Any, model: Any, steps: Iterable[int], loss_fn: Callable[[int, Any], Any] | None = None,
          extra: Callable[[int], dict[str, Any]] | None = None) -> int:
    """Run training steps through ``mon`` (forward, backward, after_backward, step, log); returns steps run.

    ``loss_fn(step, out)`` may replace the loss handed to the Monitor (e.g. NaN); ``extra(step)``
    returns scalars for ``Monitor.log`` at that step.
    """
    import torch

    ids = torch.arange(8).reshape(1, 8) % 32
    n = 0
    for step in steps:
        out = model(ids).float().pow(2).mean()
        out.backward()
        mon.after_backward()
        model.zero_grad(set_to_none=False)
        loss = out.detach() if loss_fn is None else loss_fn(step, out.detach())
        if extra is not None:  # logged before step(): a step's rows then always share one flush
            mon.log(extra(step), step=step, tokens=8 * (step + 1))
        mon.step(step, tokens=8 * (step + 1), loss=loss, mtp_losses=[out.detach() * 1.01, out.detach() * 1.02],
                 lr=1e-3)
        n += 1
    return n


def tmp_files(root: Path) -> list[Path]:
    """Temporary (unpublished) files anywhere in a store."""
    return sorted(p for p in root.rglob(".tmp-*"))


def read_every_segment(store: Any) -> dict[str, int]:
    """Read every visible segment of every table with pyarrow; returns rows per table."""
    import pyarrow.parquet as pq

    from healthwatch.schema import TABLES

    rows: dict[str, int] = {}
    for table, schema in TABLES.items():
        total = 0
        for path in store.files(table):
            data = pq.read_table(path)
            assert set(schema.names) <= set(data.column_names), (path, data.column_names)
            total += data.num_rows
        rows[table] = total
    return rows
