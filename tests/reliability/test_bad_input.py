"""Bad input gets one clear error or is kept as it is (DESIGN §5 "Values", §10).

* NaN, ±Inf and extreme finite values in every kind of signal are stored and read back
  bit-identical, and alerts fire on them (``nonfinite`` on NaN/±Inf, ``threshold`` on 1e308);
* run names that could escape the store (``/``, ``..``, NUL, 10k characters, lone surrogates)
  raise ``ValueError`` at ``Monitor``/``StoreWriter`` construction and nothing is written
  anywhere; bad metric names are dropped, counted and warned about once;
* malformed, truncated and hostile YAML rule files raise ``RuleFileError`` and never run code;
* corrupt or foreign Parquet files in the store are skipped with one warning naming the file;
* a store written by a newer major schema is refused with ``NewerSchemaError``.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from reliability_helpers import child_env, hw_command, toy_model, train

import healthwatch as hw
from healthwatch.alerts import Evaluator, RuleFileError, load_file, load_text
from healthwatch.schema import NewerSchemaError, validate_metric_name
from healthwatch.store import StoreWriter, compact_store

WEIRD = [math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.0, 2.5]


def bits(x: float) -> int:
    """The IEEE-754 bit pattern of a float64."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def files_under(path: Path) -> set[Path]:
    """Every file and directory below ``path``."""
    return set(path.rglob("*"))


# --------------------------------------------------------------------------------------------
# NaN / Inf / huge values


def test_nonfinite_and_extreme_values_round_trip_bit_identical_through_the_monitor(tmp_path: Path) -> None:
    """Loss, MTP losses, lr and extra scalars carry NaN/±Inf/±1e308 into the store unchanged."""
    store = tmp_path / "store"
    model = toy_model()
    mon = hw.Monitor(store=store, run="weird", flush_every_steps=3, expert_load_every=0)
    mon.watch(model)
    steps = range(len(WEIRD))
    import torch

    for step in steps:
        v = WEIRD[step]
        out = model(torch.arange(8).reshape(1, 8) % 32).float().pow(2).mean()
        out.backward()
        mon.after_backward()
        model.zero_grad(set_to_none=False)
        mon.log({"weird/host": v, "weird/tensor": torch.tensor(v, dtype=torch.float64)}, step=step,
                tokens=8 * (step + 1))
        mon.step(step, tokens=8 * (step + 1), loss=v, mtp_losses=[torch.tensor(v, dtype=torch.float64), v], lr=v)
    mon.close()
    assert mon.dropped_rows == 0
    st = hw.open_store(store)
    for name in ("loss/train", "loss/mtp_1", "loss/mtp_2", "lr", "weird/host", "weird/tensor"):
        got = st.sql("SELECT step, value FROM scalars WHERE run = 'weird' AND name = ? ORDER BY step", [name]).fetchall()
        assert [s for s, _ in got] == list(steps), name
        assert [bits(v) for _, v in got] == [bits(float(w)) for w in WEIRD], (name, got)
    # The same values also survive compaction (a DuckDB rewrite of the segments) and reach the rollups.
    compact_store(store)
    got = st.sql("SELECT value FROM scalars WHERE run = 'weird' AND name = 'weird/host' ORDER BY step").fetchall()
    assert [bits(v) for (v,) in got] == [bits(w) for w in WEIRD]
    rollup = st.sql("SELECT vmax, vmin FROM scalars_rollup WHERE run = 'weird' AND name = 'weird/host' "
                    "AND bucket_size = 100").fetchone()
    assert rollup is not None and (math.isnan(rollup[0]) or math.isinf(rollup[0]))  # never coerced to finite


def test_nonfinite_values_in_every_table_round_trip_and_alerts_fire(tmp_path: Path) -> None:
    """Scalars, layer stats and events keep NaN/±Inf/1e308 bit-identical; nonfinite and threshold fire."""
    store = tmp_path / "store"
    w = StoreWriter(store, "bad", attempt=1)
    n = len(WEIRD)
    steps = np.arange(n, dtype=np.int64)
    w.write("runs", {"parent": [None], "branch_step": [None], "branch_tokens": [None], "precision": ["bf16"],
                     "config": ["{}"], "created": [time.time()], "schema_version": ["1.0"]})
    w.write("attempts", {"attempt": [1], "start_step": [0], "started_at": [time.time()], "host": ["h"],
                         "reason": ["start"], "schema_version": ["1.0"]})
    w.write("scalars", {"attempt": [1] * n, "step": steps, "tokens": steps * 8, "name": ["loss/train"] * n,
                        "value": WEIRD, "wall_time": [1.0] * n})
    w.write("layer_stats", {"attempt": [1] * n, "step": steps, "tokens": steps * 8, "layer": [0] * n,
                            "layer_type": ["moe"] * n, "metric": ["maxvio"] * n, "value": WEIRD})
    st = hw.open_store(store)
    for table, col in (("scalars", "loss/train"), ("layer_stats", "maxvio")):
        key = "name" if table == "scalars" else "metric"
        got = st.sql(f"SELECT value FROM {table} WHERE {key} = ? ORDER BY step", [col]).fetchall()
        assert [bits(v) for (v,) in got] == [bits(x) for x in WEIRD], table
        arrow = pq.read_table(st.files(table, "bad")[0]).column("value").to_pylist()
        assert [bits(v) for v in arrow] == [bits(x) for x in WEIRD], f"{table} file"

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "groups:\n"
        "- name: bad\n"
        "  rules:\n"
        "  - alert: NonFinite\n"
        "    expr: {nonfinite: {}}\n"
        "  - alert: HugeLoss\n"
        "    expr: {threshold: {metric: loss/train, above: 1.0e300}}\n"
        "  - alert: HugeMaxVio\n"
        "    expr: {threshold: {metric: maxvio, aggregate: max, above: 1.0e300}}\n"
    )
    ev = Evaluator(store, load_file(rules), sinks=[])
    try:
        transitions = ev.evaluate_once()
    finally:
        ev.close()
    fired = {(t.alert, t.step) for t in transitions if t.state == "firing"}
    assert ("NonFinite", 0) in fired, fired  # WEIRD[0] is NaN
    assert ("HugeLoss", WEIRD.index(1e308)) in fired, fired
    assert ("HugeMaxVio", WEIRD.index(1e308)) in fired, fired
    nonfinite = [t for t in transitions if t.alert == "NonFinite" and t.state == "firing"]
    assert nonfinite and "loss/train=nan" in (nonfinite[0].detail or "") and "maxvio" in (nonfinite[0].detail or "")


# --------------------------------------------------------------------------------------------
# names


BAD_RUNS = ["a/b", "../escape", "..", "x/../../y", "nul\x00byte", "r" * 10_000, "bad\udcffsurrogate", "",
            "/abs", "with space", "\\win", "-dash-first", "a\nb"]


@pytest.mark.parametrize("name", BAD_RUNS, ids=lambda n: repr(n[:20]))
def test_bad_run_names_are_refused_at_construction_and_nothing_is_written(tmp_path: Path, name: str) -> None:
    """Monitor, StoreWriter and a branch's parent name all refuse the name with a ValueError naming it."""
    store = tmp_path / "sub" / "store"
    before = files_under(tmp_path)
    with pytest.raises(ValueError, match="invalid run name"):
        hw.Monitor(store=store, run=name)
    with pytest.raises(ValueError, match="invalid run name"):
        StoreWriter(store, name)
    with pytest.raises(ValueError, match="invalid run name"):
        hw.Monitor(store=store, run="ok", parent=name, branch_step=10)
    assert files_under(tmp_path) == before, "something was written for a refused name"
    assert not store.exists()


def test_bad_metric_names_are_dropped_counted_and_warned_once(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Monitor.log never raises into the loop: a bad name is dropped, counted, warned about once."""
    bad = ["a\x00b", "x" * 10_000, "bad\udcffname", "", "a..b", "sp ace"]
    for name in bad:
        with pytest.raises(ValueError, match="invalid metric name"):
            validate_metric_name(name)
    store = tmp_path / "store"
    model = toy_model()
    caplog.set_level(logging.WARNING, logger="healthwatch.monitor")
    mon = hw.Monitor(store=store, run="names", flush_every_steps=2, expert_load_every=0)
    mon.watch(model)
    train(mon, model, range(4), extra=lambda s: {**{b: 1.0 for b in bad}, "good/name": float(s)})
    mon.close()
    assert mon.dropped_rows == len(bad) * 4
    warnings = [r.getMessage() for r in caplog.records if r.name == "healthwatch.monitor"]
    assert len(warnings) == 1 and "invalid metric name" in warnings[0], warnings
    st = hw.open_store(store)
    names = {n for (n,) in st.sql("SELECT DISTINCT name FROM scalars").fetchall()}
    assert "good/name" in names and not names & set(bad)
    assert all(p.is_relative_to(store) for p in files_under(tmp_path) if p != store)


# --------------------------------------------------------------------------------------------
# YAML rule files

MARKER_CMD = "touch {marker}"
HOSTILE = [
    "!!python/object/apply:os.system [\"{cmd}\"]\n",
    "groups: !!python/object/apply:os.system [\"{cmd}\"]\n",
    "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: !!python/object/apply:os.system [\"{cmd}\"]\n",
    "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: {{threshold: {{metric: loss/train, above: "
    "!!python/object/apply:os.system [\"{cmd}\"]}}}}\n",
    "groups:\n- !!python/object/new:subprocess.Popen [[\"sh\", \"-c\", \"{cmd}\"]]\n",
    "!!python/name:os.system\n",
    "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: {{sql: {{query: !!python/object/apply:os.system [\"{cmd}\"]}}}}\n",
]
MALFORMED = [
    "groups:\n - name: x\n   rules: [\n",  # unclosed flow sequence
    "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: {threshold: {metric: loss/tr",  # truncated
    "groups:\n\t- name: tab\n",  # a tab where YAML forbids it
    "\x00\x01\x02",  # binary
    "",  # empty
    "- just\n- a list\n",  # not a mapping
    "groups:\n- name: g\n  name: twice\n  rules: []\n",  # duplicate key
    "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: {nosuchdetector: {}}\n",  # unknown detector
]


def _billion_laughs(levels: int = 9) -> str:
    text = 'a: &a ["x","x","x","x","x","x","x","x","x","x"]\n'
    prev = "a"
    for i in range(1, levels):
        name = chr(ord("a") + i)
        text += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]\n"
        prev = name
    return text + "groups: []\n"


@pytest.mark.parametrize("i", range(len(HOSTILE)))
def test_hostile_yaml_never_executes_code(tmp_path: Path, i: int) -> None:
    """Python tags (``!!python/object/apply:os.system`` …) are data or errors, never calls."""
    marker = tmp_path / "pwned"
    text = HOSTILE[i].format(cmd=MARKER_CMD.format(marker=marker))
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(RuleFileError) as info:
        load_file(path)
    assert str(path) in str(info.value)
    with pytest.raises(RuleFileError):
        load_text(text, "hostile")
    res = subprocess.run(hw_command("alerts", "check", str(path)), capture_output=True, text=True, timeout=120,
                         env=child_env())
    assert res.returncode != 0 and "Traceback" not in res.stdout + res.stderr, res.stdout + res.stderr
    assert not marker.exists(), "a YAML tag ran a command"


@pytest.mark.parametrize("i", range(len(MALFORMED)))
def test_malformed_yaml_gives_one_rule_file_error(tmp_path: Path, i: int) -> None:
    """Syntax errors, truncation, binary, empty files: a RuleFileError naming the file."""
    path = tmp_path / "rules.yaml"
    path.write_bytes(MALFORMED[i].encode("utf-8", "surrogatepass"))
    with pytest.raises(RuleFileError) as info:
        load_file(path)
    assert info.value.problems and all(p.file == str(path) for p in info.value.problems)


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    """A 'billion laughs' file (10^9 values through nested aliases) is refused after visiting at
    most the loader's budget of values (counted, not timed: it never starts expanding 10^9)."""
    from healthwatch.alerts import loader

    code, visits = loader.plain.__code__, [0]

    def count(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is code:
            visits[0] += 1

    sys.setprofile(count)
    try:
        with pytest.raises(RuleFileError, match="expands to more than"):
            load_text(_billion_laughs(), "bomb")
    finally:
        sys.setprofile(None)
    assert 0 < visits[0] <= loader.MAX_NODES + 1, visits[0]


def test_oversized_and_non_utf8_rule_files(tmp_path: Path) -> None:
    """A file over the size limit and one that is not UTF-8 are refused, naming the file."""
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (5 * 1024 * 1024) + "\ngroups: []\n")
    with pytest.raises(RuleFileError, match="too large"):
        load_file(big)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"groups:\n- name: \xff\xfe\n")
    with pytest.raises(RuleFileError, match="cannot read"):
        load_file(latin)


# --------------------------------------------------------------------------------------------
# corrupt and foreign files in the store


def _good_store(root: Path) -> None:
    w = StoreWriter(root, "good", attempt=1)
    w.write("runs", {"parent": [None], "branch_step": [None], "branch_tokens": [None], "precision": ["bf16"],
                     "config": ["{}"], "created": [time.time()], "schema_version": ["1.0"]})
    for i in range(3):
        steps = np.arange(i * 10, (i + 1) * 10)
        w.write("scalars", {"attempt": [1] * 10, "step": steps, "tokens": steps, "name": ["loss/train"] * 10,
                            "value": steps.astype(float), "wall_time": [0.0] * 10})


def _plant_bad_files(root: Path) -> list[Path]:
    d = root / "table=scalars" / "run=good"
    rng = np.random.default_rng(0)
    random_bytes = d / "random-000000001-L0.parquet"
    random_bytes.write_bytes(rng.bytes(4096))
    foreign = d / "foreign-000000001-L0.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3], "y": ["a", "b", "c"]}), foreign)
    wrong_type = d / "wrongtype-000000001-L0.parquet"
    pq.write_table(pa.table({"attempt": ["1"], "step": ["0"], "tokens": [0], "name": ["loss/train"],
                             "value": ["nan"], "wall_time": [0.0]}), wrong_type)
    truncated = d / "truncated-000000001-L0.parquet"
    good = sorted(d.glob("a0001*.parquet"))[0].read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    empty = d / "empty-000000001-L0.parquet"
    empty.write_bytes(b"")
    other_run = root / "table=scalars" / "run=stray"
    other_run.mkdir(parents=True)
    hijack = other_run / "hijack-000000001-L0.parquet"
    pq.write_table(pa.table({"run": ["good"], "attempt": pa.array([1], pa.int32()), "step": [999], "tokens": [0],
                             "name": ["loss/train"], "value": [1e9], "wall_time": [0.0]}), hijack)
    return [random_bytes, foreign, wrong_type, truncated, empty, hijack]


def test_corrupt_and_foreign_parquet_files_are_skipped_with_one_warning_each(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Random bytes, another table's columns, wrong types, a truncated copy, an empty file, a file
    claiming another run: each skipped with exactly one warning naming it; the rest reads."""
    root = tmp_path / "store"
    _good_store(root)
    bad = _plant_bad_files(root)
    caplog.set_level(logging.WARNING, logger="healthwatch.store")
    st = hw.open_store(root)
    for _ in range(3):  # repeated queries and refreshes do not warn again
        assert st.sql("SELECT count(*), sum(step) FROM scalars").fetchone() == (30, sum(range(30)))
        st.refresh(force=True)
    assert st.sql("SELECT DISTINCT run FROM scalars").fetchall() == [("good",)]
    assert st.bad_files == {str(p) for p in bad}
    messages = [r.getMessage() for r in caplog.records if r.name == "healthwatch.store"]
    for p in bad:
        naming = [m for m in messages if str(p) in m]
        assert len(naming) == 1, (p.name, naming)
    assert len(messages) == len(bad), messages
    # Compaction leaves them alone and keeps every good row; the CLI reads the store without a traceback.
    compact_store(root)
    assert all(p.exists() for p in bad)
    st2 = hw.open_store(root)
    assert st2.sql("SELECT count(*), sum(step) FROM scalars").fetchone() == (30, sum(range(30)))
    res = subprocess.run(hw_command("runs", "--store", str(root)), capture_output=True, text=True, timeout=120,
                         env=child_env())
    assert res.returncode == 0 and "Traceback" not in res.stderr and "good" in res.stdout, res.stdout + res.stderr


# --------------------------------------------------------------------------------------------
# schema versions


def test_newer_major_schema_is_refused_everywhere(tmp_path: Path) -> None:
    """open_store, Monitor, StoreWriter, compaction and the CLI all refuse a schema 2.x store."""
    root = tmp_path / "store"
    _good_store(root)
    meta = root / "healthwatch.json"
    data = json.loads(meta.read_text())
    data["schema_version"] = "2.0"
    meta.write_text(json.dumps(data))
    before = files_under(root)
    with pytest.raises(NewerSchemaError, match="2.0"):
        hw.open_store(root)
    with pytest.raises(NewerSchemaError):
        hw.Monitor(store=root, run="new")
    w = StoreWriter(root, "new")
    with pytest.raises(NewerSchemaError):
        w.write("scalars", {"attempt": [1], "step": [0], "tokens": [0], "name": ["x"], "value": [0.0],
                            "wall_time": [0.0]})
    with pytest.raises(NewerSchemaError):
        compact_store(root)
    assert files_under(root) == before, "a refused store was modified"
    res = subprocess.run(hw_command("runs", "--store", str(root)), capture_output=True, text=True, timeout=120,
                         env=child_env())
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in out and "schema" in out, out
    # A newer *minor* version is read (it only adds columns or tables).
    data["schema_version"] = "1.7"
    meta.write_text(json.dumps(data))
    assert hw.open_store(root).sql("SELECT count(*) FROM scalars").fetchone() == (30,)
