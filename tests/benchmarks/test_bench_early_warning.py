"""The early-warning benchmark in quick mode: real (tiny) training runs, the default pack, the band exit.

Structure and definitions only, never timing: the recorded runs are real demo-trainer runs of a
tiny model; the band exit of each run is recomputed here straight from the recorded Parquet with
plain numpy, independently of ``healthwatch.band``.

A rule must fire in the quick runs, or their detection and lead checks check nothing: the quick
fault is ``mtp_starvation``, whose lost MTP gradients ``MTPGradientStarved`` sees within a few
steps of onset (the step is recomputed here with numpy from the recorded gradient norms). The
fault's divergence (its x1000 learning-rate ramp from onset + 40) starts only at step 80 of the
90, so a quick run leaves its band late or not at all (seed 2 at step 88, seed 1 not); the lead
of the runs that do is checked here, and the LEAD is always checked on a full-size recorded run
with an exit: the alert tests' ``diverging`` fixture (``ultra``, tuning seed 11), evaluated by
the benchmark's own code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks import bench_early_warning as ew

SEEDS = (1, 2)
FAULT = "mtp_starvation"
SCENARIOS = ("healthy", FAULT)
#: The full-size recorded run with a band exit (tests/alerts/data/make_recorded.py: ultra, seed 11).
FIXTURES = Path(__file__).resolve().parent.parent / "alerts" / "data"


def numpy_band_exit(loss: np.ndarray, onset: int) -> int | None:
    """First step >= onset above median + 4*1.4826*MAD of the previous 50 values (loss[i] is step i)."""
    for i in range(max(onset, 50), loss.size):
        w = loss[i - 50:i]
        med = np.median(w)
        if not np.isfinite(loss[i]) or loss[i] > med + 4 * 1.4826 * np.median(np.abs(w - med)):
            return i
    return None


def numpy_collapse_steps(g: np.ndarray, window: int = 50, k: float = 1.0, min_rel: float = 0.9,
                         min_points: int = 20) -> list[int]:
    """Steps where g[t] < median(w) - max(k * 1.4826 * MAD(w), min_rel * |median(w)|), w = the finite
    values of the ``window`` steps before t (at least ``min_points``): MTPGradientStarved's condition,
    written from its rule text (g[i] is step i)."""
    out = []
    for t in range(g.size):
        w = g[max(0, t - window):t]
        w = w[np.isfinite(w)]
        if w.size < min_points or not np.isfinite(g[t]):
            continue
        med = np.median(w)
        if g[t] < med - max(k * 1.4826 * np.median(np.abs(w - med)), min_rel * abs(med)):
            out.append(t)
    return out


def _scalar(data: Path, stem: str, name: str) -> np.ndarray:
    sc = pq.read_table(data / f"{stem}.scalars.parquet").to_pydict()
    pts = sorted((s, v) for s, n, v in zip(sc["step"], sc["name"], sc["value"]) if n == name)
    assert [s for s, _ in pts] == list(range(len(pts))), name  # logged every step
    return np.array([v for _, v in pts])


def test_mtp_rule_spec_is_what_the_numpy_check_assumes() -> None:
    """The numpy condition above is the pack's rule: same detector and parameters, no `for`."""
    from healthwatch.alerts.loader import load_pack

    rule = load_pack("default").get("MTPGradientStarved").rule
    d = rule.expr.body
    assert (rule.expr.kind, d.metric, d.method, d.direction) == ("spike", "grad_norm/mtp", "mad", "down")
    assert (d.window, d.k, d.min_rel, d.min_points, d.min_delta) == (50, 1.0, 0.9, 20, 0.0)
    assert rule.for_ == 0 and rule.min_step == 0


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Quick-size runs of every (scenario, seed), recorded once for the module."""
    data = tmp_path_factory.mktemp("ew") / "runs"
    for seed in SEEDS:
        for scen in SCENARIOS:
            ew.record_run(scen, seed, data, ew.QUICK)
    return data


def test_seed_sets_are_disjoint_and_named() -> None:
    assert not set(ew.TUNING_SEEDS) & (set(ew.EVAL_SEEDS) | set(ew.PREVIOUS_EVAL_SEEDS))
    assert not set(ew.EVAL_SEEDS) & set(ew.PREVIOUS_EVAL_SEEDS)  # the fresh set is fresh
    fresh = set(ew.MTP_EVAL_SEEDS)
    assert len(fresh) >= 10 and not fresh & (set(ew.TUNING_SEEDS) | set(ew.EVAL_SEEDS) | set(ew.PREVIOUS_EVAL_SEEDS))
    assert len(ew.EVAL_SEEDS) >= 10
    assert 0 not in ew.EVAL_SEEDS and not {101, 202, 303, 404, 505} & set(ew.EVAL_SEEDS)
    assert ew.scenarios()[0] == "healthy" and {"mtp_starvation", "residual_growth"} <= set(ew.scenarios())


@pytest.mark.slow
def test_quick_evaluation_structure_and_band_exit(recorded: Path) -> None:
    results = [ew.evaluate_run(recorded, scen, seed) for seed in SEEDS for scen in SCENARIOS]
    for r in results:
        assert r["errors"] == {}
        sc = pq.read_table(recorded / f"{r['scenario']}-s{r['seed']}.scalars.parquet").to_pydict()
        pts = sorted((s, v) for s, n, v in zip(sc["step"], sc["name"], sc["value"]) if n == "loss/train")
        assert [s for s, _ in pts] == list(range(ew.QUICK.steps))  # logged every step, no intervention
        loss = np.array([v for _, v in pts])
        onset = 0 if r["scenario"] == "healthy" else ew.QUICK.onset
        expected = numpy_band_exit(loss, onset)
        assert (None if r["exit"] is None else r["exit"]["step"]) == expected, r["scenario"]
        # every rule of the pack is reported, with its transitions in step order
        assert set(r["rules"]) >= {"LossSpike", "MaxVioHigh", "MTPLeadsTrainLoss"}
        for rule in r["rules"].values():
            assert rule["firing"] == sorted(rule["firing"]) and rule["pending"] == sorted(rule["pending"])
    summary = ew.summarize(results)
    healthy = summary["healthy"]
    assert healthy["runs"] == len(SEEDS) and healthy["steps"] == len(SEEDS) * ew.QUICK.steps
    expected_pending = sum(len(r["rules"][n]["pending"]) for r in results if r["scenario"] == "healthy"
                           for n in r["rules"])
    assert healthy["pending_total"] == expected_pending
    assert healthy["pending_per_1k"] == pytest.approx(1000 * expected_pending / healthy["steps"])
    fault = summary["scenarios"][FAULT]
    assert fault["runs"] == len(SEEDS) and fault["exits"] == sum(1 for r in results if r["scenario"] == FAULT
                                                                 and r["exit"] is not None)
    # A rule must fire in every quick fault run: MTPGradientStarved, at the first step where the
    # recorded MTP gradient norm collapses (numpy), never before the onset and never when healthy.
    delays: list[int] = []
    leads: list[int] = []
    for r in results:
        g = _scalar(recorded, f"{r['scenario']}-s{r['seed']}", "grad_norm/mtp")
        want = numpy_collapse_steps(g)
        got = r["rules"]["MTPGradientStarved"]["firing"]
        if r["scenario"] == "healthy":
            assert want == [] and got == [], r["seed"]
            continue
        assert want and want[0] >= r["onset"], r["seed"]  # the inputs: lost gradients from the onset on
        assert got[0] == want[0], r["seed"]
        firsts = [f for rule in r["rules"].values() for f in rule["firing"] if f >= r["onset"]]
        delays.append(min(firsts) - r["onset"])
        if r["exit"] is not None:  # the lead of a quick run that diverged: exit (numpy) minus first alert
            leads.append(r["exit"]["step"] - min(firsts))
    pack = fault["rules"]["PACK"]
    assert pack["detected"] == len(SEEDS)
    assert sorted(pack["delays"]) == sorted(delays)
    assert sorted(pack["leads"]) == sorted(leads) and pack["early"] == sum(x >= ew.EARLY_STEPS for x in leads)
    assert fault["rules"]["MTPGradientStarved"]["detected"] == len(SEEDS)
    titles = [t.title for t in ew.tables(summary)]
    assert titles[0] == "Against the issue's targets" and titles[1].startswith("The pack")
    assert titles[-1] == "Healthy runs"
    # the targets row of the quick fault: every run caught within 100 steps of onset (both seeds)
    targets = {row[0]: row for row in ew.tables(summary)[0].rows}
    assert targets[FAULT][4] == f"{len(SEEDS)}/{len(SEEDS)}" and targets[FAULT][2] == f"{fault['exits']}/{len(SEEDS)}"
    section = ew.section({"early-warning:evaluate": {"summary": summary, "spec": ew.QUICK.describe(),
                                                     "eval_seeds": list(SEEDS), "tuning_seeds": []}})
    assert section.tables and {b.what for b in section.budgets} == {"healthy runs: firing alerts",
                                                                     "healthy runs: pending episodes"}


def test_lead_over_the_band_exit_on_a_full_size_recording(tmp_path: Path) -> None:
    """The lead checks on a run whose loss leaves its band: the full-size ``ultra`` recording of
    tuning seed 11. Band exit and MTPGradientStarved's first step come from numpy on the recorded
    series; the pack's lead is the exit minus its first firing alert, at least the MTP rule's lead."""
    data = tmp_path / "runs"
    data.mkdir()
    stem = "ultra-s11"
    for table in ("scalars", "layer_stats"):
        shutil.copyfile(FIXTURES / f"diverging.{table}.parquet", data / f"{stem}.{table}.parquet")
    (data / f"{stem}.json").write_text(json.dumps({"scenario": "ultra", "seed": 11,
                                                   "spec": {"steps": ew.FULL.steps, "onset": ew.FULL.onset}}))
    r = ew.evaluate_run(data, "ultra", 11)
    assert r["errors"] == {}
    loss = _scalar(data, stem, "loss/train")
    exit_step = numpy_band_exit(loss, ew.FULL.onset)
    assert exit_step is not None and r["exit"]["step"] == exit_step
    collapse = numpy_collapse_steps(_scalar(data, stem, "grad_norm/mtp"))
    assert collapse and ew.FULL.onset <= collapse[0] < exit_step
    assert r["rules"]["MTPGradientStarved"]["firing"][0] == collapse[0]
    summary = ew.summarize([r])["scenarios"]["ultra"]
    assert summary["exits"] == 1
    assert summary["rules"]["MTPGradientStarved"]["leads"] == [exit_step - collapse[0]]
    firsts = [f for rule in r["rules"].values() for f in rule["firing"] if f >= r["onset"]]
    pack = summary["rules"]["PACK"]
    assert pack["leads"] == [exit_step - min(firsts)] and pack["leads"][0] >= exit_step - collapse[0]
    assert pack["early"] == int(pack["leads"][0] >= ew.EARLY_STEPS)
    tps = r["tokens_per_step"]
    assert tps == ew.FULL.batch_size * ew.FULL.seq_len  # tokens counted by the trainer, 128 per step
    lead_steps, lead_tokens = ew._fmt_lead(pack["leads"], tps)
    assert lead_steps == f"{pack['leads'][0]:g} / {pack['leads'][0]:g}"
    assert lead_tokens == f"{pack['leads'][0] * tps:,.0f} / {pack['leads'][0] * tps:,.0f}"


def test_jobs_reuse_recorded_runs(tmp_path: Path) -> None:
    jobs = ew.jobs(True, tmp_path, tmp_path / "runs")
    assert [j.task for j in jobs] == ["record", "evaluate"]
    assert jobs[0].params["seeds"] == list(ew.EVAL_SEEDS[:2]) and jobs[0].params["data"] == str(tmp_path / "runs")
