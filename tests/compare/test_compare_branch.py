"""Lineage helpers: config diffs, Monitor kwargs for a branch, the tree of a run."""

from __future__ import annotations

import pytest
from tests_compare_store import write_run

from healthwatch.branch import (
    TREE_SCHEMA,
    ConfigChange,
    branch_monitor_kwargs,
    branch_point,
    config_diff,
    lineage_tree,
    orphan_branches,
)
from healthwatch.store import open_store


def test_config_diff_nested_added_removed_changed():
    parent = {"precision": "nvfp4", "opt": {"lr": 3e-4, "betas": [0.9, 0.95]}, "fault": "ultra", "healthwatch": {"a": 1}}
    child = '{"precision": "bf16", "opt": {"lr": 3e-4, "betas": [0.9, 0.99]}, "seed": 2, "healthwatch": {"a": 2}}'
    changes = config_diff(parent, child, ignore=["healthwatch"])
    assert changes == [
        ConfigChange("fault", "removed", "ultra", None),
        ConfigChange("opt.betas", "changed", [0.9, 0.95], [0.9, 0.99]),
        ConfigChange("precision", "changed", "nvfp4", "bf16"),
        ConfigChange("seed", "added", None, 2),
    ]
    assert [str(c) for c in changes] == [
        "-fault (was 'ultra')", "opt.betas: [0.9, 0.95] -> [0.9, 0.99]", "precision: 'nvfp4' -> 'bf16'", "+seed=2",
    ]
    assert config_diff(None, "") == [] and config_diff({"a": 1}, {"a": 1}) == []
    assert len(config_diff(parent, child)) == 5  # healthwatch.a counted when not ignored
    with pytest.raises(ValueError, match="not valid JSON"):
        config_diff("{oops", {})


def test_branch_monitor_kwargs_uses_the_effective_path(store_dir):
    write_run(store_dir, "main", range(0, 600, 10), 1000, config={"precision": "nvfp4", "opt": {"lr": 3e-4},
                                                                   "healthwatch": {"adapter": "x"}})
    # Rolled back to step 300 with a different batch size: the branch follows the second attempt.
    write_run(store_dir, "main", range(300, 900, 10), 4000, attempt=2, start_step=300, token_offset=300_000, step0=300)
    kw = branch_monitor_kwargs(store_dir, "main", 505, precision="bf16", config_overrides={"precision": "bf16"})
    assert kw == {
        "parent": "main", "branch_step": 505, "branch_tokens": 300_000 + 200 * 4000, "precision": "bf16",
        "config": {"precision": "bf16", "opt": {"lr": 3e-4}},
    }
    with open_store(store_dir) as st:
        assert branch_point(st, "main", 299) == (290, 290_000)
        with pytest.raises(LookupError, match="parent run 'nope' is not in the store"):
            branch_monitor_kwargs(st, "nope", 10)
        with pytest.raises(LookupError, match="logged no step at or before step -1"):
            branch_point(st, "main", -1)
    bare = branch_monitor_kwargs(store_dir, "main", 100, inherit_config=False, config_overrides={"x": {"y": 1}})
    assert bare["config"] == {"x": {"y": 1}}


def test_monitor_records_a_branch_from_the_kwargs(store_dir):
    import torch

    from healthwatch.hooks.monitor import Monitor

    write_run(store_dir, "main", range(0, 200, 10), 1000, config={"precision": "nvfp4", "opt": {"lr": 3e-4}})
    kw = branch_monitor_kwargs(store_dir, "main", 100, config_overrides={"precision": "bf16"})
    with Monitor(store=store_dir, run="main-bf16", flush_every_steps=5, **kw) as mon:
        for step in range(100, 120):
            mon.step(step, tokens=100_000 + (step - 100) * 500, loss=torch.tensor(3.0))
    with open_store(store_dir) as st:
        tree = lineage_tree(st, "main-bf16")
    row = tree.filter(tree["run"] == "main-bf16").row(0, named=True)
    assert row["parent"] == "main" and row["branch_step"] == 100 and row["branch_tokens"] == 100_000
    assert row["precision"] == "bf16" and row["parent_precision"] == "nvfp4"
    assert row["config_diff"] == "precision: 'nvfp4' -> 'bf16'" and row["config_changes"] == 1


def test_lineage_tree_depth_first_with_diffs_and_missing_parent(store_dir):
    write_run(store_dir, "root", range(0, 100, 10), 1000, config={"precision": "nvfp4", "lr": 1})
    write_run(store_dir, "b-late", range(80, 100, 10), 1000, precision="bf16", parent="root", branch_step=80,
              branch_tokens=80_000, config={"precision": "bf16", "lr": 1})
    write_run(store_dir, "b-early", range(20, 60, 10), 1000, precision="bf16", parent="root", branch_step=20,
              branch_tokens=20_000, config={"precision": "bf16", "lr": 1})
    write_run(store_dir, "b-early-lr", range(40, 60, 10), 1000, precision="bf16", parent="b-early", branch_step=40,
              branch_tokens=40_000, config={"precision": "bf16", "lr": 2})
    write_run(store_dir, "orphan", range(0, 10), 1000, precision="bf16", parent="gone", branch_step=5)
    with open_store(store_dir) as st:
        tree = lineage_tree(st, "b-early-lr")  # any member gives the whole tree
        assert list(tree.columns) == list(TREE_SCHEMA)
        assert tree["run"].to_list() == ["root", "b-early", "b-early-lr", "b-late"]
        assert tree["depth"].to_list() == [0, 1, 2, 1]
        by = {r["run"]: r for r in tree.iter_rows(named=True)}
        assert by["root"]["config_diff"] is None and by["root"]["missing_parent"] is False
        assert by["b-early"]["config_diff"] == "precision: 'nvfp4' -> 'bf16'"
        assert by["b-early-lr"]["config_diff"] == "lr: 1 -> 2" and by["b-early-lr"]["parent_precision"] == "bf16"
        orphan = lineage_tree(st, "orphan")
        assert orphan["run"].to_list() == ["orphan"] and orphan["missing_parent"].to_list() == [True]
        assert orphan["config_diff"].to_list() == [None]
        assert lineage_tree(st, "nobody").height == 0
        assert orphan_branches(st)["run"].to_list() == ["orphan"]
