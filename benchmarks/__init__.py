"""healthwatch benchmarks: hook overhead, logging cost against peers, ingest and query at scale.

Run ``python -m benchmarks [--quick] [--out BENCHMARKS.md]`` from a source checkout (the
benchmarks are not in the wheel, so there is no ``healthwatch bench``). Each benchmark runs in
its own child process (``python -m benchmarks.bench_<name> --task ...``) so that CPU accounting,
threads and peer loggers' helper processes never leak from one measurement into the next; the
parent shows progress bars and writes the report. Budgets are those of DESIGN.md section 9.
"""

from __future__ import annotations

__all__: list[str] = []
