"""One read path: every reader equals a naive reference computed from the rows written.

The reference is plain Python over the rows this test generated (never the store). Random runs get
several attempts (rollbacks), and writes, self-merges, writer closes (rollup flushes) and
compactions happen in random order between them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st_

from healthwatch import compare, query
from healthwatch.alerts.detectors import Sources
from healthwatch.store import END_EVENT, Store, StoreWriter, attempt_row, compact_store, run_row

LAYERS = 3
METRIC = "maxvio"


def _layer_cols(attempt: int, steps: list[int], values: list[list[float]]) -> dict:
    n = len(steps)
    return {
        "attempt": [attempt] * (n * LAYERS), "step": [s for s in steps for _ in range(LAYERS)],
        "tokens": [s * 10 for s in steps for _ in range(LAYERS)],
        "layer": [lay for _ in steps for lay in range(LAYERS)],
        "layer_type": ["moe"] * (n * LAYERS), "metric": [METRIC] * (n * LAYERS),
        "value": [values[i][lay] for i in range(n) for lay in range(LAYERS)],
    }


def test_heatmap_after_rollback_over_compacted_rollup_regression(tmp_path: Path) -> None:
    """Issue 15 repro: attempt 1 writes 100.0 for steps 0-1999, compaction, attempt 2 restarts at
    1000 writing 1.0; the max over steps >= 1000 is 1.0 in every reader."""
    root = tmp_path / "s"
    w1 = StoreWriter(root, "r", attempt=1)
    w1.write("runs", run_row(precision="bf16"))
    w1.write("attempts", attempt_row(attempt=1, start_step=0))
    steps = list(range(2000))
    w1.write("layer_stats", {"attempt": [1] * 2000, "step": steps, "tokens": steps, "layer": [0] * 2000,
                             "layer_type": ["moe"] * 2000, "metric": ["maxvio"] * 2000, "value": [100.0] * 2000})
    w1.close()
    compact_store(root)
    w2 = StoreWriter(root, "r", attempt=2)
    w2.write("attempts", attempt_row(attempt=2, start_step=1000))
    s2 = list(range(1000, 2000))
    w2.write("layer_stats", {"attempt": [2] * 1000, "step": s2, "tokens": s2, "layer": [0] * 1000,
                             "layer_type": ["moe"] * 1000, "metric": ["maxvio"] * 1000, "value": [1.0] * 1000})
    store = Store(root)
    eff = store.sql("SELECT max(value) FROM layer_stats_effective WHERE run = 'r' AND step >= 1000").fetchone()
    assert eff == (1.0,)
    hm = query.heatmap(store, "r", "maxvio", max_buckets=4, agg="max")
    got = {r["step"]: r["value"] for r in hm.iter_rows(named=True)}
    assert got == {0: 100.0, 500: 100.0, 1000: 1.0, 1500: 1.0}
    w2.close()  # the second attempt's rollups are published: same answer from them
    compact_store(root)
    hm = query.heatmap(Store(root), "r", "maxvio", max_buckets=4, agg="max")
    assert {r["step"]: r["value"] for r in hm.iter_rows(named=True)} == got


# --------------------------------------------------------------------------------------------
# the property test


@st_.composite
def scenarios(draw: st_.DrawFn) -> dict:
    n_attempts = draw(st_.integers(1, 3))
    last = draw(st_.integers(150, 2600))
    starts = [0] + sorted(draw(st_.lists(st_.integers(1, last - 1), min_size=n_attempts - 1,
                                         max_size=n_attempts - 1)))
    attempts = []
    for i, start in enumerate(starts):
        end = draw(st_.integers(start + 1, start + 2600)) if i == len(starts) - 1 or True else start
        every = draw(st_.sampled_from([1, 1, 3, 7]))
        steps = list(range(start, end, every))
        chunks = draw(st_.sampled_from([1, 2, 4, 6, 25]))  # 25: small flushes (rollups deferred per bucket)
        ops = draw(st_.lists(st_.sampled_from(["merge", "compact", "none"]), min_size=chunks, max_size=chunks))
        close = draw(st_.booleans())
        seed = draw(st_.integers(0, 2**31 - 1))
        attempts.append({"attempt": i + 1, "start": start, "steps": steps, "chunks": chunks, "ops": ops,
                         "close": close, "seed": seed})
    return {"attempts": attempts, "max_buckets": draw(st_.sampled_from([3, 7, 40])),
            "agg": draw(st_.sampled_from(["mean", "max", "min", "last"]))}


def _write(root: Path, sc: dict) -> tuple[list[tuple], list[tuple], list[tuple], list[tuple]]:
    """Write the scenario; return the raw rows written: layer rows, scalar rows, attempts, expert load."""
    erows: list[tuple] = []  # (attempt, step, layer, counts)
    lrows: list[tuple] = []  # (attempt, step, tokens, layer, value)
    srows: list[tuple] = []  # (attempt, step, tokens, value)
    atts: list[tuple] = []
    for a in sc["attempts"]:
        att = a["attempt"]
        w = StoreWriter(root, "r", attempt=att, merge_fanout=2)
        if att == 1:
            w.write("runs", run_row(precision="bf16", created=1.0))
        w.write("attempts", attempt_row(attempt=att, start_step=a["start"], started_at=float(att)))
        atts.append((att, a["start"]))
        rng = np.random.default_rng(a["seed"])
        steps = a["steps"]
        bounds = np.linspace(0, len(steps), a["chunks"] + 1).astype(int)
        for c in range(a["chunks"]):
            part = steps[bounds[c]:bounds[c + 1]]
            if not part:
                continue
            vals = np.round(rng.normal(size=(len(part), LAYERS)) * 10, 3).tolist()
            w.write("layer_stats", _layer_cols(att, part, vals))
            sv = np.round(rng.normal(size=len(part)), 4).tolist()
            w.write("scalars", {"attempt": [att] * len(part), "step": part, "tokens": [s * 10 for s in part],
                                "name": ["loss/train"] * len(part), "value": sv, "wall_time": [0.0] * len(part)})
            sampled = [s for s in part if s % 5 == 0]
            if sampled:
                counts = [[int(x) for x in rng.integers(0, 9, 4)] for _ in sampled for _ in range(2)]
                w.write("expert_load", {"attempt": [att] * (2 * len(sampled)),
                                        "step": [s for s in sampled for _ in range(2)],
                                        "tokens": [s * 10 for s in sampled for _ in range(2)],
                                        "layer": [lay for _ in sampled for lay in (0, 2)], "counts": counts})
                erows += [(att, s, lay, counts[2 * i + j]) for i, s in enumerate(sampled) for j, lay in enumerate((0, 2))]
            for i, s in enumerate(part):
                srows.append((att, s, s * 10, sv[i]))
                for lay in range(LAYERS):
                    lrows.append((att, s, s * 10, lay, vals[i][lay]))
            if a["ops"][c] == "merge":
                w.compact_own("layer_stats")
                w.compact_own("scalars")
            elif a["ops"][c] == "compact":
                compact_store(root)
        if a["close"]:
            w.write("events", {"attempt": [att], "step": [steps[-1]], "tokens": [steps[-1] * 10], "kind": [END_EVENT],
                               "message": ["closed"], "wall_time": [0.0]})
            w.close()
    return lrows, srows, atts, erows


def _on_path(atts: list[tuple], attempt: int | None):
    starts = dict(atts)
    upto = max(starts) if attempt is None else attempt

    def keep(a: int, s: int) -> bool:
        if a > upto:
            return False
        later = [st for b, st in starts.items() if a < b <= upto]
        return not later or s < min(later)

    return keep


def _ref_heatmap(rows: list[tuple], keep, max_buckets: int, agg: str) -> dict:
    eff = [r for r in rows if keep(r[0], r[1])]
    if not eff:
        return {}
    lo, hi = min(r[1] for r in eff), max(r[1] for r in eff)
    w = max(1, math.ceil((hi - lo + 1) / max_buckets))
    fits = [s for s in (100, 1000, 10000) if s <= w]
    if fits:
        w = -(-w // max(fits)) * max(fits)
    cells: dict = defaultdict(list)
    for _a, s, _t, lay, v in eff:
        cells[(lay, (s // w) * w)].append((s, v))
    out = {}
    for k, vs in cells.items():
        vals = [v for _, v in vs]
        out[k] = {"mean": sum(vals) / len(vals), "max": max(vals), "min": min(vals),
                  "last": max(vs)[1]}[agg]
    return out


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                               HealthCheck.too_slow])
@given(sc=scenarios())
def test_every_reader_equals_naive_reference(tmp_path_factory: pytest.TempPathFactory, sc: dict) -> None:
    root = tmp_path_factory.mktemp("prop") / "s"
    lrows, srows, atts, erows = _write(root, sc)
    if sc["attempts"][-1]["ops"] and sc["attempts"][-1]["ops"][0] == "compact":
        compact_store(root)
    store = Store(root)
    last_att = max(a for a, _ in atts)
    for attempt in (None, *sorted({a for a, _ in atts})):
        keep = _on_path(atts, attempt)
        # heatmap
        hm = query.heatmap(store, "r", METRIC, max_buckets=sc["max_buckets"], agg=sc["agg"], attempt=attempt)
        got = {(r["layer"], r["step"]): r["value"] for r in hm.iter_rows(named=True)}
        ref = _ref_heatmap(lrows, keep, sc["max_buckets"], sc["agg"])
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-9), (k, attempt)
        # series (exact when it fits in max_points)
        eff_s = sorted((s, v) for a, s, _t, v in srows if keep(a, s))
        ser = query.series(store, "r", "loss/train", max_points=10**6, attempt=attempt)
        assert list(zip(ser["step"].to_list(), ser["value"].to_list())) == eff_s
        # a downsampled series keeps the extremes
        small = query.series(store, "r", "loss/train", max_points=20, attempt=attempt)
        if eff_s:
            assert max(small["value"]) == max(v for _, v in eff_s)
            assert min(small["value"]) == min(v for _, v in eff_s)
        # per-layer series of layer 1
        eff_l = sorted((s, v) for a, s, _t, lay, v in lrows if lay == 1 and keep(a, s))
        lser = query.series(store, "r", METRIC, layer=1, max_points=10**6, attempt=attempt)
        assert list(zip(lser["step"].to_list(), lser["value"].to_list())) == eff_l
        # a bounded window (read by the per-run scan, without SQL), on the path and with ghosts flagged
        if eff_l:
            a0 = eff_l[len(eff_l) // 3][0]
            b0 = a0 + 700
            win = query.series(store, "r", METRIC, layer=1, step_min=a0, step_max=b0, max_points=10**6,
                               attempt=attempt)
            assert list(zip(win["step"].to_list(), win["value"].to_list())) == [(s, v) for s, v in eff_l
                                                                                if a0 <= s <= b0]
            ghosts = query.series(store, "r", METRIC, layer=1, step_min=a0, step_max=b0, max_points=10**6,
                                  attempt=attempt, include_superseded=True)
            ref_g = sorted((not keep(a, s), s, a, v) for a, s, _t, lay, v in lrows if lay == 1 and a0 <= s <= b0)
            assert sorted(zip(*ghosts.select("superseded", "step", "attempt", "value").to_dict(as_series=False)
                              .values())) == ref_g
        # profiles at a few steps
        path_steps = sorted({s for a, s, *_ in lrows if keep(a, s)})
        asks = path_steps[:: max(1, len(path_steps) // 3)][:4]
        prof = query.layer_profiles(store, "r", METRIC, asks, attempt=attempt)
        for ask in asks:
            at = max(s for s in path_steps if s <= ask)
            ref_p = sorted((lay, v) for a, s, _t, lay, v in lrows if s == at and keep(a, s))
            got_p = sorted(zip(*prof.filter(prof["asked"] == ask).select("layer", "value").to_dict(as_series=False)
                               .values()))
            assert got_p == ref_p
        # expert load: vectors at the sample at or before a step, on the path
        esteps = sorted({s for a, s, *_ in erows if keep(a, s)})
        for ask in esteps[:: max(1, len(esteps) // 3)][:3]:
            got_e = query.expert_load_at(store, "r", ask, attempt=attempt)
            ref_e = sorted((lay, c) for a, s, lay, c in erows if s == ask and keep(a, s))
            assert sorted(zip(got_e["layer"].to_list(), got_e["counts"].to_list())) == ref_e
        assert query.expert_load_steps(store, "r", attempt=attempt) == esteps
        # divergence buckets (mean of the scalar per bucket on the path)
        if eff_s:
            lo, hi = eff_s[0][0], eff_s[-1][0]
            bm = query.bucket_means(store, "r", [query.Signal("loss/train")], attempt, lo, hi, 5)
            width = max(1, math.ceil((hi - lo + 1) / 5))
            groups: dict = defaultdict(list)
            for s, v in eff_s:
                groups[(s - lo) // width].append(v)
            assert bm["value"].to_list() == pytest.approx([sum(g) / len(g) for _, g in sorted(groups.items())])
        # alert sources: the per-attempt view holds exactly the path's rows
        if attempt is not None:
            view = Sources.attempt_path(attempt).scalars
            n = store.sql(f"SELECT count(*) FROM {view} t WHERE t.run = 'r'").fetchone()[0]
            assert n == len(eff_s)
    # effective views, the comparison's effective span and the runs overview
    keep = _on_path(atts, None)
    eff_tokens = [t for a, s, t, _v in srows if keep(a, s)]
    assert compare._token_span(store, "r", "loss/train") == (min(eff_tokens), max(eff_tokens), len(eff_tokens))
    n_eff = store.sql("SELECT count(*) FROM layer_stats_effective WHERE run = 'r'").fetchone()[0]
    assert n_eff == sum(1 for r in lrows if keep(r[0], r[1]))
    ov = query.runs_overview(store).row(0, named=True)
    assert ov["attempts"] == len(atts)
    assert ov["last_step"] == max(s for _a, s, _t, _v in srows)
    assert ov["finished"] == sc["attempts"][-1]["close"]
    assert ov["status"] == ("finished" if sc["attempts"][-1]["close"] else "idle")
    assert last_att == len(sc["attempts"])


def test_loss_band_exit_reads_the_path_of_an_attempt(tmp_path: Path) -> None:
    """The band exit of the diverged attempt (rolled back later) comes from that attempt's rows only."""
    from healthwatch.band import band_exit

    root = tmp_path / "s"
    rng = np.random.default_rng(3)
    base = (2.0 + 0.01 * rng.standard_normal(600)).tolist()
    bad = [v + (0.0 if s < 450 else 0.5 * (s - 449)) for s, v in enumerate(base)]
    w1 = StoreWriter(root, "r", attempt=1)
    w1.write("runs", run_row())
    w1.write("attempts", attempt_row(attempt=1, start_step=0))
    w1.write("scalars", {"attempt": [1] * 600, "step": list(range(600)), "tokens": [s * 8 for s in range(600)],
                         "name": ["loss/train"] * 600, "value": bad, "wall_time": [0.0] * 600})
    w2 = StoreWriter(root, "r", attempt=2)
    w2.write("attempts", attempt_row(attempt=2, start_step=400))
    w2.write("scalars", {"attempt": [2] * 200, "step": list(range(400, 600)), "tokens": [s * 8 for s in range(400, 600)],
                         "name": ["loss/train"] * 200, "value": base[400:], "wall_time": [0.0] * 200})
    store = Store(root)
    want = band_exit(list(range(600)), bad, tokens=[s * 8 for s in range(600)])
    got = query.loss_band_exit(store, "r", attempt=1)
    assert want is not None and got is not None and (got.step, got.value) == (want.step, want.value)
    assert got.step >= 450
    eff = band_exit(list(range(600)), base[:400] + base[400:], tokens=[s * 8 for s in range(600)])
    got_eff = query.loss_band_exit(store, "r")
    assert (None if eff is None else eff.step) == (None if got_eff is None else got_eff.step)
