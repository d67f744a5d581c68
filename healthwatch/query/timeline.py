"""An attempt's path: the one definition of which rows a later attempt supersedes.

Implemented in :mod:`healthwatch.store.timeline` (the bottom of the store, so the store's views
are generated from it without importing the query layer); this is its public name for readers.
"""

from healthwatch.store.timeline import Timeline, all_view_sql, path_view_sql, view_sql

__all__ = ["Timeline", "all_view_sql", "path_view_sql", "view_sql"]
