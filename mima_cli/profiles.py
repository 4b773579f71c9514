"""``mima profiles``: list, show and validate profiles."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from engine.profile import ProfileError, dump_profile, load_profile, resolve_profile_path, shipped_profiles
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
    check_images: bool = typer.Option(
        None, "--check-images/--no-check-images",
        help="Open every image of the profile's folder image sets (default: for profile files, not shipped ones)."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Check profiles: one line per file, problems on stderr; exit 2 if any is invalid.

    The folder image sets of a profile file are checked too (missing or empty folders, unreadable images), as
    `mima immunize`, `erase`, `attack` and `reproduce` check them before any work; shipped profiles only with
    --check-images (their data folders are fetched separately).

    Example: mima profiles validate my-profile.toml
    """
    from engine.image_sets import check_image_sets, profile_image_sets

    targets = list(files or []) or [str(p) for p in shipped_profiles().values()]
    shipped = {str(p.resolve()) for p in shipped_profiles().values()}
    results = []
    for target in targets:
        try:
            p = load_profile(target, set_)
            row = {"file": target, "ok": True, "error": None, "concepts": len(p.concepts), "groups": len(p.groups),
                   "images_checked": None}
            if check_images if check_images is not None else str(resolve_profile_path(target).resolve()) not in shipped:
                row["images_checked"] = check_image_sets(profile_image_sets(p), path=target)
            results.append(row)
        except ProfileError as e:
            results.append({"file": target, "ok": False, "error": str(e)})
    if json_out:
        print_json(results)
    else:
        for r in results:
            if r["ok"]:
                images = "" if r["images_checked"] is None else f", {r['images_checked']} image files read"
                typer.echo(f"ok: {r['file']} ({r['concepts']} concepts, {r['groups']} groups{images})")
            else:
                error(r["error"])
    if not all(r["ok"] for r in results):
        raise typer.Exit(EXIT_USAGE)
