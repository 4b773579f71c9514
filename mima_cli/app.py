"""The ``mima`` command: the root Typer app, global options, error handling and exit codes.

Each command lives in its own module of ``mima_cli`` that defines ``register(app)``; adding one is one
line in :data:`COMMANDS`. Command modules import heavy libraries (torch, diffusers) inside their
functions so that ``mima --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from engine.errors import UsageError
from mima_cli.console import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, err_console, fail
from mima_cli.options import CliState

COMMANDS = (
    "profiles",
    "runs",
    "testbed",
    "generate",
    "immunize",
    "attack",
    "evaluate",
    "report",
    "reproduce",
    "sweep",
    "export",
    "doctor",
    "bench",
    "tui_cmd",
)
"""Command modules, registered in this order (each defines ``register(app: typer.Typer)``)."""


def _passthrough() -> tuple[type[BaseException], ...]:
    """Exceptions the CLI framework itself handles (exit, abort, usage errors)."""
    kinds: list[type[BaseException]] = [typer.Exit, typer.Abort]
    try:
        from typer.exceptions import TyperException

        kinds.append(TyperException)
    except ImportError:  # typer versions that use click directly
        pass
    try:
        import click

        kinds += [click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort]
    except ImportError:
        pass
    return tuple(kinds)


_PASSTHROUGH = _passthrough()


class MimaGroup(TyperGroup):
    """Root group: bad input anywhere (an ``engine.errors.UsageError``: a profile, a flag, a run id, a model
    reference, an image set) is one line and exit 2, Ctrl-C exit 130, any other
    exception one line and exit 1 (with the traceback under ``--verbose``)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _PASSTHROUGH:
            raise
        except UsageError as e:
            fail(e, EXIT_USAGE)
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except Exception as e:
            state = ctx.find_object(CliState)
            if state is not None and state.verbose:
                err_console.print(traceback.format_exc(), markup=False, highlight=False, end="")
            message = str(e).strip()
            fail(f"{type(e).__name__}: {message}" if message else type(e).__name__, EXIT_FAILURE)


app = typer.Typer(
    name="mima",
    cls=MimaGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Immunize text-to-image diffusion models against fine-tuning on harmful concepts (MIMA).",
)


@app.callback()
def root(
    ctx: typer.Context,
    runs_dir: Path = typer.Option(
        Path("runs"), "--runs-dir", envvar="MIMA_RUNS_DIR", help="Where runs are written and read."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show full tracebacks of unexpected errors."),
) -> None:
    """Immunize text-to-image diffusion models against fine-tuning on harmful concepts (MIMA).

    Example: mima profiles show styles
    """
    ctx.obj = CliState(runs_dir=runs_dir, verbose=verbose)


for _name in COMMANDS:
    importlib.import_module(f"mima_cli.{_name}").register(app)


def main() -> None:
    """Console-script entry point: exit 0 ok, 1 failure, 2 usage/profile error, 130 interrupted."""
    try:
        app(prog_name="mima")
    except KeyboardInterrupt:
        err_console.print("interrupted", highlight=False)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
