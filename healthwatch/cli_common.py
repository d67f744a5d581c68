"""Pieces shared by the ``healthwatch`` command line and its sub-apps: consoles, options, errors."""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer
from rich.console import Console

#: Normal output (tables, results).
console = Console()
#: Errors and warnings, on stderr so that piped output stays clean.
err = Console(stderr=True)

#: The ``--store/-s`` option every command that reads or writes a store takes: a directory or a URI
#: (``s3://bucket/prefix``). A string, not a ``Path``: ``Path`` folds ``s3://`` into ``s3:/``.
StoreOpt = Annotated[
    str | None,
    typer.Option("--store", "-s", help="Store directory or s3://bucket/prefix (default: $HEALTHWATCH_STORE or "
                 "./healthwatch-store)."),
]


def new_app(help_text: str, name: str | None = None) -> typer.Typer:
    """A typer app with the project's settings (no completion install, no locals in tracebacks)."""
    return typer.Typer(name=name, help=help_text, no_args_is_help=True, add_completion=False,
                       pretty_exceptions_show_locals=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code`` (2: bad input)."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)
