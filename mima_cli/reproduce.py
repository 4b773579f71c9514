"""``mima reproduce`` (the whole experiment of a profile) and ``mima demo`` (the testbed, quick)."""

from __future__ import annotations

import time

import typer

from mima_cli.console import EXIT_USAGE, console, err_console, fail
from mima_cli.options import SET_OPTION, load_profile_for, runs_dir
from mima_cli.progress import stage_bars


JOBS_HELP = ("Worker processes running independent tasks at once (auto: one per CPU core, at most 4, on a CPU; 1 on "
             "a GPU). On a CPU the testbed's small batches use one core each about as fast as two.")


def parse_jobs(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        fail(f"--jobs {value!r}: expected a positive number or 'auto'", EXIT_USAGE)
    return n


def _run(ctx: typer.Context, profile: str, sets: list[str], methods: list[str] | None, quick: bool,
         shard: str | None, device: str | None, jobs: str = "auto") -> None:
    from engine.attacks.plan import AttackUsageError
    from engine.reproduce import parse_shard, reproduce
    from mima_cli.attack import quiet_model_loading
    from mima_cli.report import report_cmd

    n_jobs = parse_jobs(jobs)
    p = load_profile_for(ctx, profile, sets)
    try:
        parse_shard(shard)
    except ValueError as e:
        fail(e, EXIT_USAGE)
    if methods:
        from engine.immunize import get_method

        try:
            [get_method(m) for m in methods]
        except ValueError as e:
            fail(e, EXIT_USAGE)
    quiet_model_loading()
    t0 = time.monotonic()
    with stage_bars(transient=True) as bars:
        try:
            log = reproduce(p, runs_dir=runs_dir(ctx), profile_name=profile, methods=methods, quick=quick,
                            shard=shard, device=device, jobs=n_jobs, progress=bars,
                            status=lambda msg: err_console.print(msg, highlight=False, markup=False),
                            worker_init=quiet_model_loading)
        except AttackUsageError as e:
            fail(e, EXIT_USAGE)
    minutes = (time.monotonic() - t0) / 60
    err_console.print(f"{len(log.done)} step(s) run, {len(log.skipped)} skipped (finished earlier) in {minutes:.1f} min",
                      highlight=False)
    if str(p.model.base) == "testbed":
        console.print("[dim]numbers measured on the testbed (mima's tiny procedural world), not on Stable Diffusion[/]")
    report_cmd(ctx, runs=[r.name for r in log.immunize_runs], step=None, json_out=False, csv_out=False,
               markdown=False, into=None, grid=None, chart=False)  # ends with a warning naming any collapsed model


def reproduce_cmd(
    ctx: typer.Context,
    profile: str = typer.Option(..., "--profile", "-p", help="Profile file or shipped profile name."),
    methods: list[str] = typer.Option(None, "--methods", "-m", help="Immunization methods (repeatable; default: "
                                      "mima, jt, cp with --quick, else also alternating and imma)."),
    quick: bool = typer.Option(False, "--quick", help="First group only, methods mima, jt, cp."),
    shard: str = typer.Option(None, "--shard", metavar="i/n", help="Run every n-th group starting at the i-th."),
    set_: list[str] = SET_OPTION,
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:N, mps (default: \\[model] device)."),
    jobs: str = typer.Option("auto", "--jobs", "-j", metavar="N|auto", help=JOBS_HELP),
) -> None:
    """Run a profile's whole experiment: UCE erase, immunize each group with each method, attack both twins,
    evaluate, and print the tables. Finished runs are skipped, so re-running resumes (also sharded, across days).

    Profile sections read: all of them — \\[model], \\[erase], \\[\\[concepts]] (prompts and their three image sets),
    \\[regularization], \\[groups], \\[immunize], \\[attack] and \\[eval]. Every image set is checked before any work.

    Example: mima reproduce --profile testbed-relearn --shard 1/2
    """
    _run(ctx, profile, set_, methods or None, quick, shard, device, jobs)


def demo_cmd(
    ctx: typer.Context,
    set_: list[str] = SET_OPTION,
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:N, mps (default: \\[model] device)."),
    jobs: str = typer.Option("auto", "--jobs", "-j", metavar="N|auto", help=JOBS_HELP),
) -> None:
    """The testbed demo: `mima reproduce --profile testbed --quick` (about 6 minutes on 2 CPU cores, utility included).

    Example: mima demo
    """
    _run(ctx, "testbed", set_, None, True, None, device, jobs)


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce_cmd)
    app.command("demo")(demo_cmd)
