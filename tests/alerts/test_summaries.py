"""Alert summaries say what is missing instead of printing ``-`` or ``None``."""

from __future__ import annotations

from healthwatch.alerts.sinks import _body
from healthwatch.alerts.template import render
from healthwatch.alerts.transition import Transition


def _t(**kw):
    base = dict(alert="loss_spike", group="g", run="r", state="firing", previous="pending", severity="critical",
                step=1200, tokens=None, layer=None, value=None, labels={}, annotations={}, fingerprint="f", detail="")
    base.update(kw)
    return Transition(**base)


def test_template_names_missing_fields():
    text = "at {{ step:, }} ({{ tokens:, }} tokens) value {{ value:.3g }} on {{ layer }} {{ labels.host }}"
    out = render(text, {"step": 1200, "tokens": None, "value": None, "layer": None}, {})
    assert out == "at 1,200 (tokens unknown tokens) value no value on all layers no label host"
    assert "-" not in out.replace("1,200", "") and "None" not in out


def test_generated_summary_and_body_have_no_dash_or_none():
    t = _t()
    assert t.summary == "loss_spike firing on r at step 1,200 (no value recorded)"
    body = _body(t)
    assert "None" not in body and " -" not in body and "tokens unknown" in body and "no value recorded" in body
    t2 = _t(value=float("nan"), tokens=4096)
    assert "value nan" in _body(t2) and "tokens 4,096" in _body(t2)
