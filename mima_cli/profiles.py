"""``mima profiles``: list, show and validate profiles."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from engine.profile import ProfileError, dump_profile, load_profile, shipped_profiles
from mima_cli.console import EXIT_USAGE, console, error, print_json
from mima_cli.options import JSON_OPTION, PROFILE_ARGUMENT, SET_OPTION

app = typer.Typer(no_args_is_help=True, help="List, show and validate profiles.")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="profiles")


@app.command("list")
def list_profiles(json_out: bool = JSON_OPTION) -> None:
    """List the profiles shipped with mima.

    Example: mima profiles list --json
    """
    rows = []
    for name, path in shipped_profiles().items():
        row = {"name": name, "path": str(path), "description": "", "base": None, "concepts": 0, "groups": 0, "error": None}
        try:
            p = load_profile(path)
            row.update(description=p.description, base=p.model.base, concepts=len(p.concepts), groups=len(p.groups))
        except ProfileError as e:
            row["error"] = str(e)
        rows.append(row)
    if json_out:
        print_json(rows)
        return
    table = Table("name", "base", "concepts", "groups", "description")
    for row in rows:
        table.add_row(
            row["name"],
            row["base"] or "",
            str(row["concepts"]),
            str(row["groups"]),
            row["description"] if row["error"] is None else f"[red]invalid:[/] {row['error']}",
        )
    console.print(table)


@app.command()
def show(
    profile: str = PROFILE_ARGUMENT,
    set_: list[str] = SET_OPTION,
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of TOML."),
) -> None:
    """Print a profile with every default filled in, as a run saves it.

    Example: mima profiles show styles --set immunize.steps=10
    """
    p = load_profile(profile, set_)
    if json_out:
        print_json(p.model_dump(mode="json"))
    else:
        typer.echo(dump_profile(p), nl=False)


@app.command()
def validate(
    files: list[str] = typer.Argument(None, help="Profile files or shipped names (default: every shipped profile)."),
    set_: list[str] = SET_OPTION,
    json_out: bool = JSON_OPTION,
) -> None:
    """Check profiles: one line per file, problems on stderr; exit 2 if any is invalid.

    Example: mima profiles validate my-profile.toml
    """
    targets = list(files or []) or [str(p) for p in shipped_profiles().values()]
    results = []
    for target in targets:
        try:
            p = load_profile(target, set_)
            results.append({"file": target, "ok": True, "error": None, "concepts": len(p.concepts), "groups": len(p.groups)})
        except ProfileError as e:
            results.append({"file": target, "ok": False, "error": str(e)})
    if json_out:
        print_json(results)
    else:
        for r in results:
            if r["ok"]:
                typer.echo(f"ok: {r['file']} ({r['concepts']} concepts, {r['groups']} groups)")
            else:
                error(r["error"])
    if not all(r["ok"] for r in results):
        raise typer.Exit(EXIT_USAGE)
