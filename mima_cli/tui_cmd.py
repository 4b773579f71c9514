"""``mima tui``: a live dashboard of runs (Textual), usable over SSH and in tmux."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from mima_cli.console import EXIT_USAGE, fail
from mima_cli.options import runs_dir as root_runs_dir

IMAGES_HELP = (
    "How sample thumbnails are drawn: auto (sixel/kitty graphics when the terminal answers, half blocks in "
    "tmux/screen and otherwise), halfcell (coloured half blocks: works over SSH and in tmux), sixel, tgp "
    "(kitty), unicode (grey shades), none."
)


def register(root: typer.Typer) -> None:
    root.command("tui")(tui)


def tui(
    ctx: typer.Context,
    runs_dir: Optional[Path] = typer.Argument(
        None, help="The runs directory to watch (default: --runs-dir / MIMA_RUNS_DIR, else ./runs)."
    ),
    run: Optional[str] = typer.Option(None, "--run", help="Open this run first: an id, a unique part of one, or `latest`."),
    images: str = typer.Option("auto", "--images", help=IMAGES_HELP),
    interval: float = typer.Option(0.5, "--interval", min=0.05, help="Seconds between reads of the runs directory."),
    serve: bool = typer.Option(False, "--serve", help="Serve the dashboard to a browser with textual-serve instead."),
    host: str = typer.Option("localhost", "--host", help="With --serve: the address to listen on."),
    port: int = typer.Option(8000, "--port", help="With --serve: the port to listen on."),
) -> None:
    """Watch runs live: loss curves, sample thumbnails, the MSGR table, a run beside its twin.

    Reads only the runs directory (events.jsonl, status.json, samples/), so it works for runs started by any process, running or finished, and never slows them down. Press ? for the keys, q to quit.

    Example: mima tui runs --run latest
    """
    from engine.runs import RunNotFound, find_run
    from mima_cli.tui.widgets import IMAGE_MODES

    directory = runs_dir if runs_dir is not None else root_runs_dir(ctx)
    if images not in IMAGE_MODES:
        fail(f"--images must be one of {', '.join(IMAGE_MODES)}, got {images!r}", EXIT_USAGE)
    run_id = None
    if run is not None:
        try:
            run_id = find_run(directory, run).name
        except RunNotFound as e:
            fail(e, EXIT_USAGE)
    if serve:
        _serve(directory, run_id, images, interval, host, port)
        return

    from mima_cli.tui.app import MimaTui

    # MimaTui resolves `auto` here, before Textual takes the terminal over (textual-image asks the
    # terminal what it supports when it is imported).
    MimaTui(directory, run_id, images=images, interval=interval).run()


def serve_command(directory: Path, run_id: str | None, images: str, interval: float) -> str:
    """The command line textual-serve runs for each browser session."""
    args = [sys.executable, "-m", "mima_cli.app", "tui", str(directory.resolve()), "--interval", str(interval)]
    args += ["--images", "halfcell" if images == "auto" else images]
    if run_id:
        args += ["--run", run_id]
    return shlex.join(args)


def _serve(directory: Path, run_id: str | None, images: str, interval: float, host: str, port: int) -> None:
    try:
        from textual_serve.server import Server
    except ImportError:
        fail("--serve needs textual-serve: pip install 'mima[serve]'", EXIT_USAGE)
    Server(serve_command(directory, run_id, images, interval), host=host, port=port, title="mima tui").serve()
