"""``mima export``: a run's model as a standard diffusers pipeline folder with a Hugging Face model card."""

from __future__ import annotations

from pathlib import Path

import typer

from mima_cli.console import console, print_json, warn
from mima_cli.options import runs_dir
from mima_cli.progress import stage_bars


def export_cmd(
    ctx: typer.Context,
    run: str = typer.Argument(..., help="An erase or immunize run, or a DreamBooth attack run with saved weights "
                                        "(its id, `latest`, a unique part of the id, or its folder)."),
    out: Path = typer.Option(..., "--out", "-o", help="The pipeline folder to write (must not exist, see --overwrite)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
    concept: str = typer.Option(None, "--concept", help="Attack runs: the concept whose DreamBooth output to export."),
    force: bool = typer.Option(False, "--force", help="Export a run that did not finish or a collapsed model anyway "
                                                      "(the model card says so)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT when it holds an earlier export."),
    json_out: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Write a run's model as a complete diffusers pipeline (safetensors) with a model card, README.md.

    The folder opens without mima: StableDiffusionPipeline.from_pretrained(OUT). The card holds what was immunized,
    how, the resolved profile, the utility, MSGR and MRSGR measured for it and its limits. Refused: a run that did
    not finish, a model marked collapsed (unless --force).

    Example: mima export latest --out release --dtype float16
    """
    from mima_cli.attack import quiet_model_loading

    from engine.export import export_model

    quiet_model_loading()
    with stage_bars(transient=True) as bars:
        done = export_model(run, out, runs_dir=runs_dir(ctx), dtype=dtype, concept=concept, force=force,
                            overwrite=overwrite, progress=bars)
    for reason in done.forced:
        warn(f"exported with --force although {reason}")
    if json_out:
        print_json({"out": str(done.out), "dtype": done.dtype, "files": done.files, "size_mb": round(done.size_mb, 1),
                    "forced": done.forced, "card": dict(done.card.data.to_dict())})
        return
    console.print(f"wrote {done.out} ({len(done.files)} files, {done.size_mb:.1f} MB, {done.dtype}; model card "
                  f"{done.out / 'README.md'}); open it with "
                  f"StableDiffusionPipeline.from_pretrained({str(done.out)!r})", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
