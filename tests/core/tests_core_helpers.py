"""Helpers shared by core tests."""

from __future__ import annotations

from toymodel import ToyLM


def tiny_model() -> ToyLM:
    """The forced-routing toy model."""
    return ToyLM()
