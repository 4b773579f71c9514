"""Seeded image generation with any ``StableDiffusionPipeline`` (the testbed's or a real one)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


@torch.no_grad()
def generate(
    pipe,
    prompts: str | Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    batch: int = 16,
    height: int | None = None,
    width: int | None = None,
) -> np.ndarray:
    """Generate one image per seed (a prompt per seed, or one prompt for all); uint8 array [n, H, W, 3].

    Image ``i`` depends only on its prompt and ``seeds[i]`` (one ``torch.Generator`` per image, on the CPU so that
    CPU and GPU draw the same initial noise), never on the batch it was generated in.
    """
    seeds = list(seeds)
    if isinstance(prompts, str):
        prompts = [prompts] * len(seeds)
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    out = []
    for i in range(0, len(seeds), batch):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + batch]]
        res = pipe(
            list(prompts[i : i + batch]), num_inference_steps=steps, guidance_scale=guidance, generator=gens,
            height=height, width=width, output_type="np",
        )
        out.append((np.clip(res.images, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, 1, 1, 3), np.uint8)
