"""``mima sweep``: utility against immunity over settings of a profile (one JSON line per point, a PNG plot)."""

from __future__ import annotations

import time

import typer

from mima_cli.console import EXIT_USAGE, console, err_console, fail
from mima_cli.options import runs_dir
from mima_cli.reproduce import JOBS_HELP, parse_jobs


def sweep_cmd(
    ctx: typer.Context,
    profile: str = typer.Option(..., "--profile", "-p", help="Profile file or shipped profile name."),
    methods: list[str] = typer.Option(None, "--method", "-m", help="Immunization methods (repeatable; default: "
                                      "[immunize] method)."),
    vary: list[str] = typer.Option(None, "--set", metavar="KEY=V1,V2,...",
                                   help="A profile value and the values it takes (repeatable: every combination is "
                                        "a setting), e.g. --set immunize.outer_lr=1e-3,3e-4,1e-4."),
    fixed: list[str] = typer.Option(None, "--fix", metavar="KEY=VALUE", help="A profile value every setting shares."),
    group: list[str] = typer.Option(None, "--group", "-g", help="Groups to run (repeatable; default: the first)."),
    out: str = typer.Option("sweep.jsonl", "--out", help="JSON lines, one per setting, method and group."),
    plot_out: str = typer.Option(None, "--plot", metavar="FILE.png", help="The trade-off plot (default: next to --out)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:N, mps (default: [model] device)."),
    jobs: str = typer.Option("auto", "--jobs", "-j", metavar="N|auto", help=JOBS_HELP),
) -> None:
    """Utility against immunity over settings: for each setting, immunize, measure utility, attack, evaluate.

    Every combination of the --set values is a setting; each runs the reproduction's tasks for the chosen groups and
    methods (finished runs are reused, so a sweep resumes). Writes one JSON line per setting, method and group
    (utility of the others and targets without attack, the targets' accuracy after the attack, MSGR, MRSGR, the
    others' attack success) and a PNG: utility against the targets' accuracy after the attack, one curve per method,
    the utility bar (0.90) and the immunity bar (0.30) drawn in.

    Example: mima sweep --profile testbed -m mima -m cp --set immunize.outer_lr=1e-3,3e-4,1e-4
    """
    from pathlib import Path

    from engine.attacks.plan import AttackUsageError
    from engine.immunize import get_method
    from engine.profile import ProfileError, load_profile
    from engine.sweep import plot, settings_grid, sweep
    from mima_cli.attack import quiet_model_loading
    from mima_cli.progress import stage_bars

    n_jobs = parse_jobs(jobs)
    try:
        grid = settings_grid(vary or [])
        first = load_profile(profile, [*(fixed or []), *(f"{k}={v}" for k, v in grid[0].items())])
        for setting in grid[1:]:
            load_profile(profile, [*(fixed or []), *(f"{k}={v}" for k, v in setting.items())])
        for m in methods or []:
            get_method(m)
        for g in group or []:
            first.group(g)
    except (ValueError, ProfileError) as e:
        fail(e, EXIT_USAGE)
    chosen = list(methods or [first.immunize.method])
    groups = list(group or list(first.groups)[:1]) or None
    quiet_model_loading()
    t0 = time.monotonic()
    with stage_bars(transient=True) as bars:
        try:
            points = sweep(profile, grid, methods=chosen, runs_dir=runs_dir(ctx), groups=groups,
                           base_sets=fixed or (), device=device, jobs=n_jobs, out=out, progress=bars,
                           status=lambda msg: err_console.print(msg, highlight=False, markup=False),
                           worker_init=quiet_model_loading)
        except AttackUsageError as e:
            fail(e, EXIT_USAGE)
    path = plot(points, plot_out or Path(out).with_suffix(".png"),
                title=f"{profile}: {', '.join(groups or ['-'])} — utility vs immunity")
    err_console.print(f"{len(grid)} setting(s) in {(time.monotonic() - t0) / 60:.1f} min; {out}, {path}",
                      highlight=False)
    from rich.table import Table

    table = Table("setting", "method", "group", "others (no attack)", "worst other",
                  "targets (no attack)", "targets after attack",
                  "twin after attack", "others after attack (twin)", "collapsed", title="utility vs immunity")

    def f(v):
        return "—" if v is None else f"{v:.2f}"

    for p in points:
        table.add_row(" ".join(f"{k}={v}" for k, v in p.setting.items()) or "profile", p.method, str(p.group),
                      f(p.others), f"{p.others_worst} {f(p.others_min)}" if p.others_worst else "—", f(p.targets),
                      f(p.targets_attacked), f(p.twin_attacked),
                      f"{f(p.others_attacked)} ({f(p.twin_others_attacked)})", "yes" if p.collapsed else "no")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep_cmd)
