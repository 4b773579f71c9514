"""Output helpers shared by every command: errors on stderr as one line, exit codes, JSON output.

Exit codes: 0 ok, 1 failure, 2 usage or profile error, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

console = Console()
"""stdout: tables and results."""
err_console = Console(stderr=True)
"""stderr: errors, warnings and progress."""


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def error(message: object) -> None:
    """Print ``error: message`` as one line on stderr (no exit)."""
    err_console.print(f"[bold red]error:[/] {escape(_one_line(message))}", soft_wrap=True, highlight=False)


def warn(message: object) -> None:
    """Print ``warning: message`` as one line on stderr."""
    err_console.print(f"[yellow]warning:[/] {escape(_one_line(message))}", soft_wrap=True, highlight=False)


def fail(message: object, code: int = EXIT_FAILURE) -> NoReturn:
    """Print one error line on stderr and exit with ``code``."""
    error(message)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    """Write ``data`` as JSON on stdout (the ``--json`` output of read commands)."""
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))
