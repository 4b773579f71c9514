"""``mima attack``: fine-tune an immunized model and its unimmunized twin with the same data, seeds and settings."""

from __future__ import annotations

import typer

from mima_cli.console import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, console, fail, warn
from mima_cli.options import SET_OPTION, load_profile_for, runs_dir
from mima_cli.progress import stage_bars


def quiet_model_loading() -> None:
    """Turn off the per-component loading bars of diffusers / transformers (they would tear our progress bars)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def attack_cmd(
    ctx: typer.Context,
    method: list[str] = typer.Option(
        None, "--method", "-m",
        help="lora, dreambooth, dreambooth-lora, textual-inversion, custom-diffusion or all; repeatable or "
             "comma-separated (default: \\[attack] methods)."),
    run: str = typer.Option(None, "--run", "-r", help="Immunization run to attack (default: the newest finished one)."),
    profile: str = typer.Option(
        None, "--profile", "-p",
        help="Profile whose \\[attack], \\[eval] and concepts apply (default: the immunization run's saved profile); "
             "also selects the newest immunization run of that profile."),
    group: str = typer.Option(None, "--group", "-g", help="Pick the newest immunization run of this group."),
    steps: int = typer.Option(None, "--steps", min=1, help="Attack steps (overrides \\[attack] steps for every method)."),
    set_: list[str] = SET_OPTION,
    control: bool = typer.Option(
        False, "--control",
        help="Attack the unimmunized model a second time instead of the immunized one (the report's `none` row: "
             "MSGR 0 when the attack is deterministic)."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip live evaluation (run `mima evaluate` later)."),
    save_weights: bool = typer.Option(False, "--save-weights", help="Keep each attack's weights under <run>/checkpoints/<concept>/, the twin's too (a cached "
                                      "twin without weights is attacked again)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:N, mps (default: \\[model] device)."),
) -> None:
    """Attack an immunization run and its twin, the model it started from; MSGR fills in while they run.

    Both attacks use images.attack, the attacker's token and the same seeds.
    The attack on the unimmunized model is cached: immunizations that started from the same model share it.
    Ctrl-C keeps every finished concept.

    Example: mima attack --method lora
    """
    from engine.attacks.pairs import run_attacks
    from engine.attacks.plan import AttackFailure, AttackUsageError, plan_attack
    from engine.errors import EvaluationError

    quiet_model_loading()
    rd = runs_dir(ctx)
    if steps is not None:  # first, so that --set eval.steps=[...] is checked against these steps
        set_ = [f"attack.steps={steps}", *(set_ or [])]
    try:
        if profile is not None:
            p = load_profile_for(ctx, profile, set_)
            plan = plan_attack(rd, run=run, profile=p, profile_name=profile, group=group, methods=method, steps=steps,
                               control=control)
        else:
            plan = plan_attack(rd, run=run, overrides=set_, group=group, methods=method, steps=steps, control=control)
    except AttackUsageError as e:
        fail(e, EXIT_USAGE)
    what = "control re-run of the unimmunized model" if control else f"{plan.immunize_method} model"
    console.print(f"attacking run {plan.immunize_run.name} ({what}, group {plan.group}) with "
                  f"{', '.join(plan.methods)}; targets {', '.join(plan.targets)}"
                  + (f"; others {', '.join(plan.others)}" if plan.others else ""), highlight=False)
    try:
        with stage_bars() as bars:
            results = run_attacks(plan, runs_dir=rd, device=device, progress=bars, live_eval=not no_eval,
                                  save_weights=save_weights)
    except AttackUsageError as e:
        fail(e, EXIT_USAGE)
    except (AttackFailure, EvaluationError) as e:
        fail(e, EXIT_FAILURE)
    except KeyboardInterrupt:
        fail("interrupted: finished concepts are kept (runs marked interrupted) and reused by the next `mima attack`",
             EXIT_INTERRUPTED)
    notes = dict.fromkeys(n for r in results for n in r.notes)
    for note in notes:
        warn(note)
    for r in results:
        last = max(r.msgr) if r.msgr else None
        msgr = ", ".join(f"{m} {_fmt(v)}" for m, v in r.msgr.get(last, {}).items()) if last is not None else "not computed"
        console.print(f"[bold]{r.attack}[/]: run {r.run.name}  twin {r.twin.name}"
                      + (" (cached)" if r.twin_reused else "")
                      + (f"  MSGR at step {last}: {msgr}" if last is not None else ""), highlight=False, soft_wrap=True)
    console.print("see `mima report` for the tables", style="dim")


def register(app: typer.Typer) -> None:
    app.command("attack")(attack_cmd)
