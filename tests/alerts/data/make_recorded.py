"""Record the fixture series used by the alert tests from the real demo trainer.

Run from the repository root: ``python tests/alerts/data/make_recorded.py [DATA]``. The fixtures
are runs of the early-warning benchmark's evaluation size (``benchmarks/bench_early_warning.py``,
``FULL``: the demo's block kinds "M E * E" with 32 experts top-2 and two MTP heads, NVFP4, batch
4 x 32, 200 steps, fault at step 80) on its TUNING seeds -- never on its evaluation seeds:

* ``diverging``: the reference case's fault (``ultra``: MTP starvation, residual growth and
  router collapse from step 80, then a learning-rate excursion from step 120), seed 11;
* ``healthy`` and ``healthy2``: the same model and data without a fault, seeds 11 and 12 (their
  early MaxVio reaches the 32-expert cap of 15, which the pack must tolerate).

With ``DATA`` (a directory the benchmark's ``record`` command filled) the runs are copied from
there instead of trained again. Nothing is drawn by hand: every value is the model's own.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent.parent
#: fixture name -> (scenario, seed) of the benchmark run it is.
FIXTURES = {"diverging": ("ultra", 11), "healthy": ("healthy", 11), "healthy2": ("healthy", 12)}


def main(argv: list[str]) -> int:
    """Copy (or train, then copy) each fixture's benchmark run next to this file."""
    sys.path.insert(0, str(ROOT))
    import tempfile

    from benchmarks.bench_early_warning import FULL, record_run

    data = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="hw-fixtures-"))
    for name, (scenario, seed) in FIXTURES.items():
        stem = f"{scenario}-s{seed}"
        if not (data / f"{stem}.json").exists():
            record_run(scenario, seed, data, FULL)
        for table in ("scalars", "layer_stats"):
            shutil.copyfile(data / f"{stem}.{table}.parquet", HERE / f"{name}.{table}.parquet")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
