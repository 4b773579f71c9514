"""``mima erase`` and ``mima immunize``: closed-form UCE erasure and bi-level immunization of a profile's group."""

from __future__ import annotations

from contextlib import nullcontext

import typer

from mima_cli.console import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, console, fail
from mima_cli.options import SET_OPTION, cli_state, load_profile_for, runs_dir
from mima_cli.progress import stage_bars
from mima_cli.report import print_utility

DEFAULT_PROFILE = "testbed"
PROFILE_OPTION = typer.Option(DEFAULT_PROFILE, "--profile", "-p",
                              help="Profile file or shipped profile name (default: the testbed profile).")
GROUP_OPTION = typer.Option(None, "--group", "-g", help="Group of target concepts (default: the profile's first group).")
DEVICE_OPTION = typer.Option(None, "--device", help="cpu, cuda, cuda:N, mps (default: \\[model] device).")


def _group(profile, group: str | None) -> str | None:
    if group is None and profile.groups:
        return next(iter(profile.groups))
    return group


def erase_cmd(
    ctx: typer.Context,
    profile: str = PROFILE_OPTION,
    group: str = GROUP_OPTION,
    set_: list[str] = SET_OPTION,
    device: str = DEVICE_OPTION,
) -> None:
    """Erase the group's target concepts (or \\[erase] concepts) from the base model with UCE; writes a run.

    Profile sections read: \\[model], \\[erase], \\[\\[concepts]] (prompts) and \\[groups]; the image sets that
    `mima immunize` of the group will read (\\[\\[concepts]] images.immunize, \\[regularization] images) are checked first.

    Example: mima erase --profile testbed --group g3-1
    """
    from engine.erase import erase
    from mima_cli.attack import quiet_model_loading

    quiet_model_loading()
    p = load_profile_for(ctx, profile, set_)
    if p.erase.method != "uce":
        fail(f"{profile}: erase.method is {p.erase.method!r}; use --set erase.method=uce", EXIT_USAGE)
    with stage_bars() as bars:
        run_dir = erase(p, runs_dir=runs_dir(ctx), group=_group(p, group), profile_name=profile, device=device,
                        progress=bars)
    console.print(f"erased model: {run_dir / 'model'}  (run {run_dir.name})")


def immunize_cmd(
    ctx: typer.Context,
    profile: str = PROFILE_OPTION,
    method: str = typer.Option(None, "--method", "-m", help="mima, jt, cp, imma or alternating (default: \\[immunize] method)."),
    group: str = GROUP_OPTION,
    set_: list[str] = SET_OPTION,
    steps: int = typer.Option(None, "--steps", help="Outer steps (overrides \\[immunize] steps)."),
    gradient: str = typer.Option(None, "--gradient", help="exact, fd or first-order (overrides \\[immunize] gradient)."),
    parent: str = typer.Option(None, "--parent", help="Start from this run or model instead of the erased/base model."),
    device: str = DEVICE_OPTION,
    resume: str = typer.Option(None, "--resume", help="Continue an interrupted immunization run from its checkpoint."),
) -> None:
    """Immunize a group of target concepts so that fine-tuning on them fails (MIMA, Algorithm 1, or a baseline).

    Starts from the UCE-erased model when \\[erase] method = "uce" (erasing first if needed), else from \\[model] base.
    The immunized model lands in runs/<id>/model; open it with engine.models.load_pipeline("runs/<id>").

    Profile sections read: \\[model], \\[erase] (when method = "uce"), \\[\\[concepts]] (prompts, images.immunize),
    \\[regularization], \\[groups] and \\[immunize] (with \\[immunize.merge]). Every image set is checked before any work.

    Several GPUs: accelerate launch --num_processes 4 -m mima_cli immunize ... splits the concepts across them.

    Ctrl-C stops after the current step and keeps a checkpoint; the message gives the `--resume` command.

    Example: mima immunize --profile testbed --method mima
    """
    from engine.immunize import get_method
    from engine.immunize.distributed import is_main_process, leaving_launch
    from engine.errors import UsageError
    from engine.immunize.runner import ImmunizationError, ImmunizationInterrupted, immunize
    from mima_cli.attack import quiet_model_loading

    quiet_model_loading()
    # a resumed run continues with the profile saved in its directory
    p = None if resume else load_profile_for(ctx, profile, set_, {"steps": "immunize.steps", "gradient": "immunize.gradient"})
    if method is not None:
        get_method(method)  # an unknown name: one line, exit 2, before anything loads
    main = is_main_process()  # under `accelerate launch`, the first process alone shows progress and prints
    try:
        with leaving_launch(), stage_bars() if main else nullcontext() as bars:
            run_dir = immunize(p, runs_dir=runs_dir(ctx), group=_group(p, group) if p else None, method=method,
                               profile_name=profile,
                               parent=parent, device=device, resume=resume, progress=bars)
    except ImmunizationInterrupted as e:
        fail(f"{e}; resume with: {resume_command(ctx, e.run_id)}", EXIT_INTERRUPTED)
    except UsageError:
        raise  # one line and exit 2, from the root command
    except ImmunizationError as e:
        fail(e, EXIT_FAILURE)
    if main:
        console.print(f"immunized model: {run_dir / 'model'}  (run {run_dir.name})")
        print_utility(run_dir)


def resume_command(ctx: typer.Context, run_id: str) -> str:
    """The exact command that continues an interrupted immunization run (with ``--runs-dir`` when not the default)."""
    import shlex
    from pathlib import Path

    directory = cli_state(ctx).runs_dir
    where = "" if Path(directory) == Path("runs") else f"--runs-dir {shlex.quote(str(directory))} "
    return f"mima {where}immunize --resume {run_id}"


def register(app: typer.Typer) -> None:
    app.command("erase")(erase_cmd)
    app.command("immunize")(immunize_cmd)
