"""Property tests: arbitrary rule files load or fail with a clear ``RuleFileError``; arbitrary series
(NaN, ±Inf, huge values) never make evaluation raise, and threshold results equal numpy's."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
from alerts_helpers import layers, rules_yaml, scalars, writer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from healthwatch.alerts import Evaluator, RuleFileError, RuleSet, load_text
from healthwatch.alerts.detectors import NEVER, evaluate
from healthwatch.alerts.rules import Expr
from healthwatch.alerts.state import InstanceState, Timing, advance
from healthwatch.store import open_store

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- rule files -------------------------------------------------------------------------------
scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
KEYS = ["groups", "name", "rules", "alert", "expr", "for", "keep_firing_for", "cooldown", "severity",
        "labels", "annotations", "notify", "threshold", "spike", "trend", "nonfinite", "all", "leads",
        "gap", "sql", "metric", "above", "below", "window", "k", "rise", "layers", "aggregate", "of",
        "summary", "extra_scalars", "loss/train", "maxvio", "critical", "{{ value }}", "{{ vlue }}"]
key = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
tree = st.recursive(scalar | st.sampled_from(KEYS),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(key, kids, max_size=5),
                    max_leaves=25)


def _yaml_of(obj: object, indent: int = 0) -> str:
    """A (block-style) YAML rendering of ``obj`` that may also be invalid in interesting ways."""
    import json

    pad = " " * indent
    if isinstance(obj, dict):
        if not obj:
            return pad + "{}\n"
        return "".join(f"{pad}{json.dumps(str(k))}:\n{_yaml_of(v, indent + 2)}" for k, v in obj.items())
    if isinstance(obj, list):
        if not obj:
            return pad + "[]\n"
        return "".join(f"{pad}-\n{_yaml_of(v, indent + 2)}" for v in obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return pad + {True: ".nan"}.get(math.isnan(obj), ".inf" if obj > 0 else "-.inf") + "\n"
    return pad + json.dumps(obj) + "\n"


def _check_load(text: str) -> None:
    try:
        rs = load_text(text, source="fuzz.yaml")
    except RuleFileError as exc:
        assert exc.problems, "a RuleFileError names at least one problem"
        msg = str(exc)
        assert msg and "fuzz.yaml" in msg, msg
        assert "Traceback" not in msg
        return
    assert isinstance(rs, RuleSet) and len(rs) >= 1
    for r in rs:
        assert r.rule.alert and r.group


@FUZZ
@given(tree)
def test_random_structures_load_or_fail_clearly(obj):
    _check_load(_yaml_of(obj))


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("groups:nameruleslert-expr{}[]\n ,'\"&*!|>#%@`\t0123456789.")),
               max_size=200))
def test_random_text_loads_or_fails_clearly(text):
    _check_load(text)


rule_dict = st.fixed_dictionaries(
    {"alert": st.sampled_from(["A", "B_1", "9bad", "", "ok"]),
     "expr": st.one_of(
         st.fixed_dictionaries({"threshold": st.fixed_dictionaries(
             {"metric": st.sampled_from(["loss/train", "maxvio", "loss/trian", "lr"])},
             optional={"above": scalar, "below": scalar, "aggregate": st.sampled_from(["max", "avg"]),
                       "layers": st.sampled_from(["first_quarter", "0-3", "x", [0, 1]])})}),
         st.fixed_dictionaries({"spike": st.fixed_dictionaries(
             {"metric": st.just("loss/train")}, optional={"window": scalar, "k": scalar, "method": scalar})}),
         st.fixed_dictionaries({"trend": st.fixed_dictionaries(
             {"metric": st.just("loss/train"), "window": st.integers(-5, 50)}, optional={"rise": scalar})}),
         st.fixed_dictionaries({"nonfinite": st.one_of(st.just({}), st.fixed_dictionaries({"metrics": scalar}))}),
     )},
    optional={"for": scalar, "keep_firing_for": scalar, "cooldown": scalar, "severity": scalar,
              "labels": st.dictionaries(st.sampled_from(["team", "run", "1x"]), scalar, max_size=2),
              "annotations": st.dictionaries(st.just("summary"), st.sampled_from(
                  ["{{ value:.3g }}", "{{ vlue }}", "{{ step", "plain"]), max_size=1)})


@FUZZ
@given(st.lists(rule_dict, min_size=1, max_size=3))
def test_near_valid_rule_structures(rules):
    _check_load(_yaml_of({"groups": [{"name": "g", "rules": rules}]}))


# -- series -----------------------------------------------------------------------------------
values = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 0.0, 3.0, 5e-324]))

SERIES_RULES = """\
      - alert: Above
        expr: {threshold: {metric: loss/train, above: %(above)r}}
      - alert: Band
        expr: {threshold: {metric: loss/train, above: %(above)r, below: %(below)r}}
        for: 2
        keep_firing_for: 1
      - alert: Spiky
        expr: {spike: {metric: loss/train, window: 5, k: 3, min_points: 3, direction: both}}
      - alert: SpikyStd
        expr: {spike: {metric: loss/train, window: 5, k: 2, method: std, min_points: 2}}
      - alert: Rising
        expr: {trend: {metric: loss/train, window: 4, rise: 0.5}}
      - alert: VioMax
        expr: {threshold: {metric: maxvio, above: %(above)r, aggregate: max}}
      - alert: Bad
        expr: {nonfinite: {}}
"""


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(values, min_size=1, max_size=40), st.floats(-1e6, 1e6), st.floats(-1e6, 1e6),
       st.integers(1, 40))
def test_series_never_raise_and_threshold_matches_numpy(vals, above, below, split):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "s"
        w = writer(root, "r1")
        steps = list(range(len(vals)))
        split = min(split, len(vals))
        arr = np.array(vals, dtype=np.float64)
        rules = load_text(rules_yaml(SERIES_RULES % {"above": above, "below": below}))
        ev = Evaluator(root, rules, record=False, backfill="all")
        got = []
        scalars(w, "loss/train", steps[:split], vals[:split])
        layers(w, "maxvio", steps[:split], {0: vals[:split], 1: [0.0] * split})
        got += ev.evaluate_once()
        if split < len(vals):
            scalars(w, "loss/train", steps[split:], vals[split:])
            layers(w, "maxvio", steps[split:], {0: vals[split:], 1: [0.0] * (len(vals) - split)})
            got += ev.evaluate_once()
        assert ev.errors == {}, ev.errors
        ev.close()
        for t in got:  # every transition serialises (JSON-safe values)
            t.to_json()
        # the threshold detector equals numpy (NaN never active; strict comparisons)
        with np.errstate(invalid="ignore"):
            want_above = arr > above
            want_band = (arr > above) | (arr < below)
        store = open_store(root)
        try:
            for expr, want in (({"threshold": {"metric": "loss/train", "above": above}}, want_above),
                               ({"threshold": {"metric": "loss/train", "above": above, "below": below}}, want_band)):
                df = evaluate(store, Expr.model_validate(expr), {"r1": NEVER}).sort("step")
                assert df["step"].to_list() == steps
                assert df["active"].to_list() == want.tolist()
        finally:
            store.close()
        # and the evaluator's transitions for "Above"/"Band" equal the state machine on numpy's booleans
        for name, want, timing in (("Above", want_above, Timing()), ("Band", want_band, Timing(2, 1, 0))):
            ref = [(s, int(steps[i])) for s, i in advance(InstanceState(), timing, np.array(steps), want)]
            assert [(t.state, t.step) for t in got if t.alert == name] == ref
