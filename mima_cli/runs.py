"""``mima runs``: list and inspect run directories."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from engine.runs import RunNotFound, RunReader, find_run, list_runs
from mima_cli.console import EXIT_USAGE, console, fail, print_json
from mima_cli.options import JSON_OPTION, runs_dir

app = typer.Typer(no_args_is_help=True, help="List and inspect runs.")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="runs")


STATE_STYLE = {"running": "cyan", "finished": "green", "failed": "red", "interrupted": "yellow", "unknown": "dim"}


def _age(t: object) -> str:
    if not isinstance(t, (int, float)):
        return ""
    seconds = max(0, int(time.time() - t))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


@app.command("list")
def list_(ctx: typer.Context, json_out: bool = JSON_OPTION) -> None:
    """List runs, oldest first.

    Example: mima --runs-dir runs runs list
    """
    runs = list_runs(runs_dir(ctx))
    if json_out:
        print_json(runs)
        return
    if not runs:
        console.print(f"no runs in {runs_dir(ctx)}", highlight=False)
        return
    table = Table("id", "kind", "method", "group", "state", "progress", "updated")
    for r in runs:
        state = str(r.get("state"))
        progress = r.get("progress")
        table.add_row(
            str(r.get("id")),
            str(r.get("kind") or ""),
            str(r.get("method") or ""),
            str(r.get("group") or ""),
            f"[{STATE_STYLE.get(state, '')}]{state}[/]" if state in STATE_STYLE else state,
            f"{progress:.0%}" if isinstance(progress, (int, float)) else "",
            _age(r.get("updated")),
        )
    console.print(table)


@app.command()
def show(ctx: typer.Context, run: str = typer.Argument(..., help="Run id, a unique part of it, `latest`, or a path."), json_out: bool = JSON_OPTION) -> None:
    """Show a run's status, links and latest values.

    Example: mima runs show latest
    """
    try:
        path = find_run(runs_dir(ctx), run)
    except RunNotFound as e:
        fail(e, EXIT_USAGE)
    reader = RunReader(path)
    status = reader.status()
    latest = {k: {"step": e.get("step"), "value": e.get("value")} for k, e in reader.latest().items()}
    samples = [str(p.relative_to(path)) for p in reader.samples()]
    if json_out:
        print_json({"dir": str(path), "status": status, "latest": latest, "samples": samples})
        return
    info = Table.grid(padding=(0, 2))
    info.add_column(style="bold")
    info.add_column()
    info.add_row("dir", str(path))
    for key in ("state", "progress", "kind", "method", "profile", "group", "concepts", "parent", "twin", "base_model_hash", "error"):
        value = status.get(key)
        if value in (None, "", []):
            continue
        if key == "progress" and isinstance(value, (int, float)):
            value = f"{value:.0%}"
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        info.add_row(key, str(value))
    info.add_row("started", _age(status.get("started")))
    info.add_row("updated", _age(status.get("updated")))
    info.add_row("samples", str(len(samples)))
    for key, value in (status.get("extra") or {}).items():
        info.add_row(f"extra.{key}", str(value))
    console.print(info, highlight=False)
    if latest:
        table = Table("value", "step", "latest")
        for key, e in latest.items():
            v = e["value"]
            table.add_row(key, "" if e["step"] is None else str(e["step"]), f"{v:.6g}" if isinstance(v, float) else str(v))
        console.print(table)
