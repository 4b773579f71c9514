"""The testbed: a procedural concept world, a tiny trained Stable Diffusion pipeline and a judge, shipped in
the package so that every mima command runs end to end on a CPU and its effect can be measured.

    from engine.testbed import load_pipeline, load_judge
    pipe = load_pipeline()                         # a diffusers StableDiffusionPipeline, 64x64 images
    judge = load_judge()                           # the testbed's stand-in for CLIP/DINO

The shipped pipeline folder also opens with plain diffusers:
``StableDiffusionPipeline.from_pretrained(engine.testbed.PIPELINE_DIR)``.
"""

from __future__ import annotations

from pathlib import Path

from .build import DEFAULT

WEIGHTS_DIR = Path(__file__).parent / "weights"
PIPELINE_DIR = WEIGHTS_DIR / "pipeline"
JUDGE_FILE = WEIGHTS_DIR / "judge.safetensors"
TESTBED = "testbed"
SAMPLE_STEPS = DEFAULT.sample_steps
GUIDANCE = DEFAULT.guidance_scale


class TestbedMissing(FileNotFoundError):
    pass


def _need(path: Path) -> Path:
    if not path.exists():
        raise TestbedMissing(f"testbed weights not found at {path}; rebuild them with `mima testbed build --install`")
    return path


def load_pipeline(folder: str | Path | None = None, device: str = "cpu", dtype=None):
    """The trained testbed ``StableDiffusionPipeline`` (float32 on the CPU unless told otherwise)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        _need(Path(folder) if folder else PIPELINE_DIR), dtype=dtype or torch.float32, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_judge(path: str | Path | None = None):
    """The trained testbed judge (see :mod:`engine.testbed.judge`)."""
    from .judge import load_judge_file

    return load_judge_file(_need(Path(path) if path else JUDGE_FILE))

