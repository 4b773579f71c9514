"""``mima testbed``: build, check and look at the embedded testbed model."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import typer

from mima_cli.console import console, err_console, fail, print_json
from mima_cli.options import JSON_OPTION
from mima_cli.progress import stage_bars

testbed_app = typer.Typer(no_args_is_help=True, help="Build, check and look at the embedded testbed model.")


@testbed_app.command("build")
def build(
    out: Path = typer.Option(Path("testbed-build"), "--out", help="Build folder (checkpoints; resumes if it exists)."),
    seed: int = typer.Option(0, help="Seed of the whole build."),
    tiny: bool = typer.Option(False, "--tiny", help="A seconds-long build of a tiny configuration (smoke test)."),
    install: bool = typer.Option(False, "--install", help="Copy the result into the package as the shipped testbed."),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
    device: str = typer.Option("cpu", help="Where to train the VAE, judge, text encoder and UNet (cpu, cuda, cuda:1, auto)."),
    overrides: list[str] = typer.Option(
        [], "--set", metavar="KEY=VALUE",
        help="Change one setting of the build configuration (engine/testbed/build.py TestbedConfig), e.g. --set "
             "unet_steps=20000 for a longer GPU build (repeatable). A folder resumes only with the same settings.",
    ),
) -> None:
    """Retrain the testbed from scratch (world renders, VAE, judge, text encoder, UNet), seeded and resumable.

    Re-running the same command after an interruption resumes from the last checkpoint.

    Example: mima testbed build --out testbed-build --install
    """
    import torch

    from engine.models import pick_device
    from engine.testbed import JUDGE_FILE, PIPELINE_DIR, build as tb_build
    from engine.testbed.train import build_testbed

    if threads:
        torch.set_num_threads(threads)
    try:
        dev = pick_device(device)
    except ValueError as e:
        fail(f"--device: {e}", 2)
    try:
        cfg = (tb_build.TINY if tiny else tb_build.DEFAULT).with_overrides(overrides)
    except ValueError as e:
        fail(e, 2)
    t0 = time.monotonic()
    try:
        with stage_bars() as bars:
            timings = build_testbed(out, cfg, seed=seed, progress=bars, device=str(dev))
    except ValueError as e:
        fail(e, 2)
    for stage, seconds in timings.items():
        console.print(f"{stage:<8} {seconds / 60:7.1f} min")
    console.print(f"{'total':<8} {sum(timings.values()) / 60:7.1f} min (this call: {(time.monotonic() - t0) / 60:.1f} min)")
    if install:
        if PIPELINE_DIR.exists():
            shutil.rmtree(PIPELINE_DIR)
        shutil.copytree(out / "pipeline", PIPELINE_DIR)
        shutil.copy2(out / "judge.safetensors", JUDGE_FILE)
        console.print(f"installed into {PIPELINE_DIR.parent}")


@testbed_app.command("check")
def check(
    model: Path = typer.Option(None, "--model", help="Pipeline folder (default: the shipped testbed)."),
    judge_path: Path = typer.Option(None, "--judge", help="Judge file (default: the shipped judge)."),
    n: int = typer.Option(16, help="Generations per style and object prompt."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Measure the testbed's gates: judge accuracy, generation accuracy per concept, seconds per image.

    Example: mima testbed check --json
    """
    from engine.testbed import load_judge, load_pipeline
    from engine.testbed.check import GATES, MAX_SECONDS_PER_IMAGE, check_testbed
    from mima_cli.attack import quiet_model_loading

    quiet_model_loading()

    pipe, judge = load_pipeline(model), load_judge(judge_path)
    with stage_bars(transient=True) as bars:
        result = check_testbed(pipe, judge, n=n, progress=lambda i, total, c: bars("generate", i, total, {"concept": c}))
    if as_json:
        print_json(result)
        return
    from rich.table import Table

    table = Table(title="testbed check")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("gate", justify="right")
    table.add_column("ok")
    bounds = {**{k: f">= {v}" for k, v in GATES.items()}, "seconds_per_image": f"<= {MAX_SECONDS_PER_IMAGE}"}
    for key, bound in bounds.items():
        table.add_row(key, f"{result[key]:.3f}", bound, "yes" if result["passed"][key] else "[red]no")
    console.print(table)
    per = Table(title="generation accuracy per concept")
    per.add_column("concept")
    per.add_column("accuracy", justify="right")
    per.add_column("taken for")
    for concept, acc in result["per_concept"].items():
        per.add_row(concept, f"{acc:.2f}", ", ".join(f"{k} {v}" for k, v in result["confusion"][concept].items()))
    console.print(per)


@testbed_app.command("grid")
def grid(
    out: Path = typer.Option(..., "--out", help="PNG file to write."),
    model: Path = typer.Option(None, "--model", help="Pipeline folder (default: the shipped testbed)."),
    n: int = typer.Option(8, help="Images per row."),
    seed: int = typer.Option(0, help="Seed of the first image of each row."),
) -> None:
    """Write a PNG with one row of generations per concept (styles, objects, compositions) beside world renders.

    Example: mima testbed grid --out docs/testbed-grid.png
    """
    from engine.testbed import load_pipeline
    from engine.testbed.grid import concept_grid
    from mima_cli.attack import quiet_model_loading

    quiet_model_loading()

    pipe = load_pipeline(model)
    with stage_bars(transient=True) as bars:
        image = concept_grid(pipe, n=n, seed=seed, progress=lambda i, t: bars("generate", i, t))
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    err_console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(testbed_app, name="testbed")
