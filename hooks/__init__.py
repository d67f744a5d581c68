"""Trainer-side instrumentation: the :class:`Monitor` callback and model adapters."""

from healthwatch.hooks.monitor import Monitor

__all__ = ["Monitor"]
