"""A state change of one alert instance, as recorded in the ``alerts`` table and sent to sinks."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


def fingerprint(group: str, alert: str, run: str, layer: int | None, labels: Mapping[str, str]) -> str:
    """Deterministic id of an alert instance: the same rule, run, layer and labels always give the
    same 16 hex digits, in every evaluator process (it is how two evaluators agree on identity)."""
    key = json.dumps([group, alert, run, layer, sorted(labels.items())], separators=(",", ":"))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Transition:
    """One transition of an alert instance (``state`` is the new state, ``previous`` the old one).

    ``labels`` holds the rule's labels plus ``alertname``, ``group``, ``run``, ``severity`` and, for
    per-layer rules, ``layer``; ``annotations`` are rendered for this transition. ``layer`` is the
    layer the value came from (also for ``aggregate: max``), or None.
    """

    alert: str
    group: str
    state: str
    previous: str
    severity: str
    run: str
    step: int
    tokens: int | None
    layer: int | None
    value: float | None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    detail: str | None = None
    evaluator: str = ""
    wall_time: float = 0.0
    backfill: bool = False

    @property
    def key(self) -> tuple[str, str, int]:
        """``(fingerprint, state, step)``: what makes a transition the same one across evaluators."""
        return (self.fingerprint, self.state, int(self.step))

    @property
    def summary(self) -> str:
        """The ``summary`` annotation, or a generated one-liner."""
        if self.annotations.get("summary"):
            return self.annotations["summary"]
        where = f" layer {self.layer}" if self.layer is not None else ""
        val = "no value recorded" if self.value is None else f"value {self.value:.4g}"
        return f"{self.alert} {self.state} on {self.run}{where} at step {self.step:,} ({val})"

    def to_row(self) -> dict[str, Any]:
        """The row of the ``alerts`` table (the run is the partition, not a column)."""
        return {
            "alert": self.alert,
            "group": self.group,
            "state": self.state,
            "severity": self.severity,
            "step": int(self.step),
            "tokens": None if self.tokens is None else int(self.tokens),
            "layer": self.layer,
            "value": self.value,
            "labels": json.dumps(self.labels, sort_keys=True),
            "annotations": json.dumps(self.annotations, sort_keys=True),
            "fingerprint": self.fingerprint,
            "evaluator": self.evaluator,
            "wall_time": self.wall_time,
        }

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite values become strings ``"nan"``, ``"inf"``, ``"-inf"``)."""
        d = asdict(self)
        v = d["value"]
        if isinstance(v, float) and not math.isfinite(v):
            d["value"] = str(v)
        return d
