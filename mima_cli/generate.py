"""``mima generate``: an image set from any pipeline (PNG files + ``metadata.jsonl``)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mima_cli.console import EXIT_USAGE, console, fail
from mima_cli.options import runs_dir
from mima_cli.progress import stage_bars

METADATA = "metadata.jsonl"


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)


def generate_cmd(
    ctx: typer.Context,
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt of every image."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the PNG files and metadata.jsonl."),
    model: str = typer.Option("testbed", "--model", "-m",
                              help="'testbed', a diffusers pipeline folder, a run (its id, `latest` or its folder: "
                                   "its model/) or a cached hub id."),
    n: int = typer.Option(20, "--n", "-n", min=1, help="Number of images."),
    seed: int = typer.Option(0, "--seed", min=0, help="Image i uses seed SEED + i."),
    steps: int = typer.Option(None, "--steps", min=1, help="Denoising steps (default: 20 for the testbed, else 50)."),
    guidance: float = typer.Option(None, "--guidance", min=0.0,
                                   help="Classifier-free guidance (default: 4.0 for the testbed, else 7.5)."),
    batch: int = typer.Option(8, "--batch", min=1, help="Images per pipeline call."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
    force: bool = typer.Option(False, "--force", help="Overwrite an image set already in --out."),
) -> None:
    """Generate N images of one prompt with any Stable Diffusion pipeline, image i with seed SEED + i.

    Writes OUT/00000.png ... and OUT/metadata.jsonl (one line per image: file, prompt, seed, steps, guidance, model).
    The same command gives the same images.

    Example: mima generate --model testbed --prompt "a photo of a cat" --n 8 --out cats
    """
    from PIL import Image

    from engine.models import MODEL_JSON, ModelNotAvailable, load_pipeline, pick_device, pick_dtype, resolve_model
    from engine.runs import RunNotFound, find_run
    from engine.sampling import generate
    from engine.testbed import GUIDANCE, SAMPLE_STEPS, TestbedMissing

    if dtype not in ("float32", "float16", "bfloat16"):
        fail(f"--dtype: expected float32, float16 or bfloat16, got {dtype!r}", EXIT_USAGE)
    if (out / METADATA).exists() and not force:
        fail(f"{out} already holds an image set ({METADATA}); pass --force to overwrite it", EXIT_USAGE)
    try:
        folder = resolve_model(model)
    except ModelNotAvailable as e:  # a run id of --runs-dir (or `latest`), else the model error itself
        try:
            run = find_run(runs_dir(ctx), model)
        except RunNotFound:
            raise e from None
        folder = resolve_model(run)  # a run without a model/ says so
    except TestbedMissing as e:
        fail(e)
    pipe = load_pipeline(folder, device=pick_device(device), dtype=pick_dtype(dtype))
    meta = folder / MODEL_JSON  # a mima model completing its base
    testbed_like = (model == "testbed" or (folder / "testbed.json").exists()
                    or (meta.exists() and json.loads(meta.read_text()).get("base") == "testbed"))
    steps = steps or (SAMPLE_STEPS if testbed_like else 50)
    guidance = guidance if guidance is not None else (GUIDANCE if testbed_like else 7.5)

    if (out / METADATA).exists():  # --force: drop the old set's files first
        for line in (out / METADATA).read_text(encoding="utf-8").splitlines():
            try:
                (out / Path(json.loads(line)["file"]).name).unlink(missing_ok=True)
            except (ValueError, KeyError, TypeError):
                continue
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(seed, seed + n))
    lines = []
    with stage_bars() as bars:
        bars("generate", 0, n)
        for start in range(0, n, batch):
            chunk = seeds[start : start + batch]
            for i, (s, image) in enumerate(zip(chunk, generate(pipe, prompt, chunk, steps, guidance)), start):
                name = f"{i:05d}.png"
                Image.fromarray(image).save(out / name)
                lines.append({"file": name, "prompt": prompt, "seed": s, "steps": steps, "guidance": guidance,
                              "model": str(model)})
            bars("generate", min(start + batch, n), n)
    (out / METADATA).write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    console.print(f"wrote {n} images to {out}", highlight=False)
