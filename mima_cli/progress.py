"""Rich progress bars (on stderr) for the engine's ``progress(stage, step, total, info)`` callbacks."""

from __future__ import annotations

from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mima_cli.console import err_console


def _fmt(info: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())


@contextmanager
def stage_bars(transient: bool = False):
    """Yield a callback ``(stage, step, total, info)`` that keeps one bar per stage, with ETA and the latest info."""
    bars = Progress(
        TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=err_console, transient=transient,
    )
    tasks: dict[str, int] = {}

    def update(stage: str, step: int, total: int, info: dict | None = None) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total, info="")
        fields = {"info": _fmt(info)} if info else {}
        bars.update(tasks[stage], completed=step, total=total, **fields)

    with bars:
        yield update
