"""Rule files: validation errors name file, line and field and suggest the nearest valid name."""

from __future__ import annotations

import pytest

from healthwatch.alerts.loader import RuleFileError, load_file, load_pack, load_rules, load_text, pack_names
from healthwatch.alerts.rules import Expr, parse_layers
from healthwatch.alerts.template import check_template, render

BAD = """\
groups:
  - name: g
    rules:
      - alert: Spiky
        expr:
          spike: {metric: loss/trian, windw: 50}
        for: 3
        severity: critcal
      - alert: Trendy
        expr:
          trend: {metric: maxvio, layers: first_quartr, window: 30, rise: 0.05}
        annotations:
          summary: "{{ vlue }} at {{ step }}"
      - alert: X
        expr: {treshold: {metric: lr, above: 1}}
"""


def _problems(tmp_path, text):
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(RuleFileError) as info:
        load_file(path)
    return path, info.value.problems


def test_errors_name_file_line_field_and_suggest(tmp_path):
    path, problems = _problems(tmp_path, BAD)
    by_field = {p.field: p for p in problems}
    assert all(p.file == str(path) for p in problems)
    p = by_field["groups[0].rules[0].expr.spike.metric"]
    assert p.line == 6 and "loss/trian" in p.message and "did you mean 'loss/train'" in p.message
    p = by_field["groups[0].rules[0].expr.spike.windw"]
    assert p.line == 6 and "did you mean 'window'" in p.message
    p = by_field["groups[0].rules[0].severity"]
    assert p.line == 8 and "did you mean 'critical'" in p.message
    p = by_field["groups[0].rules[1].expr.trend.layers"]
    assert p.line == 11 and "did you mean 'first_quarter'" in p.message
    p = by_field["groups[0].rules[1].annotations.summary"]
    assert p.line == 13 and "did you mean 'value'" in p.message
    p = by_field["groups[0].rules[2].expr.treshold"]
    assert p.line == 15 and "did you mean 'threshold'" in p.message
    # the rendered message carries file:line:col
    assert f"{path}:6:" in str(problems[0])


def test_yaml_syntax_error_has_line(tmp_path):
    _, problems = _problems(tmp_path, "groups:\n  - name: g\n    rules: [\n")
    assert problems[0].line is not None and "YAML syntax" in problems[0].message


def test_duplicate_keys_and_empty_and_non_mapping(tmp_path):
    _, problems = _problems(tmp_path, "groups: []\ngroups: []\n")
    assert "duplicate" in problems[0].message.lower()
    _, problems = _problems(tmp_path, "")
    assert "empty" in problems[0].message
    _, problems = _problems(tmp_path, "- a\n- b\n")
    assert "mapping" in problems[0].message


def test_unknown_metric_is_named_and_custom_scalars_declared():
    with pytest.raises(RuleFileError, match="unknown metric 'data/seq_len'"):
        load_text("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: {threshold: {metric: data/seq_len, above: 1}}\n")
    rs = load_text("extra_scalars: [data/seq_len]\ngroups:\n- name: g\n  rules:\n"
                   "  - alert: A\n    expr: {threshold: {metric: data/seq_len, above: 1}}\n")
    assert rs.get("A").rule.expr.threshold.metric == "data/seq_len"
    # MTP heads beyond two are accepted by pattern
    load_text("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: {threshold: {metric: loss/mtp_7, above: 1}}\n")


def test_layer_options_only_for_layer_metrics():
    with pytest.raises(RuleFileError, match="only apply to layer metrics"):
        load_text("groups:\n- name: g\n  rules:\n  - alert: A\n"
                  "    expr: {threshold: {metric: loss/train, layers: all, above: 1}}\n")


def test_one_detector_per_expr_and_gap_not_combined():
    with pytest.raises(RuleFileError, match="several detectors"):
        load_text("groups:\n- name: g\n  rules:\n  - alert: A\n    expr:\n      threshold: {metric: lr, above: 1}\n"
                  "      nonfinite: {}\n")
    with pytest.raises(RuleFileError, match="gap cannot be combined"):
        Expr  # noqa: B018 - the model under test
        load_text("groups:\n- name: g\n  rules:\n  - alert: A\n    expr:\n      all:\n        window: 5\n        of:\n"
                  "        - gap: {above: 0.01}\n        - threshold: {metric: lr, above: 1}\n")


def test_duplicate_alert_and_group_and_reserved_labels(tmp_path):
    with pytest.raises(RuleFileError, match="appears twice"):
        load_text("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: {nonfinite: {}}\n"
                  "  - alert: A\n    expr: {nonfinite: {}}\n")
    with pytest.raises(RuleFileError, match="set by the engine"):
        load_text("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: {nonfinite: {}}\n    labels: {run: x}\n")
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: {nonfinite: {}}\n")
    b.write_text("groups:\n- name: g\n  rules:\n  - alert: B\n    expr: {nonfinite: {}}\n")
    with pytest.raises(RuleFileError, match="also defined in"):
        load_rules([a, b])


def test_errors_of_several_files_reported_together(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: {nonfinit: {}}\n")
    b.write_text("groups:\n- name: h\n  rules:\n  - alert: 9bad\n    expr: {nonfinite: {}}\n")
    with pytest.raises(RuleFileError) as info:
        load_rules([a, b])
    assert {p.file for p in info.value.problems} == {str(a), str(b)}


def test_sql_detector_must_be_read_only():
    for q in ("COPY scalars TO '/tmp/x.csv'", "select 1; drop table x", "ATTACH 'x.db'",
              "select * from scalars; select 1", "with a as (select 1) insert into t select * from a"):
        with pytest.raises(RuleFileError):
            load_text("groups:\n- name: g\n  rules:\n  - alert: A\n    expr:\n      sql: {query: \"" + q + "\"}\n")
    # keywords inside string literals are fine
    load_text("groups:\n- name: g\n  rules:\n  - alert: A\n    expr:\n      sql:\n        query: \"select run, step, "
              "value from scalars_effective where name = 'set/copy'\"\n")


def test_layer_ranges():
    assert parse_layers("first_quarter").named == "first_quarter"
    assert parse_layers("0-3").indices == (0, 1, 2, 3)
    assert parse_layers([0, 3]).indices == (0, 3)
    assert parse_layers(["0-2", 7]).indices == (0, 1, 2, 7)
    assert parse_layers(5).indices == (5,)
    for bad in ("3-1", "first_quartr", [], [-1], [True], "a-b"):
        with pytest.raises(ValueError):
            parse_layers(bad)


def test_templates():
    check_template("{{ value:.3g }} at {{ step:, }} on {{ run }} {{ labels.team }}")
    for bad in ("{{ vlue }}", "{{ value:zz }}", "{{ value", "{{ 1 }}"):
        with pytest.raises(ValueError):
            check_template(bad)
    out = render("{{ value:.2f }} {{ step:, }} {{ layer }} {{ labels.team }} {{ tokens:.1f }}",
                 {"value": 1.234, "step": 12345, "layer": None, "tokens": "n/a"}, {"team": "pt"})
    assert out == "1.23 12,345 all layers pt n/a"  # a missing value says what is missing, never "-"


def test_shipped_packs_load():
    assert "default" in pack_names()
    rs = load_pack("default")
    names = {r.rule.alert for r in rs}
    for expected in ("LossAndGradNormRising", "LossSpike", "MTPLeadsTrainLoss", "MaxVioHigh", "DeadExperts",
                     "EarlyResidualNormRising", "EarlyResidualSpike", "PrecisionGapWarning", "PrecisionGapCritical",
                     "NonFiniteValues", "MonitorDroppingRows"):
        assert expected in names
    assert load_rules("default").names() == rs.names()
    with pytest.raises(RuleFileError, match="did you mean 'default'"):
        load_rules("pack:defualt")
