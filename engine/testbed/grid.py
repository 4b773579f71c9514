"""A labelled PNG grid: one row per concept, a world render then the pipeline's generations."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ..sampling import generate
from . import GUIDANCE, SAMPLE_STEPS, world

LABEL_W = 150


def grid_rows() -> list[tuple[str, str, world.Item]]:
    rows = [(s, world.style_prompt(s), world.Item(style=s)) for s in world.STYLES]
    rows += [(o, world.object_prompt(o), world.Item(object=o)) for o in world.OBJECTS]
    for o, s in zip(world.OBJECTS[:4], world.STYLES[::2]):
        rows.append((f"{o} / {s}", world.composition_prompt(o, s), world.Item(style=s, object=o)))
    return rows


def concept_grid(pipe, n: int = 8, seed: int = 0, scale: int = 2, progress=None) -> Image.Image:
    rows = grid_rows()
    size = world.SIZE * scale
    canvas = Image.new("RGB", (LABEL_W + (n + 1) * size + 8, len(rows) * size + 24), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((LABEL_W, 6), "render", fill="black")
    draw.text((LABEL_W + size + 8, 6), "generations (testbed pipeline, fixed seeds)", fill="black")
    for r, (label, prompt, item) in enumerate(rows):
        y = 24 + r * size
        draw.text((4, y + size // 2 - 6), label, fill="black")
        ref = world.render(item, world.item_seed(item, seed, 0))
        canvas.paste(Image.fromarray(ref).resize((size, size), Image.NEAREST), (LABEL_W, y))
        images = generate(pipe, prompt, range(seed, seed + n), SAMPLE_STEPS, GUIDANCE)
        for i, img in enumerate(images):
            canvas.paste(Image.fromarray(np.asarray(img)).resize((size, size), Image.NEAREST),
                         (LABEL_W + size + 8 + i * size, y))
        if progress:
            progress(r + 1, len(rows))
    return canvas
