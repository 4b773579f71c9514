"""Image sets of a profile: folders, generations by the base model (cached), or testbed world renders.

``load_image_set(spec, ...)`` returns uint8 ``[n, H, W, 3]`` at the model's resolution. Generated sets are cached
under ``<cache_dir>/images/<key>.npz`` keyed by the model, prompt, seeds and sampler settings, so every method and
attack that needs the same images draws them once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from .profile import FolderImages, GenerateImages, RenderImages

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class ImageSetError(ValueError):
    pass


def read_folder(folder: str | Path, size: int, skip: int = 0, count: int | None = None) -> np.ndarray:
    """Images of a folder sorted by name, centre-cropped to squares and resized to ``size``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageSetError(f"{folder}: image folder not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[skip:]
    files = files[:count] if count else files
    if not files:
        raise ImageSetError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) after skipping {skip}")
    out = []
    for f in files:
        im = Image.open(f).convert("RGB")
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        out.append(np.asarray(im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)))
    return np.stack(out)


def render_set(prompt: str, seeds: range, concept: str | None = None) -> np.ndarray:
    """Testbed world renders of a concept (by name) or of a prompt the world understands."""
    from .testbed import world

    try:
        item = world.item_for(concept) if concept else world.item_for_prompt(prompt)
    except KeyError:
        item = world.item_for_prompt(prompt)
    return np.stack([world.render(item, world.item_seed(item, 0, s)) for s in seeds])


def _atomic_savez(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def generated_set(pipe_fn: Callable[[], object], model_key: str, prompt: str, seeds: range, steps: int,
                  guidance: float, cache_dir: Path | None, progress=None) -> np.ndarray:
    """Generations of ``prompt`` (image i: seed ``seeds[i]``) by the model ``pipe_fn()`` returns, cached."""
    from .sampling import generate

    key = hashlib.sha256(json.dumps([model_key, prompt, list(seeds), steps, guidance]).encode()).hexdigest()[:20]
    path = cache_dir / "images" / f"{key}.npz" if cache_dir else None
    if path and path.exists():
        with np.load(path) as d:
            return d["images"]
    pipe = pipe_fn()
    chunks, seeds = [], list(seeds)
    for i in range(0, len(seeds), 8):
        chunks.append(generate(pipe, prompt, seeds[i : i + 8], steps, guidance))
        if progress:
            progress(min(i + 8, len(seeds)), len(seeds))
    images = np.concatenate(chunks)
    if path:
        _atomic_savez(path, images=images, meta=np.array(json.dumps({"model": model_key, "prompt": prompt})))
    return images


def load_image_set(spec: FolderImages | GenerateImages | RenderImages, *, prompt: str, size: int,
                   concept: str | None = None, pipe_fn: Callable[[], object] | None = None, model_key: str = "",
                   steps: int = 50, guidance: float = 7.5, cache_dir: Path | None = None, progress=None) -> np.ndarray:
    """uint8 ``[n, size, size, 3]`` images of one image set (``prompt``: what a generate/render spec draws)."""
    if isinstance(spec, FolderImages):
        return read_folder(spec.folder, size, spec.skip, spec.count)
    if isinstance(spec, RenderImages):
        images = render_set(prompt, spec.seeds, concept)
    else:
        if pipe_fn is None:
            raise ImageSetError("a generate image set needs a model")
        images = generated_set(pipe_fn, model_key, spec.prompt or prompt, spec.seeds, steps, guidance, cache_dir, progress)
    if images.shape[1] != size:
        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])
    return images
