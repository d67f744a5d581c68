"""The rule model: ``groups -> rules``, each rule an ``expr`` (a detector) plus Prometheus-style timing.

A rule file is YAML (see :mod:`healthwatch.alerts.loader` and ``docs/alerts.md``)::

    groups:
      - name: divergence
        rules:
          - alert: LossAndGradNormRising
            expr:
              all:
                window: 30
                of:
                  - trend: {metric: loss/train, window: 30, rise: 0.03}
                  - trend: {metric: grad_norm/total, window: 30, rise: 0.5}
            for: 5                 # steps the condition must hold before pending -> firing
            keep_firing_for: 20    # steps to keep firing after the condition clears
            cooldown: 100          # steps after a resolution during which it may not fire again
            severity: critical
            annotations:
              summary: "loss and grad norm rising together at step {{ step }} ({{ value:.3g }})"

All durations count **training steps**, not seconds: a run's health is a function of its steps, and
steps make a backtest and a live evaluation agree exactly.

Every detector is a model with exactly the keys it accepts (unknown keys are errors), so a typo is
reported at its own line by the loader with the nearest valid name.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from healthwatch.alerts.template import check_template
from healthwatch.schema import SIGNAL_LAYER_METRICS, is_signal_layer_metric

# ------------------------------------------------------------------------------------------
# signal names (DESIGN.md section 3)

#: Scalars the Monitor logs. ``loss/mtp_<n>`` is accepted for any head ``n``.
KNOWN_SCALARS: tuple[str, ...] = (
    "loss/train",
    "loss/mtp_1",
    "loss/mtp_2",
    "grad_norm/total",
    "grad_norm/output",
    "grad_norm/embedding",
    "grad_norm/mtp",
    "lr",
    "monitor/dropped_rows",
)
#: Per-layer metrics (table ``layer_stats``).
LAYER_METRICS: tuple[str, ...] = ("maxvio", "dead_experts", "resid_rms", "resid_rms_max", "wgrad_norm",
                                   *SIGNAL_LAYER_METRICS)
LAYER_TYPES: tuple[str, ...] = ("mamba", "attention", "moe", "mlp", "mtp")
#: Named layer ranges, relative to the run's layer stack (MTP layers excluded from the count).
LAYER_RANGES: tuple[str, ...] = ("all", "first_quarter", "first_half", "last_half", "last_quarter")
AGGREGATES: tuple[str, ...] = ("max", "median", "mean", "min")
SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")
STATES: tuple[str, ...] = ("inactive", "pending", "firing", "resolved")

_MTP_LOSS = re.compile(r"^loss/mtp_\d+$")
_ALERT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_LABEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
#: Labels the engine sets itself; a rule may not override them.
RESERVED_LABELS = frozenset({"alertname", "run", "layer", "severity", "group"})


def suggest(name: str, candidates: list[str] | tuple[str, ...] | set[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest candidate, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(str(name), sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def is_layer_metric(name: str) -> bool:
    """True for per-layer metrics (read from ``layer_stats``), False for scalars."""
    return name in LAYER_METRICS or is_signal_layer_metric(name)


def check_metric_name(name: str, extra_scalars: tuple[str, ...] = ()) -> str:
    """Return ``name`` if it is a known scalar or layer metric (or declared in ``extra_scalars``).

    Unknown names are refused rather than silently evaluated: a typo such as ``loss/trian`` would
    otherwise give a rule that can never fire. Custom scalars (``mon.log({...})``) are declared at
    the top of the rule file under ``extra_scalars:``.
    """
    if (name in KNOWN_SCALARS or is_layer_metric(name) or name in extra_scalars or _MTP_LOSS.match(name)
            or name == "monitor/heartbeat"):
        return name
    known = KNOWN_SCALARS + LAYER_METRICS + tuple(extra_scalars)
    raise ValueError(
        f"unknown metric {name!r}{suggest(name, known)}; known scalars: {', '.join(KNOWN_SCALARS)}; "
        f"layer metrics: {', '.join(LAYER_METRICS)}; declare custom scalars under `extra_scalars:`"
    )


def _extra_scalars(info: ValidationInfo) -> tuple[str, ...]:
    ctx = info.context or {}
    return tuple(ctx.get("extra_scalars", ()))


def _template(text: str) -> str:
    check_template(text)
    return text


#: An annotation: text with ``{{ field }}`` placeholders (see :mod:`healthwatch.alerts.template`).
Template = Annotated[str, AfterValidator(_template)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# ------------------------------------------------------------------------------------------
# selectors


class LayerSel(_Strict):
    """A parsed layer selection: a named range, or explicit layer indices."""

    named: str | None = None
    indices: tuple[int, ...] = ()

    def describe(self) -> str:
        """Human form, e.g. ``first_quarter`` or ``0,1,2,3``."""
        return self.named or ",".join(map(str, self.indices))


def parse_layers(value: Any) -> LayerSel | None:
    """Parse a ``layers:`` value: a named range, ``"0-3"``, an index, or a list of indices/ranges.

    A list is a set of layer indices (``[0, 3]`` = layers 0 and 3); ranges are strings
    (``"0-3"`` = layers 0, 1, 2, 3), so ``["0-3", 7]`` mixes both.
    """
    if value is None:
        return None
    if isinstance(value, LayerSel):
        return value
    if isinstance(value, bool):
        raise ValueError("layers must be a range name, an index, 'a-b' or a list of them")
    if isinstance(value, int):
        items: list[Any] = [value]
    elif isinstance(value, str):
        if value in LAYER_RANGES:
            return LayerSel(named=value)
        if not _RANGE.match(value) and not value.strip().isdigit():
            raise ValueError(
                f"unknown layer range {value!r}{suggest(value, LAYER_RANGES)}; use one of "
                f"{', '.join(LAYER_RANGES)}, an index, 'a-b', or a list"
            )
        items = [value]
    elif isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("layers: an empty list selects nothing")
        items = list(value)
    else:
        raise ValueError(f"layers must be a range name, an index, 'a-b' or a list, not {type(value).__name__}")
    out: set[int] = set()
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"layer index must be an integer, got {item!r}")
        if isinstance(item, int):
            if item < 0 or item > 100_000:
                raise ValueError(f"layer index {item} out of range (0..100000)")
            out.add(item)
            continue
        if isinstance(item, str):
            m = _RANGE.match(item)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if lo > hi:
                    raise ValueError(f"layer range {item!r} is empty (start > end)")
                if hi - lo > 100_000:
                    raise ValueError(f"layer range {item!r} too large")
                out.update(range(lo, hi + 1))
                continue
            if item.strip().isdigit():
                out.add(int(item))
                continue
        raise ValueError(f"bad layer {item!r}: use an index or 'a-b'")
    return LayerSel(indices=tuple(sorted(out)))


class Selector(_Strict):
    """Which series a detector reads: a scalar, or a layer metric with layer range/type/aggregate.

    Without ``aggregate`` a layer metric yields one series (and one alert instance) per layer;
    with it, one series per run (``max``/``min`` remember which layer it came from).
    """

    metric: str
    layers: LayerSel | None = None
    layer_type: tuple[str, ...] | None = None
    aggregate: Literal["max", "median", "mean", "min"] | None = None

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str, info: ValidationInfo) -> str:
        return check_metric_name(v, _extra_scalars(info))

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: Any) -> LayerSel | None:
        return parse_layers(v)

    @field_validator("layer_type", mode="before")
    @classmethod
    def _layer_type(cls, v: Any) -> tuple[str, ...] | None:
        if v is None:
            return None
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError(f"layer_type must be one of {', '.join(LAYER_TYPES)} or a list of them")
        for t in items:
            if t not in LAYER_TYPES:
                raise ValueError(f"unknown layer_type {t!r}{suggest(str(t), LAYER_TYPES)}; use {', '.join(LAYER_TYPES)}")
        return tuple(items)

    @model_validator(mode="after")
    def _layer_options_need_layer_metric(self) -> Selector:
        if not is_layer_metric(self.metric):
            used = [k for k in ("layers", "layer_type", "aggregate") if getattr(self, k) is not None]
            if used:
                raise ValueError(
                    f"{', '.join(used)} only apply to layer metrics ({', '.join(LAYER_METRICS)}); "
                    f"{self.metric!r} is a scalar"
                )
        return self

    @property
    def is_layer(self) -> bool:
        """True when the selector reads ``layer_stats``."""
        return is_layer_metric(self.metric)

    @property
    def per_layer(self) -> bool:
        """True when the selector yields one series per layer (layer metric, no aggregate)."""
        return self.is_layer and self.aggregate is None

    def describe(self) -> str:
        """Short human form: ``maxvio[first_quarter, moe, max]``."""
        if not self.is_layer:
            return self.metric
        parts = [p for p in (self.layers.describe() if self.layers else None,
                             "|".join(self.layer_type) if self.layer_type else None, self.aggregate) if p]
        return f"{self.metric}[{', '.join(parts)}]" if parts else self.metric


# ------------------------------------------------------------------------------------------
# detectors

def _window() -> Any:
    return Field(ge=1, le=10_000_000, description="window length in steps")


class Threshold(Selector):
    """Active when the value is above ``above`` or below ``below`` (NaN is never active here:
    non-finite values have their own detector)."""

    above: float | None = None
    below: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> Threshold:
        if self.above is None and self.below is None:
            raise ValueError("threshold needs `above`, `below` or both")
        return self

    def lookback(self) -> int:
        """Steps of history needed before the first new step."""
        return 0


class Spike(Selector):
    """Active when the value jumps away from its trailing window.

    ``method: mad``: above ``median + k * 1.4826 * MAD`` (robust; 1.4826·MAD estimates σ for normal
    noise); ``method: std``: above ``mean + k * σ``. The trailing window is the ``window`` steps
    before the current one (the current value is excluded, so a spike cannot hide itself).
    ``min_rel``/``min_delta`` ask for a minimum jump relative to / in units of the centre, so a
    perfectly flat series (MAD = 0) does not fire on rounding noise. ``direction: down|both``
    also catches drops.
    """

    method: Literal["mad", "std"] = "mad"
    window: int = _window()
    k: float = Field(6.0, gt=0, le=1e6)
    min_points: int = Field(10, ge=2)
    min_rel: float = Field(0.0, ge=0)
    min_delta: float = Field(0.0, ge=0)
    direction: Literal["up", "down", "both"] = "up"

    def lookback(self) -> int:
        """Steps of history needed before the first new step."""
        return self.window


class Trend(Selector):
    """Active when the value rose by at least ``rise`` (relative) over ``window`` steps.

    Compares the mean over the last ``smooth`` steps with the mean over the ``smooth`` steps ending
    ``window`` steps earlier, so one noisy point does not make a trend. A negative ``rise`` detects
    a fall of at least that much. ``min_value`` ignores series still below a floor (e.g. MaxVio
    rising from 0.1 to 0.2 is +100 % but harmless).

    ``smooth_by: median`` compares the two ends' medians instead of their means: for signals with
    heavy-tailed noise (a gradient norm, where one batch can carry ~10x its neighbours' value and
    lift a mean by +100 %), the median moves only when at least half of the ``smooth`` steps moved,
    i.e. on a change of level.
    """

    window: int = _window()
    rise: float = Field(..., description="relative change, e.g. 0.05 for +5 %")
    smooth: int | None = Field(None, ge=1)
    smooth_by: Literal["mean", "median"] = Field(
        "mean", description="how each end's `smooth` steps are summarised: mean (default) or median")
    min_value: float | None = None

    @field_validator("rise")
    @classmethod
    def _rise(cls, v: float) -> float:
        if v == 0 or v != v or abs(v) > 1e9:
            raise ValueError("rise must be a finite, non-zero relative change (e.g. 0.05 = +5 %, -0.1 = -10 %)")
        return v

    @property
    def smooth_steps(self) -> int:
        """Steps averaged at each end (default: a fifth of the window, at least 1)."""
        return self.smooth or max(1, self.window // 5)

    def lookback(self) -> int:
        """Steps of history needed before the first new step."""
        return self.window + self.smooth_steps


class NonFinite(_Strict):
    """Active at any step where a selected signal is NaN or ±Inf (all signals by default)."""

    metrics: tuple[str, ...] | None = None

    @field_validator("metrics", mode="before")
    @classmethod
    def _metrics(cls, v: Any, info: ValidationInfo) -> tuple[str, ...] | None:
        if v is None:
            return None
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError("metrics must be a name or a non-empty list of names")
        return tuple(check_metric_name(str(m), _extra_scalars(info)) for m in items)

    def lookback(self) -> int:
        """Steps of history needed before the first new step."""
        return 0


_FORBIDDEN_SQL = re.compile(
    r"\b(copy|attach|detach|install|load|pragma|set|reset|create|insert|update|delete|drop|alter|export|"
    r"import|call|checkpoint|vacuum|use|begin|commit|rollback|truncate|grant|revoke)\b",
    re.IGNORECASE,
)


class Sql(_Strict):
    """A custom read-only query returning ``run, step, value`` (and optionally ``tokens``, ``layer``).

    It runs as a subquery over the store's views (``scalars_effective``, ``layer_stats_effective``,
    …), so only a ``SELECT``/``WITH`` can run; statements that could write (COPY, ATTACH, SET, …)
    are refused when the file is loaded. A row is active when its value is above ``above`` / below
    ``below``, or, with neither given, when the value is non-zero.

    A query that reads only the two ``*_effective`` step views runs on the evaluation snapshot: each
    run's new steps plus ``lookback`` steps before its cursor (so without ``lookback`` it sees only the
    new steps). A query reading any other view runs on the store, over all of its history.
    """

    query: str
    above: float | None = None
    below: float | None = None
    lookback_steps: int = Field(0, ge=0, alias="lookback")

    @field_validator("query")
    @classmethod
    def _query(cls, q: str) -> str:
        body = q.strip().rstrip(";").strip()
        if not body:
            raise ValueError("query is empty")
        if ";" in body:
            raise ValueError("query must be a single statement (no ';')")
        if not re.match(r"^(select|with|from)\b", body, re.IGNORECASE):
            raise ValueError("query must be a read-only SELECT (or WITH ... SELECT)")
        bad = _FORBIDDEN_SQL.search(re.sub(r"'(?:[^']|'')*'", "''", body))
        if bad:
            raise ValueError(f"query may not use {bad.group(1).upper()}: alert queries are read-only")
        return body

    def lookback(self) -> int:
        """Steps of history needed before the first new step."""
        return self.lookback_steps


class Gap(_Strict):
    """Relative gap ``(L_low - L_ref) / L_ref`` between a branch run and its parent, on tokens.

    Evaluated for every run that has a ``parent``: the pair is oriented by precision (the lower
    precision is ``low``; by default the parent, e.g. NVFP4 with BF16 branches) with
    :func:`healthwatch.compare.relative_gap`. The alert belongs to the branch run, at its steps.
    ``smooth`` averages the gap over that many of the low run's points first (branch noise is
    larger than a 0.4 % band). ``absolute: true`` compares ``|gap|``.
    """

    metric: str = "loss/train"
    above: float = Field(..., gt=0, le=1e6)
    smooth: int = Field(1, ge=1, le=100_000)
    absolute: bool = False
    method: Literal["interpolate", "asof"] = "interpolate"

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str, info: ValidationInfo) -> str:
        check_metric_name(v, _extra_scalars(info))
        if is_layer_metric(v):
            raise ValueError(f"gap compares scalars (loss/train, loss/mtp_2, ...), not the layer metric {v!r}")
        return v

    def lookback(self) -> int:
        """Steps of history needed before the first new step (handled in points, see gap.py)."""
        return 0


class All(_Strict):
    """Active when every condition in ``of`` was active at some step in the last ``window`` steps.

    Conditions on layer metrics count as active when any selected layer is ("any layer").
    """

    window: int = _window()
    of: tuple[Expr, ...] = Field(..., min_length=2)

    @model_validator(mode="after")
    def _no_gap(self) -> All:
        for e in self.of:
            if e.kind == "gap":
                raise ValueError("gap cannot be combined inside `all`; give it a rule of its own")
        return self

    def lookback(self) -> int:
        """Steps of history needed before the first new step."""
        return self.window + max(e.body.lookback() for e in self.of)


class Leads(_Strict):
    """Active when ``leader`` is active while ``follower`` has not been, within ``window`` steps.

    The reference case: the 2nd MTP head's loss rises while the train loss does not yet. Active at
    step *s* when the leader was active at some step in ``(s - window, s]`` and the follower was
    logged but not active at any step there.
    """

    leader: Expr
    follower: Expr
    window: int = Field(1, ge=1, le=10_000_000)

    @model_validator(mode="after")
    def _no_gap(self) -> Leads:
        if "gap" in (self.leader.kind, self.follower.kind):
            raise ValueError("gap cannot be combined inside `leads`; give it a rule of its own")
        return self

    def lookback(self) -> int:
        """Steps of history needed before the first new step."""
        return self.window + max(self.leader.body.lookback(), self.follower.body.lookback())


DETECTOR_KINDS: tuple[str, ...] = ("threshold", "spike", "trend", "all", "leads", "gap", "nonfinite", "sql")


class Expr(_Strict):
    """A detector: a mapping with exactly one key, the detector's kind (``threshold: {...}``)."""

    threshold: Threshold | None = None
    spike: Spike | None = None
    trend: Trend | None = None
    all: All | None = None
    leads: Leads | None = None
    gap: Gap | None = None
    nonfinite: NonFinite | None = None
    sql: Sql | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, data: Any) -> Any:
        if isinstance(data, dict):
            kinds = [k for k in data if k in DETECTOR_KINDS]
            if len(data) == 0:
                raise ValueError(f"expr needs one detector: {', '.join(DETECTOR_KINDS)}")
            if len(kinds) > 1:
                raise ValueError(f"expr has several detectors ({', '.join(kinds)}); use `all:` to combine them")
            # `nonfinite: {}` and a bare `nonfinite:` (null) both mean "all signals".
            if kinds == ["nonfinite"] and data["nonfinite"] is None:
                data = {"nonfinite": {}}
        elif isinstance(data, str) and data in DETECTOR_KINDS:
            raise ValueError(f"write `{data}: {{...}}` with the detector's settings as a mapping")
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> Expr:
        if sum(getattr(self, k) is not None for k in DETECTOR_KINDS) != 1:
            raise ValueError(f"expr needs exactly one detector: {', '.join(DETECTOR_KINDS)}")
        return self

    @property
    def kind(self) -> str:
        """The detector kind (``"threshold"``, ``"spike"``, …)."""
        return next(k for k in DETECTOR_KINDS if getattr(self, k) is not None)

    @property
    def body(self) -> Any:
        """The detector's settings model."""
        return getattr(self, self.kind)


All.model_rebuild()
Leads.model_rebuild()


# ------------------------------------------------------------------------------------------
# rules, groups, files


class Rule(_Strict):
    """One alert rule. Durations (``for``, ``keep_firing_for``, ``cooldown``) count steps."""

    alert: str
    expr: Expr
    for_: int = Field(0, alias="for", ge=0, le=1_000_000_000)
    keep_firing_for: int = Field(0, ge=0, le=1_000_000_000)
    cooldown: int = Field(0, ge=0, le=1_000_000_000)
    severity: Literal["info", "warning", "critical"] = "warning"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, Template] = Field(default_factory=dict)
    notify: tuple[Literal["pending", "firing", "resolved"], ...] = ("firing", "resolved")
    #: The condition is ignored before this step of the run (it cannot go pending): early training,
    #: while routers, norms and losses are still settling, is not what the rule is about.
    min_step: int = Field(0, ge=0, le=1_000_000_000_000)
    #: Wall-clock seconds without a new Monitor heartbeat (``monitor/heartbeat``, one per flush)
    #: after which the run counts as stalled: the rule fires on the run (a stall rule, whose expr
    #: then never fires by value), and the run's other pending/firing instances go to ``no_data``
    #: instead of silently holding or resolving. A run whose Monitor closed is never stalled.
    no_data_after_s: float | None = Field(None, gt=0, le=1e9)

    @field_validator("alert")
    @classmethod
    def _alert(cls, v: str) -> str:
        if not _ALERT_NAME.match(v):
            raise ValueError(f"alert name {v!r} must be an identifier (letters, digits, '_'; not starting with a digit)")
        return v

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        if isinstance(v, dict):
            out = {}
            for k, val in v.items():
                if not isinstance(k, str) or not _LABEL_NAME.match(k):
                    raise ValueError(f"label name {k!r} must be an identifier")
                if k in RESERVED_LABELS:
                    raise ValueError(f"label {k!r} is set by the engine; choose another name")
                if isinstance(val, bool) or not isinstance(val, (str, int, float)):
                    raise ValueError(f"label {k!r}: value must be a string or number")
                out[k] = str(val)
            return out
        return v



class Group(_Strict):
    """A named group of rules (a group name is part of every rule's identity)."""

    name: str = Field(..., min_length=1, max_length=128)
    rules: tuple[Rule, ...] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Group:
        seen: set[str] = set()
        for r in self.rules:
            if r.alert in seen:
                raise ValueError(f"alert {r.alert!r} appears twice in group {self.name!r}")
            seen.add(r.alert)
        return self


class RuleFile(_Strict):
    """A whole rule file: groups of rules and the custom scalars they may name."""

    groups: tuple[Group, ...] = Field(..., min_length=1)
    extra_scalars: tuple[str, ...] = ()

    @field_validator("extra_scalars", mode="before")
    @classmethod
    def _extra(cls, v: Any) -> Any:
        from healthwatch.schema import validate_metric_name

        if v is None:
            return ()
        if not isinstance(v, (list, tuple)):
            raise ValueError("extra_scalars must be a list of scalar names")
        return tuple(validate_metric_name(str(x)) for x in v)


class LoadedRule(BaseModel):
    """A rule with where it came from: its group and its file (for messages and fingerprints)."""

    model_config = ConfigDict(frozen=True)

    group: str
    rule: Rule
    source: str = "<memory>"

    @property
    def name(self) -> str:
        """``group/alert``."""
        return f"{self.group}/{self.rule.alert}"


class RuleSet(BaseModel):
    """Rules loaded from one or more files, flattened, ready for the evaluator."""

    model_config = ConfigDict(frozen=True)

    rules: tuple[LoadedRule, ...]
    sources: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self):  # type: ignore[override]  # iterate rules, not pydantic fields
        return iter(self.rules)

    def names(self) -> list[str]:
        """``group/alert`` of every rule."""
        return [r.name for r in self.rules]

    def get(self, alert: str) -> LoadedRule:
        """The rule named ``alert`` (or ``group/alert``); ``KeyError`` with a suggestion otherwise."""
        for r in self.rules:
            if alert in (r.rule.alert, r.name):
                return r
        raise KeyError(f"no rule {alert!r}{suggest(alert, [r.rule.alert for r in self.rules])}")
