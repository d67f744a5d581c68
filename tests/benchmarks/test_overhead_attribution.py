"""benchmarks/overhead_attribution.py: the tool behind issue 17's "today's figure" runs on this tree
and on a checkout given by OLD_TREE (here the same tree, imported the way an old checkout is), and
attributes the Monitor's time to its entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "overhead_attribution.py"


@pytest.mark.parametrize(("old_tree", "variant", "shared"), [(False, "all", "1"), (True, "five", "0")])
def test_attributes_the_monitors_time(tmp_path: Path, old_tree: bool, variant: str, shared: str) -> None:
    env = {**os.environ, "SHARED_CLIP": shared}
    if old_tree:
        env["OLD_TREE"] = str(ROOT)
    proc = subprocess.run([sys.executable, str(SCRIPT), "bf16", variant, "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["variant"] == variant and got["rounds"] == 1
    parts = got["parts_ms"]
    # The report's five signals always run: block hooks (residual RMS), router hooks, step().
    assert {"hooks: blocks", "hooks: routers", "step"} <= set(parts)
    assert all(parts[k] > 0 for k in ("hooks: blocks", "hooks: routers", "step"))
    if shared == "1":
        assert got["shared_clip"] and "gradient pass (shared clip - torch clip)" in parts
    else:
        assert not got["shared_clip"] and parts["after_backward"] > 0
    if variant == "all":  # BF16: no quantised operands; Mamba dt and the update family run
        assert {"_dt_stats", "after_optimizer_step"} <= set(parts)
    else:
        assert not {"quant_stats", "_dt_stats", "after_optimizer_step"} & set(parts)
    # The Monitor's attributed time is part of the monitored step (not a tautology: the parts are
    # timed by separate clocks around separate calls, the step by one clock around all of it).
    assert 0 < got["monitor_ms"] < got["variant_step_cpu_ms"]

