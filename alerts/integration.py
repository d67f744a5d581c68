"""Trainer integration: the object the Monitor's writer thread calls after each flush.

``Monitor(alerts=..., on_alert=callback)`` builds it with :func:`monitor_evaluator` and calls
``after_flush(store_root, run)`` after every flush it wrote; the transitions returned are passed
to ``on_alert`` one by one (the demo stops and rolls back on a critical firing alert).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from healthwatch.alerts.engine import Evaluator
from healthwatch.alerts.loader import load_rules
from healthwatch.alerts.rules import RuleSet
from healthwatch.alerts.transition import Transition


class MonitorEvaluator:
    """Evaluates rules for one run after each Monitor flush.

    Rules are validated when this object is built (so a bad rule file fails at ``Monitor(...)``
    time, not silently in the writer thread). The evaluator itself is created at the first flush
    (the store may not exist before). Everything unrecorded is news to a trainer, so it uses the
    ``backfill="all"`` policy: a resumed attempt re-derives the transitions already recorded and
    the store's records keep them from being reported twice.
    """

    def __init__(self, rules: Any, store_root: str | os.PathLike[str], run: str,
                 sinks: Iterable[Any] | None = None) -> None:
        self.rules: RuleSet = load_rules(rules)
        self.store_root = Path(store_root)
        self.run = run
        self.sinks = list(sinks or [])
        self._ev: Evaluator | None = None
        self._lock = threading.Lock()

    def after_flush(self, store_root: str | os.PathLike[str] | None = None, run: str | None = None) -> list[Transition]:
        """Evaluate the steps flushed since the last call; returns the transitions that are news to the
        trainer (all states), whichever evaluator recorded them."""
        root = Path(store_root) if store_root is not None else self.store_root
        run = run or self.run
        with self._lock:
            if self._ev is None or self._ev.root != root or self._ev.runs != [run]:
                if self._ev is not None:
                    self._ev.close()
                self._ev = Evaluator(root, self.rules, sinks=self.sinks, runs=[run], backfill="all")
            self._ev.evaluate_once()
            # Not only the transitions this evaluator claimed: a daemon (`alerts watch`) on the same
            # store may have recorded and notified one first, and the trainer must still hear of it.
            return list(self._ev.last_seen)

    @property
    def evaluator(self) -> Evaluator | None:
        """The underlying evaluator (None before the first flush)."""
        return self._ev

    def close(self) -> None:
        """Release the store connection."""
        with self._lock:
            if self._ev is not None:
                self._ev.close()
                self._ev = None


def monitor_evaluator(rules: Any, store_root: str | os.PathLike[str], run: str,
                      sinks: Iterable[Any] | None = None) -> MonitorEvaluator:
    """Build the Monitor's after-flush evaluator.

    ``rules`` is a path, a list of paths, ``"default"`` (the shipped pack) or a loaded
    :class:`RuleSet`; ``sinks`` optionally also notifies (console, Slack, …) from the trainer.
    """
    return MonitorEvaluator(rules, store_root, run, sinks)
