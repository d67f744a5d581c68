"""Alert rules on health signals: rule model, detectors, evaluator, sinks, YAML packs.

>>> from healthwatch.alerts import Evaluator, load_rules, ConsoleSink
>>> ev = Evaluator("hw-store", load_rules("default"), sinks=[ConsoleSink()])   # doctest: +SKIP
>>> ev.evaluate_once()                                                            # doctest: +SKIP

Trainer side: ``Monitor(alerts="default", on_alert=callback)`` uses :func:`monitor_evaluator`.
See ``docs/alerts.md`` for the rule language and the default pack.
"""

from __future__ import annotations

from healthwatch.alerts.backtest import BacktestResult, backtest, find_loss_spike
from healthwatch.alerts.engine import Evaluator
from healthwatch.alerts.gap import relative_gap
from healthwatch.alerts.integration import MonitorEvaluator, monitor_evaluator
from healthwatch.alerts.loader import RuleFileError, load_file, load_pack, load_rules, load_text, pack_path
from healthwatch.alerts.rules import Rule, RuleSet
from healthwatch.alerts.sinks import AppriseSink, CallbackSink, ConsoleSink, JsonlSink, redact_url
from healthwatch.alerts.transition import Transition

__all__ = [
    "AppriseSink",
    "BacktestResult",
    "CallbackSink",
    "ConsoleSink",
    "Evaluator",
    "JsonlSink",
    "MonitorEvaluator",
    "Rule",
    "RuleFileError",
    "RuleSet",
    "Transition",
    "backtest",
    "find_loss_spike",
    "load_file",
    "load_pack",
    "load_rules",
    "load_text",
    "monitor_evaluator",
    "pack_path",
    "redact_url",
    "relative_gap",
]
