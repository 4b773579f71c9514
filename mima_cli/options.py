"""Options and helpers shared by command modules.

A command that takes a profile uses :data:`SET_OPTION` and :func:`load_profile_for`; flags that
override profile fields go through :func:`explicit_flags`, so that only flags the user actually typed
beat the profile and ``--set`` (precedence: profile < ``--set`` < explicit flags)::

    @app.command()
    def run(
        ctx: typer.Context,
        profile: str = PROFILE_ARGUMENT,
        set_: list[str] = SET_OPTION,
        steps: int = typer.Option(1000, help="Immunization steps."),
    ):
        p = load_profile_for(ctx, profile, set_, {"steps": "immunize.steps"})
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from engine.profile import Profile, apply_flags, load_profile


@dataclass
class CliState:
    """Global options of the root command (``ctx.obj``)."""

    runs_dir: Path = Path("runs")
    verbose: bool = False


def cli_state(ctx: typer.Context) -> CliState:
    obj = ctx.find_object(CliState)
    return obj if obj is not None else CliState()


def runs_dir(ctx: typer.Context) -> Path:
    return cli_state(ctx).runs_dir


PROFILE_ARGUMENT = typer.Argument(..., help="A profile file, or the name of a shipped profile (see `mima profiles list`).")
SET_OPTION = typer.Option(
    [], "--set", metavar="KEY=VALUE", help="Override a profile value, e.g. --set immunize.steps=10 (repeatable)."
)
JSON_OPTION = typer.Option(False, "--json", help="Print JSON instead of a table.")


def explicit_flags(ctx: typer.Context, fields: dict[str, str]) -> dict[str, Any]:
    """``{profile field: value}`` for the parameters (``{param name: profile field}``) given on the
    command line or through their environment variable; defaults are left out."""
    given = {}
    for param, field in fields.items():
        source = ctx.get_parameter_source(param)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            given[field] = ctx.params[param]
    return given


def load_profile_for(
    ctx: typer.Context, profile: str, sets: list[str] | None = None, flags: dict[str, str] | None = None
) -> Profile:
    """Load ``profile`` with ``--set`` overrides, then the explicit flags among ``flags``."""
    p = load_profile(profile, sets or [])
    return apply_flags(p, explicit_flags(ctx, flags)) if flags else p
