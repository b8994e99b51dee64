"""Where the commands print: stdout, stderr, the library's notices, and a user's error as one line."""

from __future__ import annotations

import functools
import logging

import typer
from rich.console import Console
from rich.markup import escape

from tracestore.errors import TraceError

# emoji=False: a path or parameter such as a:b:c must print as typed, not as an emoji code
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)


class _NoteHandler(logging.Handler):
    """The library's notices (a lock taken over, a lost part regrown) as one yellow line on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(f"[yellow]note:[/] {escape(record.getMessage())}", highlight=False, soft_wrap=True)


logging.getLogger("tracestore").addHandler(_NoteHandler())


def user_errors(command):
    """Print a TraceError as one red line and exit 1, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TraceError as error:
            err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper
