"""Annotation templates: ``{{ name }}`` or ``{{ name:format }}``, nothing else.

A deliberately tiny language (no Jinja): rule files come from users and notifications go to chat
rooms, so a template can only read the transition's fields, never evaluate code. Names: ``alert``,
``group``, ``run``, ``step``, ``tokens``, ``value``, ``layer``, ``severity``, ``state``, ``detail``,
``labels.<name>``. The optional format is a Python format spec (``{{ value:.3g }}``,
``{{ tokens:, }}``). A missing value never prints as ``-`` or ``None``: it says what is missing
(``tokens unknown``, ``no value``, ``all layers``; see :func:`missing_text`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

FIELDS: tuple[str, ...] = (
    "alert", "group", "run", "step", "tokens", "value", "layer", "severity", "state", "detail",
)
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(?::([^}]{0,20}))?\s*\}\}")
_FORMAT_SPEC = re.compile(r"^[<>^=]?[+\- ]?#?0?\d{0,3}[,_]?(?:\.\d{1,2})?[bcdeEfFgGnosxX%]?$")


def check_template(text: str) -> None:
    """Raise ``ValueError`` naming the first unknown placeholder or bad format spec in ``text``."""
    if not isinstance(text, str):
        raise ValueError("annotation must be a string")
    for m in _PLACEHOLDER.finditer(text):
        name, spec = m.group(1), m.group(2)
        if not (name in FIELDS or (name.startswith("labels.") and len(name) > 7)):
            close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown template field {name!r}{hint}; use {', '.join(FIELDS)} or labels.<name>")
        if spec is not None and not _FORMAT_SPEC.match(spec.strip()):
            raise ValueError(f"bad format spec {spec!r} for {name!r} (use e.g. .3g, ,, .1%)")
    leftover = _PLACEHOLDER.sub("", text)
    if "{{" in leftover or "}}" in leftover:
        raise ValueError("unbalanced or malformed '{{ … }}' placeholder")


#: What a placeholder says when its field has no value (rather than ``-`` or ``None``).
_MISSING: dict[str, str] = {
    "value": "no value",
    "tokens": "tokens unknown",
    "layer": "all layers",
    "step": "step unknown",
    "detail": "no detail",
    "group": "no group",
}


def missing_text(name: str) -> str:
    """The words shown for field ``name`` when it has no value (e.g. ``tokens unknown``)."""
    if name.startswith("labels."):
        return f"no label {name[7:]}"
    return _MISSING.get(name, f"{name} unknown")


def render(text: str, values: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """Fill the placeholders of ``text`` from ``values`` and ``labels`` (never raises)."""

    def sub(m: re.Match[str]) -> str:
        name, spec = m.group(1), (m.group(2) or "").strip()
        value = labels.get(name[7:]) if name.startswith("labels.") else values.get(name)
        if value is None:
            return missing_text(name)
        try:
            return format(value, spec) if spec else str(value)
        except (ValueError, TypeError):
            return str(value)

    return _PLACEHOLDER.sub(sub, text)
