"""Record the fixture series used by the alert tests from the real demo trainer.

Run from the repository root: ``python tests/alerts/data/make_recorded.py``. It trains the demo's
hybrid MoE twice for the same number of steps, once with the reference case's fault (``ultra``:
MTP starvation, residual growth, router collapse, then a learning-rate excursion) and once
healthy, and keeps each run's scalars and layer stats as Parquet next to this file. Nothing is
drawn by hand: the divergence is the model's own response to the fault.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

import healthwatch as hw
from healthwatch.demo.faults import make_fault
from healthwatch.demo.trainer import TrainConfig, Trainer

HERE = Path(__file__).resolve().parent
STEPS = 400
ONSET = 180


def record(name: str, fault: str | None, out: Path) -> None:
    """Train one run into a temporary store and export its effective scalars and layer stats."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        cfg = TrainConfig(run=name, store=store, precision="nvfp4", total_steps=STEPS, checkpoint_every=10_000)
        mon = hw.Monitor(store=store, run=name, precision="nvfp4", flush_every_steps=50, expert_load_every=10,
                         dead_window=20)
        trainer = Trainer(cfg, mon, make_fault(fault, ONSET) if fault else None)
        trainer.train(STEPS)
        mon.close()
        st = hw.open_store(store)
        for table, cols in (("scalars", "step, tokens, name, value"),
                            ("layer_stats", "step, tokens, layer, layer_type, metric, value")):
            data = st.sql(f"SELECT {cols} FROM {table}_effective WHERE run = ? ORDER BY step", [name]).arrow()
            pq.write_table(data, out / f"{name}.{table}.parquet", compression="zstd")
        st.close()


if __name__ == "__main__":
    import torch

    torch.set_num_threads(2)
    which = sys.argv[1:] or ["diverging", "healthy"]
    if "diverging" in which:
        record("diverging", "ultra", HERE)
    if "healthy" in which:
        record("healthy", None, HERE)
