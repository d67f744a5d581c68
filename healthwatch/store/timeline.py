"""The one definition of an attempt's path (which rows a later attempt supersedes).

Every start or resume of a run opens an attempt with a ``start_step``. The path of attempt ``N``
is what the run looked like to that attempt: the rows of attempts ``a <= N``, each cut at the
first start step of a later attempt ``b`` with ``a < b <= N``. The *effective* path is the path of
the latest attempt; rows off it are *superseded* (kept, drawn ghosted, never deleted).

Everything that needs this rule gets it from here (through :mod:`healthwatch.query.timeline`,
its public name): the store's ``*_effective``/``*_all`` views (:func:`view_sql`), the alert
engine's per-attempt sources (:func:`path_view_sql`), the query functions (:class:`Timeline`
predicates) and the rollup validity rule (:mod:`healthwatch.query.rollups`). It lives at the
bottom of the store package (it imports nothing) so the store's reader can build its views from
it without importing the query layer above it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: Attempts of each run, one row per attempt (a duplicated attempts row must not duplicate data rows).
_ATTEMPTS = "(SELECT run, attempt, min(start_step) AS start_step FROM attempts GROUP BY run, attempt)"


def _cuts_sql(upto: int | None) -> str:
    """SQL of ``(run, attempt, cut)``: the step from which each attempt's rows leave the path."""
    bound = "" if upto is None else f" AND b.attempt <= {int(upto)}"
    return (
        f"SELECT a.run, a.attempt, (SELECT min(b.start_step) FROM {_ATTEMPTS} b WHERE b.run = a.run "
        f"AND b.attempt > a.attempt{bound}) AS cut FROM {_ATTEMPTS} a"
    )


def path_view_sql(table: str, attempt: int | None = None) -> str:
    """SQL of the rows of ``table`` on the path of ``attempt`` (None: the effective path), all runs.

    A row whose attempt has no ``attempts`` row (a writer that died before declaring it) stays
    on the path of every attempt: nothing is known to supersede it.
    """
    keep = "" if attempt is None else f" AND t.attempt <= {int(attempt)}"
    return (
        f"SELECT t.* FROM {table} t LEFT JOIN ({_cuts_sql(attempt)}) c ON t.run = c.run AND t.attempt = c.attempt "
        f"WHERE (c.cut IS NULL OR t.step < c.cut){keep}"
    )


def all_view_sql(table: str) -> str:
    """SQL of every row of ``table`` with a ``superseded`` flag (off the effective path)."""
    return (
        f"SELECT t.*, coalesce(t.step >= c.cut, false) AS superseded FROM {table} t "
        f"LEFT JOIN ({_cuts_sql(None)}) c ON t.run = c.run AND t.attempt = c.attempt"
    )


def view_sql(table: str) -> dict[str, str]:
    """The derived views of an attempt table: ``{table}_effective`` and ``{table}_all``."""
    return {f"{table}_effective": path_view_sql(table), f"{table}_all": all_view_sql(table)}


@dataclass(frozen=True)
class Timeline:
    """The path of one attempt of one run, resolved from its attempts rows.

    ``attempt`` None is the effective path (the latest attempt). ``cut`` maps each attempt to the
    step from which its rows leave this path (``None``: never), ``attempts`` lists every attempt
    of the run with its start step.
    """

    attempt: int | None
    cut: tuple[tuple[int, int], ...] = ()
    attempts: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, attempts: Iterable[tuple[int, int | None]], attempt: int | None = None) -> Timeline:
        """The path of ``attempt`` (None: effective) given ``(attempt, start_step)`` rows (duplicates allowed)."""
        starts: dict[int, int] = {}
        for a, s in attempts:
            if s is None:
                continue
            starts[int(a)] = min(int(s), starts.get(int(a), int(s)))
        rows = sorted(starts.items())
        if not rows:
            return cls(attempt, (), ())
        upto = max(a for a, _ in rows) if attempt is None else int(attempt)
        cut = []
        for a, _s in rows:
            if a >= upto:
                continue
            later = [s for a2, s in rows if a < a2 <= upto]
            if later:
                cut.append((a, min(later)))
        return cls(None if attempt is None else int(attempt), tuple(cut), tuple(rows))

    def cut_of(self, attempt: int) -> int | None:
        """The step from which ``attempt``'s rows leave this path (None: never)."""
        return dict(self.cut).get(int(attempt))

    def on_path(self, attempt: int, step: int) -> bool:
        """Whether a row of ``attempt`` at ``step`` is on this path (the rule, in Python)."""
        if self.attempt is not None and attempt > self.attempt:
            return False
        c = self.cut_of(attempt)
        return c is None or step < c

    def superseded_mask(self, attempt: Any, step: Any) -> Any:
        """The rule over columns: true where a row is *not* on this path.

        ``attempt`` and ``step`` are numpy arrays, polars Series or polars expressions (only
        ``==``, ``>=``, ``>``, ``&``, ``|`` are used): the same rule as :meth:`superseded_expr`
        and :meth:`on_path`, for a reader that filters rows without SQL (the cheap one-series
        read of a fresh process).
        """
        off = attempt != attempt  # all false (attempts are integers)
        for a, s in self.cut:
            off = off | ((attempt == int(a)) & (step >= int(s)))
        if self.attempt is not None:
            off = off | (attempt > int(self.attempt))
        return off

    def predicate(self, params: list[Any]) -> str:
        """SQL (``AND …``) keeping the rows of this path; appends its parameters to ``params``."""
        sql = ""
        if self.attempt is not None:
            sql += " AND attempt <= ?"
            params.append(int(self.attempt))
        for attempt, step in self.cut:
            sql += " AND NOT (attempt = ? AND step >= ?)"
            params += [int(attempt), int(step)]
        return sql

    def superseded_expr(self, params: list[Any]) -> str:
        """SQL boolean expression: true for rows of the run that are *not* on this path."""
        parts = ["(attempt = ? AND step >= ?)" for _ in self.cut]
        for attempt, step in self.cut:
            params += [int(attempt), int(step)]
        if self.attempt is not None:
            parts.append("attempt > ?")
            params.append(int(self.attempt))
        return "(" + " OR ".join(parts) + ")" if parts else "false"

    @property
    def has_ghosts(self) -> bool:
        """Whether some rows of the run are off this path."""
        return bool(self.cut) or (self.attempt is not None and any(a > self.attempt for a, _ in self.attempts))
