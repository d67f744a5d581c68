"""The one rollup validity rule: which rollup rows may stand in for a path's raw rows.

A rollup row summarises rows of one attempt in one bucket (:mod:`healthwatch.store.rollup`).
For a path (:class:`~healthwatch.query.timeline.Timeline`) and a bucket size ``s``, attempt
``a`` on the path is served from its rollups below a limit ``L(a)``:

* ``L(a)`` ≤ the first step not covered by ``a``'s rollups (its highest rolled-up bucket + 1:
  buckets close in step order);
* ``L(a)`` ≤ the start of the bucket holding ``cut(a)``, the step where a later attempt on the
  path supersedes ``a`` (a bucket straddling the cut mixes kept and superseded rows);
* ``L(a)`` is a multiple of ``s``.

Below ``L(a)`` every row of ``a`` is on the path and in a rollup row; from ``L(a)`` on, ``a``'s
rows are read raw. This holds whatever the order of writes, merges, compactions and rollbacks,
because it only uses the attempts table and the rollup rows' own attempt and bucket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from healthwatch.query.timeline import Timeline
from healthwatch.store import ROLLUP_BUCKETS, Store
from healthwatch.store.reader import per_run


@dataclass(frozen=True)
class RollupPlan:
    """Per attempt on a path, the step below which ``size``-step rollups serve its rows."""

    size: int
    limits: tuple[tuple[int, int], ...] = ()
    #: Whether the table may hold rows of attempts without rollups here (False only when the
    #: store's files say none: then :meth:`raw_conditions` has no "every other attempt" part).
    others: bool = True

    def rollup_pred(self, params: list[Any], lo: int | None = None) -> str:
        """SQL (a boolean) selecting the usable rollup rows (rollup columns ``attempt``, ``bucket``).

        ``lo`` keeps only buckets starting at or after ``lo`` (a multiple of ``size``).
        """
        parts = []
        for a, lim in self.limits:
            if lo is None:
                parts.append("(attempt = ? AND bucket < ?)")
                params += [a, lim // self.size]
            else:
                parts.append("(attempt = ? AND bucket >= ? AND bucket < ?)")
                params += [a, -(-int(lo) // self.size), lim // self.size]
        return "(" + " OR ".join(parts) + ")" if parts else "false"

    def raw_pred(self, params: list[Any]) -> str:
        """SQL (``AND …``) removing from raw rows those served by the rollups."""
        sql = ""
        for a, lim in self.limits:
            sql += " AND NOT (attempt = ? AND step < ?)"
            params += [a, lim]
        return sql

    def raw_conditions(self) -> list[str]:
        """The raw rows not served by the rollups as disjoint conditions (``AND …``); see :meth:`raw_params`.

        One per attempt with rollups (its steps from ``L(a)`` on) and one for every other attempt:
        the union of the rows they select is what :meth:`raw_pred` keeps, but each is a plain
        conjunction of comparisons that Parquet min/max statistics prune, so reading the raw tail of
        a million-step series decodes the tail's row groups, not the whole history. (Rows off the
        path are never below ``L(a)``: ``L(a)`` is at most the cut of ``a``.) The text holds only
        placeholders, so it is built apart from the values (:meth:`raw_params`, same order).
        """
        if not self.limits:
            return [""]
        marks = ", ".join("?" for _ in self.limits)
        # Without "others" (no file holds another attempt), the "NOT IN" part is left out: in a live
        # writer's unsealed segments (no attempt statistics) it decoded every row just to find none.
        other = [f" AND attempt NOT IN ({marks})"] if self.others else []
        return [" AND attempt = ? AND step >= ?" for _ in self.limits] + other

    def raw_params(self) -> list[list[Any]]:
        """The parameters of each of :meth:`raw_conditions`, in the same order."""
        if not self.limits:
            return [[]]
        other = [[a for a, _ in self.limits]] if self.others else []
        return [[a, lim] for a, lim in self.limits] + other

    @property
    def used(self) -> bool:
        """Whether any rollup row can be used."""
        return bool(self.limits)

    def limit(self, attempt: int) -> int | None:
        """``L(attempt)``, or None when the attempt has no usable rollups."""
        return dict(self.limits).get(int(attempt))


@per_run
def plan(store: Store, run: str, table: str, path: Timeline, size: int = ROLLUP_BUCKETS[0],
         key_sql: str = "", key_params: Sequence[Any] = ()) -> RollupPlan:
    """The :class:`RollupPlan` of ``run``'s ``table`` rollups at ``size`` for ``path``.

    ``key_sql`` (``AND name = ?`` …) narrows the coverage query to the keys read: a key's rollups
    cover its buckets up to its own last rolled-up bucket, which is all a reader of it needs.
    """
    if size not in ROLLUP_BUCKETS:
        raise ValueError(f"no rollups of {size} steps (sizes: {ROLLUP_BUCKETS})")
    if table not in ("scalars", "layer_stats"):
        raise ValueError(f"no rollups for table {table!r}")
    rows = store.sql(
        f"SELECT attempt, max(bucket) FROM {table}_rollup WHERE run = ? AND bucket_size = ?{key_sql} GROUP BY attempt",
        [run, int(size), *key_params],
    ).fetchall()
    present = getattr(store, "attempts_present", None)
    return plan_of(rows, path, size, lambda: present(table, run) if present is not None else None)


def plan_of(tops: Sequence[tuple[Any, Any]], path: Timeline, size: int,
            held: Callable[[], frozenset[Any] | None] = lambda: None) -> RollupPlan:
    """The rule itself: the :class:`RollupPlan` from each attempt's highest rolled-up bucket ``tops``
    (``(attempt, max(bucket))`` of the rollup rows read) on ``path``. ``held()`` gives the attempts
    that have raw rows (None: unknown, assume any); asked only when some rollup is usable."""
    limits = []
    for a, top in tops:
        if a is None or top is None:
            continue
        a = int(a)
        if path.attempt is not None and a > path.attempt:
            continue
        lim = (int(top) + 1) * size
        c = path.cut_of(a)
        if c is not None:
            lim = min(lim, (c // size) * size)
        if lim > 0:
            limits.append((a, lim))
    have = held() if limits else None
    others = have is None or not have <= {a for a, _ in limits}
    return RollupPlan(size, tuple(sorted(limits)), others)


def coarsest(width: int) -> int | None:
    """The largest rollup size that fits in a display bucket of ``width`` steps, or None."""
    fits = [s for s in ROLLUP_BUCKETS if s <= width]
    return max(fits) if fits else None


def display_width(lo: int, hi: int, max_buckets: int) -> int:
    """Width of display buckets for steps ``[lo, hi]`` in at most ~``max_buckets`` buckets.

    From 100 steps on it is a multiple of the largest rollup size that fits, so rollup buckets
    nest in display buckets. Depends only on the span, never on what is rolled up, so a reader
    answers the same before and after compaction.
    """
    w = max(1, -(-(int(hi) - int(lo) + 1) // max(1, int(max_buckets))))
    s = coarsest(w)
    return w if s is None else -(-w // s) * s
