"""The Typer apps and the one place where user errors become a one-line message and exit status 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from evoforge.errors import EvoforgeError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Evolve merges of language models.")
forge_app = typer.Typer(no_args_is_help=True, add_completion=False, help="The seed document's spelling.")
console = Console(stderr=True)
"""Progress, warnings and errors."""
out = Console()
"""Results: tables and summaries a user may pipe."""

F = TypeVar("F", bound=Callable)


@forge_app.callback()
def forge() -> None:
    """The seed document's spelling: `forge evo ...` is `evoforge run ...`.

    The callback keeps `forge` a command group: with a single command Typer would make `forge` that command.
    """


def fail(message: str) -> NoReturn:
    """Print one line to stderr and exit 2; the message is text, not markup (`pip install 'evoforge[data]'`)."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def user_errors(fn: F) -> F:
    """Decorate a command: any EvoforgeError becomes `error: <one line>` and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EvoforgeError as exc:
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except KeyboardInterrupt:
            console.print("interrupted")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
