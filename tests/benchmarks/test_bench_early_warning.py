"""The early-warning benchmark in quick mode: real (tiny) training runs, the default pack, the band exit.

Structure and definitions only, never timing: the recorded runs are real demo-trainer runs of a
tiny model; the band exit of each run is recomputed here straight from the recorded Parquet with
plain numpy, independently of ``healthwatch.band``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks import bench_early_warning as ew

SEEDS = (1, 2)
SCENARIOS = ("healthy", "lr_excursion")


def numpy_band_exit(loss: np.ndarray, onset: int) -> int | None:
    """First step >= onset above median + 4*1.4826*MAD of the previous 50 values (loss[i] is step i)."""
    for i in range(max(onset, 50), loss.size):
        w = loss[i - 50:i]
        med = np.median(w)
        if not np.isfinite(loss[i]) or loss[i] > med + 4 * 1.4826 * np.median(np.abs(w - med)):
            return i
    return None


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Quick-size runs of every (scenario, seed), recorded once for the module."""
    data = tmp_path_factory.mktemp("ew") / "runs"
    for seed in SEEDS:
        for scen in SCENARIOS:
            ew.record_run(scen, seed, data, ew.QUICK)
    return data


def test_seed_sets_are_disjoint_and_named() -> None:
    assert not set(ew.TUNING_SEEDS) & set(ew.EVAL_SEEDS)
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
    lr = summary["scenarios"]["lr_excursion"]
    assert lr["runs"] == len(SEEDS) and lr["exits"] == sum(1 for r in results if r["scenario"] == "lr_excursion"
                                                            and r["exit"] is not None)
    pack = lr["rules"]["PACK"]
    for r in (r for r in results if r["scenario"] == "lr_excursion"):
        firsts = [f for rule in r["rules"].values() for f in rule["firing"] if f >= r["onset"]]
        if firsts and r["exit"] is not None:
            assert r["exit"]["step"] - min(firsts) in pack["leads"]
    assert pack["detected"] == sum(1 for r in results if r["scenario"] == "lr_excursion"
                                   and any(f >= r["onset"] for rule in r["rules"].values() for f in rule["firing"]))
    titles = [t.title for t in ew.tables(summary)]
    assert titles[0].startswith("The pack") and titles[-1] == "Healthy runs"
    section = ew.section({"early-warning:evaluate": {"summary": summary, "spec": ew.QUICK.describe(),
                                                     "eval_seeds": list(SEEDS), "tuning_seeds": []}})
    assert section.tables and {b.what for b in section.budgets} == {"healthy runs: firing alerts",
                                                                     "healthy runs: pending episodes"}


def test_jobs_reuse_recorded_runs(tmp_path: Path) -> None:
    jobs = ew.jobs(True, tmp_path, tmp_path / "runs")
    assert [j.task for j in jobs] == ["record", "evaluate"]
    assert jobs[0].params["seeds"] == list(ew.EVAL_SEEDS[:2]) and jobs[0].params["data"] == str(tmp_path / "runs")
