"""``mima evaluate``: recompute MSGR / MRSGR of finished attack pairs (e.g. with other backbones)."""

from __future__ import annotations

import typer
from rich.table import Table

from mima_cli.console import EXIT_FAILURE, EXIT_USAGE, console, fail, print_json, warn
from mima_cli.options import JSON_OPTION, SET_OPTION, runs_dir


def _metrics(value: str | None) -> list[str] | None:
    if not value:
        return None
    from engine.metrics import METRICS

    names = [m.strip() for m in value.split(",") if m.strip()]
    for m in names:
        if m not in METRICS:
            import difflib

            close = difflib.get_close_matches(m, METRICS, n=1)
            fail(f"unknown metric '{m}'; " + (f"did you mean '{close[0]}'?" if close else f"choose from {', '.join(METRICS)}"),
                 EXIT_USAGE)
    return names


def evaluate_cmd(
    ctx: typer.Context,
    runs: list[str] = typer.Argument(..., help="Attack runs (either side), immunization runs or evaluate runs."),
    metrics: str = typer.Option(None, "--metrics", help="Comma-separated backends, e.g. clip,dino (default: \\[eval] metrics)."),
    step: list[int] = typer.Option(None, "--step", help="Attack step(s) to evaluate (default: every step)."),
    set_: list[str] = SET_OPTION,
    device: str = typer.Option("cpu", "--device", help="Device of the metric backbones."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Recompute the metrics of finished attack pairs into a new evaluate run (the report prefers its numbers).

    Example: mima evaluate latest --metrics clip,dino
    """
    from engine.evaluate import EvaluationError, evaluate
    from engine.metrics import MetricWeightsMissing
    from engine.report import build_report, collect_pairs
    from mima_cli.progress import stage_bars

    from mima_cli.attack import quiet_model_loading

    quiet_model_loading()
    names = _metrics(metrics)
    rd = runs_dir(ctx)
    try:
        with stage_bars() as bars:
            run_dir = evaluate(rd, runs, metrics=names, steps=step or None, overrides=set_, device=device, progress=bars)
    except EvaluationError as e:
        fail(e, EXIT_USAGE)
    except MetricWeightsMissing as e:
        fail(e, EXIT_FAILURE)
    except ValueError as e:  # random-init backbone, unknown metric
        fail(e, EXIT_USAGE)
    from engine.runs import RunReader

    for e in RunReader(run_dir).events("status"):
        if e.get("name") == "message" and ("no evaluation step" in str(e.get("value")) or "left out" in str(e.get("value"))):
            warn(e.get("value"))
    report = build_report(collect_pairs(rd, [run_dir.name]))
    if json_out:
        print_json({"run": run_dir.name, **report.to_dict()})
        return
    table = Table("pair (immunized side)", "method", "attack", "group", "step", "metric", "MSGR", "MRSGR",
                  title=f"evaluate run {run_dir.name}")
    for p in report.pairs:
        s = p.report_step(None)
        for m in p.metrics():
            msgr, mrsgr = p.msgr.get(s, {}).get(m, {}), p.mrsgr.get(s, {}).get(m, {})
            fmt = lambda e: "—" if e.get("value") is None else f"{e['value']:.2f}"  # noqa: E731
            table.add_row(p.run, p.method, p.attack, str(p.group), str(s), m, fmt(msgr), fmt(mrsgr))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
