"""Read functions of the signals panel: worst layers now (by value and by rise), expert x layer load."""

from __future__ import annotations

import math

import numpy as np
import pytest

import healthwatch as hw
from healthwatch.query.signals import expert_load_matrix, signal_metrics, worst_layers
from healthwatch.store import StoreWriter, init_store


def _store(root):
    init_store(root)
    w = StoreWriter(root, "r", attempt=1)
    w.write("runs", {"parent": [None], "branch_step": [None], "branch_tokens": [None], "precision": ["nvfp4"],
                     "config": ["{}"], "created": [0.0], "schema_version": ["1.0"]})
    w.write("attempts", {"attempt": [1], "start_step": [0], "started_at": [0.0], "host": ["h"], "reason": ["start"],
                         "schema_version": ["1.0"]})
    # fp4_saturation of 3 layers at steps 0..200: layer 0 flat 0.03, layer 1 0.02 -> 0.08 (x4),
    # layer 2 flat 0.05. At step 200 with a 100-step window: rises 0, +100 % (0.04 at step 100), 0.
    cols: dict[str, list] = {k: [] for k in ("attempt", "step", "tokens", "layer", "layer_type", "metric", "value")}
    for step in range(0, 201, 10):
        for layer, v in ((0, 0.03), (1, 0.02 + 0.0003 * step), (2, 0.05)):
            for k, x in zip(cols, (1, step, step, layer, "mamba", "fp4_saturation", v)):
                cols[k].append(x)
    cols["metric"][-1] = "wgrad_norm"   # one core metric row: not a signal metric
    w.write("layer_stats", cols)
    w.write("expert_load", {"attempt": [1, 1, 1], "step": [100, 100, 200], "tokens": [100, 100, 200],
                            "layer": [1, 3, 1], "counts": [[6, 2, 0, 0], [1, 1, 1, 1], [8, 0, 0, 0]]})


def test_worst_layers_and_metrics(store_dir):
    _store(store_dir)
    st = hw.open_store(store_dir)
    assert signal_metrics(st, "r") == ["fp4_saturation"]
    df = worst_layers(st, "r", "fp4_saturation", k=2, window=100)
    assert df["layer"].to_list() == [1, 2] or df["layer"].to_list() == [1, 0]
    top = df.row(0, named=True)
    assert top["layer"] == 1 and top["step"] == 200
    assert top["value"] == pytest.approx(0.08) and top["before"] == pytest.approx(0.05)
    assert top["rise"] == pytest.approx(0.6)
    low = worst_layers(st, "r", "fp4_saturation", k=1, lowest=True)
    assert low["layer"].to_list() == [0]
    assert worst_layers(st, "r", "router_entropy").height == 0
    with pytest.raises(ValueError):
        worst_layers(st, "r", "fp4_saturation", k=0)


def test_expert_load_matrix(store_dir):
    _store(store_dir)
    st = hw.open_store(store_dir)
    layers, at, mat = expert_load_matrix(st, "r", 150)
    assert (layers, at) == ([1, 3], 100)
    assert np.allclose(mat, [[0.75, 0.25, 0, 0], [0.25, 0.25, 0.25, 0.25]])
    layers, at, mat = expert_load_matrix(st, "r", 50)
    assert layers == [] and at is None and mat.size == 0
    assert math.isclose(expert_load_matrix(st, "r", 10**6)[2][0, 0], 1.0)
