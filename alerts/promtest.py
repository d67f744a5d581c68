"""Rule unit tests in the style of ``promtool test rules``, run against a temporary real store.

A test file::

    rule_files: [default.yaml]          # relative to this file; "default" = the shipped pack
    tests:
      - name: loss blows up
        tokens_per_step: 1000           # tokens = step * tokens_per_step (default 1000)
        input_series:
          - series: loss/train
            values: '2.0+0x100 2.0+0.05x50'
          - series: maxvio
            layers: "0-3"               # or layer: 3; layer_type defaults by metric
            layer_type: moe
            values: '1.2x150'
        alert_rule_test:                # alias: expected_alerts
          - eval_step: 140
            alertname: LossSpike
            exp_alerts:
              - labels: {severity: critical}
          - eval_step: 90
            alertname: LossSpike
            exp_alerts: []
        never_fire: [MaxVioHigh]        # or `all`

Value notation (as promtool's): ``a+bxn`` is the ``n+1`` values ``a, a+b, …, a+n·b`` (``a-bxn``
counts down, ``axn`` repeats ``a``), ``_`` is a missing step and ``_xn`` ``n`` missing steps;
``NaN``, ``Inf`` and ``-Inf`` are values. Series start at ``start`` (default 0, or the run's
``branch_step``) and advance ``interval`` steps per value.

Each test writes its series to a fresh store (real Parquet segments through :class:`StoreWriter`)
in chunks ending at each ``eval_step`` and runs the evaluator after each chunk, exactly as a live
run is evaluated after each flush. At an ``eval_step`` the *firing* instances of ``alertname``
must match ``exp_alerts`` one to one; an expected alert matches an instance whose labels and
annotations include the expected ones.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from healthwatch.alerts.engine import Evaluator
from healthwatch.alerts.loader import (
    Problem,
    RuleFileError,
    load_rules,
    parse_yaml,
    plain,
    problems_from,
    read_text,
)
from healthwatch.alerts.rules import LAYER_TYPES, RuleSet, is_layer_metric, parse_layers, suggest
from healthwatch.schema import SCHEMA_VERSION, validate_metric_name, validate_run_name
from healthwatch.store import StoreWriter

MAX_VALUES = 2_000_000
_NUM = r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[Ii]nf|NaN|nan)"
_EXPAND = re.compile(rf"^({_NUM})(?:([-+])({_NUM}))?x(\d+)$")
_SINGLE = re.compile(rf"^{_NUM}$")
_MISSING = re.compile(r"^_(?:x(\d+))?$")


def expand_values(text: str) -> list[float | None]:
    """Expand promtool's series notation; ``None`` marks a missing step.

    >>> expand_values("1+1x3 _ NaN 5x1")
    [1.0, 2.0, 3.0, 4.0, None, nan, 5.0, 5.0]
    """
    out: list[float | None] = []
    for tok in str(text).split():
        m = _MISSING.match(tok)
        if m:
            n = int(m.group(1)) if m.group(1) else 1
            _check_size(len(out) + n)
            out.extend([None] * n)
            continue
        if _SINGLE.match(tok):
            out.append(float(tok))
            _check_size(len(out))
            continue
        m = _EXPAND.match(tok)
        if not m:
            raise ValueError(f"bad value {tok!r}: use a number, NaN, Inf, _, a+bxn, a-bxn or axn")
        a, op, b, n = float(m.group(1)), m.group(2), m.group(3), int(m.group(4))
        step = 0.0 if op is None else float(b) * (1 if op == "+" else -1)
        _check_size(len(out) + n + 1)
        out.extend(a + i * step for i in range(n + 1))
    return out


def _check_size(n: int) -> None:
    if n > MAX_VALUES:
        raise ValueError(f"series too long (more than {MAX_VALUES:,} values)")


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RunSpec(_M):
    """A run of the test store (needed only for branches / precision-gap tests)."""

    run: str
    parent: str | None = None
    branch_step: int | None = Field(None, ge=0)
    precision: str = "bf16"

    @field_validator("run", "parent")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else validate_run_name(v)


class SeriesSpec(_M):
    """One input series: a scalar, or a layer metric on one or more layers."""

    series: str
    values: str
    run: str | None = None
    layer: int | None = Field(None, ge=0, le=100_000)
    layers: Any = None
    layer_type: str | None = None
    start: int | None = Field(None, ge=0)
    interval: int = Field(1, ge=1, le=1_000_000)

    @field_validator("series")
    @classmethod
    def _series(cls, v: str) -> str:
        return validate_metric_name(v)

    @field_validator("values")
    @classmethod
    def _values(cls, v: str) -> str:
        expand_values(v)
        return v

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        sel = parse_layers(v)
        if sel is not None and sel.named:
            raise ValueError("input series need explicit layers (an index, 'a-b' or a list), not a named range")
        return v

    @field_validator("layer_type")
    @classmethod
    def _layer_type(cls, v: str | None) -> str | None:
        if v is not None and v not in LAYER_TYPES:
            raise ValueError(f"unknown layer_type {v!r}{suggest(v, LAYER_TYPES)}")
        return v

    def layer_list(self) -> list[int]:
        """Layers this series is written to (empty for a scalar)."""
        if self.layer is not None:
            return [self.layer]
        sel = parse_layers(self.layers)
        if sel is not None:
            return list(sel.indices)
        return [0] if is_layer_metric(self.series) else []


class ExpectedAlert(_M):
    """An alert expected to be firing: labels/annotations it must include."""

    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        return {str(k): str(x) for k, x in v.items()} if isinstance(v, dict) else v


class AlertCheck(_M):
    """At ``eval_step``, the firing instances of ``alertname`` are exactly ``exp_alerts``."""

    eval_step: int = Field(..., ge=0)
    alertname: str
    exp_alerts: list[ExpectedAlert] = Field(default_factory=list)


class PromTest(_M):
    """One test case: runs, input series, checks."""

    name: str = "unnamed"
    runs: list[RunSpec] = Field(default_factory=lambda: [RunSpec(run="run")])
    tokens_per_step: int = Field(1000, ge=1)
    input_series: list[SeriesSpec] = Field(default_factory=list)
    alert_rule_test: list[AlertCheck] = Field(
        default_factory=list, validation_alias=AliasChoices("alert_rule_test", "expected_alerts")
    )
    never_fire: Literal["all"] | list[str] = Field(default_factory=list)


class TestFile(_M):
    """A promtool-style test file."""

    __test__ = False  # not a pytest test class, despite the name

    rule_files: list[str] = Field(..., min_length=1)
    tests: list[PromTest] = Field(..., min_length=1)


@dataclass
class CaseResult:
    """Outcome of one test case: ``failures`` empty when it passed."""

    name: str
    failures: list[str] = field(default_factory=list)
    transitions: int = 0

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return not self.failures


@dataclass
class FileResult:
    """Outcome of one test file."""

    path: str
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every case passed."""
        return all(c.ok for c in self.cases)


def load_test_file(path: str | Path) -> tuple[TestFile, RuleSet]:
    """Validate a test file and load its rule files; :class:`RuleFileError` lists problems."""
    path = Path(path)
    text = read_text(path)
    tree, problems = parse_yaml(text, str(path))
    if problems:
        raise RuleFileError(problems)
    try:
        tf = TestFile.model_validate(plain(tree))
    except ValidationError as exc:
        raise RuleFileError(problems_from(exc, tree, str(path), root=TestFile)) from None
    specs: list[str] = []
    for rf in tf.rule_files:
        if rf == "default" or rf.startswith("pack:"):
            specs.append(rf)
        else:
            p = Path(rf)
            specs.append(str(p if p.is_absolute() else path.parent / p))
    return tf, load_rules(specs)


def _check_runs(case: PromTest) -> list[str]:
    names = [r.run for r in case.runs]
    bad = []
    for s in case.input_series:
        if s.run is not None and s.run not in names:
            bad.append(f"series {s.series!r} names run {s.run!r}, not in runs ({', '.join(names)})")
    for r in case.runs:
        if r.parent is not None and r.parent not in names:
            bad.append(f"run {r.run!r} names parent {r.parent!r}, not in runs")
    return bad


def _rows(case: PromTest) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(run, table, row)`` for every input value (missing steps skipped)."""
    runs = {r.run: r for r in case.runs}
    default_run = case.runs[0].run
    for s in case.input_series:
        run = s.run or default_run
        start = s.start if s.start is not None else (runs[run].branch_step or 0)
        values = expand_values(s.values)
        layers = s.layer_list()
        ltype = s.layer_type or ("moe" if s.series in ("maxvio", "dead_experts") else "mamba")
        for i, v in enumerate(values):
            if v is None:
                continue
            step = start + i * s.interval
            base = {"attempt": 1, "step": step, "tokens": step * case.tokens_per_step, "value": v}
            if layers:
                for layer in layers:
                    yield run, "layer_stats", {**base, "layer": layer, "layer_type": ltype, "metric": s.series}
            else:
                yield run, "scalars", {**base, "name": s.series, "wall_time": 0.0}


def _write(writers: dict[str, StoreWriter], rows: list[tuple[str, str, dict[str, Any]]]) -> None:
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run, table, row in rows:
        grouped.setdefault((run, table), []).append(row)
    for (run, table), rs in sorted(grouped.items()):
        cols = {k: [r[k] for r in rs] for k in rs[0]}
        writers[run].write(table, cols)


def _matches(exp: ExpectedAlert, t: Any) -> bool:
    return all(t.labels.get(k) == v for k, v in exp.labels.items()) and all(
        t.annotations.get(k) == v for k, v in exp.annotations.items()
    )


def run_case(case: PromTest, rules: RuleSet, workdir: Path) -> CaseResult:
    """Run one test case in ``workdir`` (a fresh store is created there)."""
    res = CaseResult(case.name)
    res.failures.extend(_check_runs(case))
    names = {r.rule.alert for r in rules}
    for chk in case.alert_rule_test:
        if chk.alertname not in names:
            res.failures.append(f"eval_step {chk.eval_step}: no rule {chk.alertname!r}{suggest(chk.alertname, names)}")
    if case.never_fire != "all":
        for n in case.never_fire:
            if n not in names:
                res.failures.append(f"never_fire: no rule {n!r}{suggest(n, names)}")
    if res.failures:
        return res
    root = workdir / "store"
    writers: dict[str, StoreWriter] = {}
    for r in case.runs:
        writers[r.run] = StoreWriter(root, r.run, attempt=1)
        writers[r.run].write("runs", {
            "parent": [r.parent], "branch_step": [r.branch_step],
            "branch_tokens": [None if r.branch_step is None else r.branch_step * case.tokens_per_step],
            "precision": [r.precision], "config": ["{}"], "created": [0.0], "schema_version": [SCHEMA_VERSION],
        })
        writers[r.run].write("attempts", {"attempt": [1], "start_step": [0], "started_at": [0.0], "host": ["test"],
                                          "reason": ["start"], "schema_version": [SCHEMA_VERSION]})
    rows = sorted(_rows(case), key=lambda x: x[2]["step"])
    checks = sorted(case.alert_rule_test, key=lambda c: c.eval_step)
    bounds = sorted({c.eval_step for c in checks})
    last = rows[-1][2]["step"] if rows else 0
    if not bounds or bounds[-1] < last:
        bounds.append(last)
    ev = Evaluator(root, rules, runs=[r.run for r in case.runs], evaluator_id="promtest", backfill="all")
    try:
        i = 0
        for bound in bounds:
            chunk = []
            while i < len(rows) and rows[i][2]["step"] <= bound:
                chunk.append(rows[i])
                i += 1
            if chunk:
                _write(writers, chunk)
            ev.evaluate_once()
            firing = [t for t in _firing(ev)]
            for chk in (c for c in checks if c.eval_step == bound):
                got = [t for t in firing if t.alert == chk.alertname]
                res.failures.extend(_compare(chk, got))
        history = list(ev.history)
    finally:
        ev.close()
    res.transitions = len(history)
    quiet = names if case.never_fire == "all" else set(case.never_fire)
    fired = sorted({(t.alert, t.step) for t in history if t.state == "firing" and t.alert in quiet})
    for alert, step in fired:
        res.failures.append(f"{alert} fired at step {step} but is in never_fire")
    return res


def _firing(ev: Evaluator) -> list[Any]:
    """Latest firing transition of every instance that is firing now."""
    latest: dict[str, Any] = {}
    for t in ev.history:
        latest[t.fingerprint] = t
    return [t for t in latest.values() if t.state == "firing"]


def _compare(chk: AlertCheck, got: list[Any]) -> list[str]:
    left = list(got)
    missing = []
    for exp in chk.exp_alerts:
        hit = next((t for t in left if _matches(exp, t)), None)
        if hit is None:
            missing.append(exp)
        else:
            left.remove(hit)
    out = []
    where = f"eval_step {chk.eval_step}, {chk.alertname}"
    for exp in missing:
        out.append(f"{where}: expected firing with labels {exp.labels or '{}'}"
                   f"{' annotations ' + str(exp.annotations) if exp.annotations else ''}, "
                   f"got {len(got)} firing: {[_describe(t) for t in got]}")
    for t in left:
        out.append(f"{where}: unexpected firing alert {_describe(t)}")
    return out


def _describe(t: Any) -> str:
    val = "no value recorded" if t.value is None else f"{t.value:.4g}"
    layer = f" layer={t.layer}" if t.layer is not None else ""
    return f"{t.alert}{{run={t.run}{layer}}} since step {t.step} value {val}"


def run_test_file(path: str | Path) -> FileResult:
    """Run every case of a test file; raises :class:`RuleFileError` when the file is invalid."""
    tf, rules = load_test_file(path)
    out = FileResult(str(path))
    for case in tf.tests:
        with tempfile.TemporaryDirectory(prefix="hw-promtest-") as tmp:
            try:
                out.cases.append(run_case(case, rules, Path(tmp)))
            except (ValueError, OSError) as exc:
                out.cases.append(CaseResult(case.name, [f"error: {exc}"]))
    return out


__all__ = [
    "CaseResult", "FileResult", "Problem", "PromTest", "TestFile", "expand_values", "load_test_file",
    "run_case", "run_test_file",
]
