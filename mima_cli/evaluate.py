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
    utility: bool = typer.Option(False, "--utility", help="Measure utility without attack instead: what each model "
                                 "(an erase or immunization run, or a pipeline folder) still draws, against its parent."),
    profile: str = typer.Option("testbed", "--profile", "-p", help="With --utility and a pipeline folder: the profile "
                                "whose concepts, [utility] and [eval] settings are used."),
    group: str = typer.Option(None, "--group", "-g", help="With --utility and a pipeline folder: the group whose "
                              "targets are the folder's targets (default: none, every concept is an other)."),
    parent: str = typer.Option(None, "--parent", help="With --utility: the model to compare with (default: the run's "
                               "parent, or the profile's base for a folder)."),
) -> None:
    """Recompute the metrics of finished attack pairs into a new evaluate run (the report prefers its numbers).

    With --utility, measure instead what each model still draws without any attack ([utility] of the profile:
    judge accuracy and fidelity on the testbed, CLIP score, DINO and LPIPS fidelity on Stable Diffusion), and
    whether it is collapsed.

    Example: mima evaluate latest --metrics clip,dino

    Example: mima evaluate --utility 20261207-091349-immunize-mima-g3-1-b74c
    """
    if utility:
        _utility(ctx, runs, profile, group, parent, set_, device, json_out)
        return
    from engine.metrics.evaluate import EvaluationError, evaluate
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


def _utility(ctx, refs: list[str], profile: str, group: str | None, parent: str | None, sets: list[str],
             device: str, json_out: bool) -> None:
    from engine.metrics.evaluate import EvaluationError, evaluate_utility
    from engine.metrics import MetricWeightsMissing
    from engine.metrics.utility import read_utility
    from engine.models import ModelNotAvailable
    from engine.profile import ProfileError
    from engine.runs import RunNotFound, find_run
    from mima_cli.attack import quiet_model_loading
    from mima_cli.options import load_profile_for
    from mima_cli.progress import stage_bars
    from mima_cli.report import print_utility

    quiet_model_loading()
    rd = runs_dir(ctx)
    out = []
    for ref in refs:
        try:
            find_run(rd, ref)
            is_run = True
        except RunNotFound:
            is_run = False
        p = None if is_run else load_profile_for(ctx, profile, sets)
        try:
            with stage_bars(transient=True) as bars:
                run_dir = evaluate_utility(rd, ref, profile=p, group=group, parent=parent,
                                           overrides=sets if is_run else (), device=device, progress=bars)
        except (EvaluationError, ProfileError) as e:
            fail(e, EXIT_USAGE)
        except (MetricWeightsMissing, ModelNotAvailable) as e:
            fail(e, EXIT_FAILURE)
        except ValueError as e:
            fail(e, EXIT_USAGE)
        u = read_utility(run_dir)
        out.append({"run": run_dir.name, "of": ref, "utility": u.to_dict()})
        if not json_out:
            console.print(f"{ref}  (evaluate run {run_dir.name})", highlight=False)
            print_utility(run_dir)
    if json_out:
        print_json(out)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
