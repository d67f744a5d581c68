"""W&B mirror of a run (``healthwatch export wandb``; the ``wandb`` package is an optional extra).

Logs the same selection as the TensorBoard mirror (scalars, tokens, per-layer max / median /
arg-max layer) at each step of the run's effective path, with the run's lineage (parent, branch
step and tokens, precision) and its config as W&B config. Offline mode writes a local run
directory that ``wandb sync`` uploads later.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from healthwatch.exporters.source import StoreSource


def export_wandb(store: str | os.PathLike[str] | None, run: str, project: str = "healthwatch",
                 mode: str = "offline", directory: str | os.PathLike[str] | None = None) -> tuple[int, Path]:
    """Log ``run`` to W&B; returns (values logged, the W&B run directory)."""
    source = StoreSource(store, runs=[run], per_rank=True)
    try:
        source.refresh()
        info = source.run_info(run)
        try:
            import wandb
        except ImportError as exc:
            raise ImportError(f"exporting to W&B needs the wandb package (pip install 'healthwatch[wandb]'): {exc}") from exc
        per_step: dict[int, dict[str, Any]] = defaultdict(dict)
        for step, tok, name, value, _wt in source.scalar_rows(run):
            per_step[step][name] = value
            per_step[step]["tokens"] = tok
        for step, metric, vmax, vmed, argmax in source.layer_aggregate_rows(run):
            per_step[step].update({f"layers/{metric}/max": vmax, f"layers/{metric}/median": vmed,
                                   f"layers/{metric}/argmax_layer": argmax})
        lineage = {k: info[k] for k in ("parent", "branch_step", "branch_tokens", "precision")}
        directory = Path(directory or "wandb").resolve()
        directory.mkdir(parents=True, exist_ok=True)
        # silent: the command prints its own one-line result instead of W&B's run summary.
        wb = wandb.init(project=project, name=run, mode=mode, dir=str(directory), reinit="create_new",
                        config={"healthwatch": {"run": run, **lineage}, **(info["config"] or {})},
                        settings=wandb.Settings(silent=True, console="off"))
        n = 0
        try:
            for step in sorted(per_step):
                wb.log(per_step[step], step=step)
                n += len(per_step[step])
        finally:
            wb.finish()
        return n, Path(wb.dir).parent
    finally:
        source.close()
