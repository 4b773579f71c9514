"""Image sets of a profile: folders, generations by the base model (cached), or testbed world renders.

``load_image_set(spec, ...)`` returns uint8 ``[n, H, W, 3]`` at the model's resolution. Generated sets are cached
under ``<cache_dir>/images/<key>.npz`` keyed by the model, prompt, seeds and sampler settings, so every method and
attack that needs the same images draws them once.

``check_image_sets(profile_image_sets(profile, ...))`` opens every file of the folder sets a job will read, so that
a missing folder, an empty one or an unreadable image is reported (naming the concept, the file and the reason)
before any work starts and before any run directory exists. ``load_references(profile, concepts, ...)`` gives the
concepts' ``images.reference`` sets, which every similarity metric compares with.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .profile import FolderImages, GenerateImages, ImageSet, Profile, ProfileError, RenderImages
from .runs.files import atomic_savez

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class ImageSetError(ProfileError, ValueError):
    """An image set that cannot be read: a missing or empty folder, or a file that is not a readable image (one
    line naming the set, the file and the reason; the CLI exits 2). Unreadable files are never skipped."""


def folder_files(spec: FolderImages) -> list[Path]:
    """The image files a folder set selects (sorted by name, then ``skip`` and ``count``); ``ImageSetError`` when the
    folder is missing or selects none."""
    folder = Path(spec.folder).expanduser()
    if not folder.is_dir():
        raise ImageSetError(f"folder '{folder}' " + ("is not a folder" if folder.exists() else "does not exist"))
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    chosen = files[spec.skip :][: spec.count] if spec.count else files[spec.skip :]
    if not chosen:
        raise ImageSetError(f"folder '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)})"
                            + (f" after skipping {spec.skip} of {len(files)}" if files else ""))
    return chosen


def open_image(path: Path) -> Image.Image:
    """The RGB image of a file, decoded in full; ``ImageSetError`` naming the file when it is not a readable image."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).replace(f"'{path}'", "").replace(str(path), "").split()) or type(e).__name__
        raise ImageSetError(f"'{path}' is not a readable image ({reason}); unreadable files are not skipped: "
                            "replace or remove it") from None


def read_folder(folder: str | Path, size: int, skip: int = 0, count: int | None = None) -> np.ndarray:
    """Images of a folder sorted by name, centre-cropped to squares and resized to ``size``."""
    out = []
    for f in folder_files(FolderImages(folder=str(folder), skip=skip, count=count)):
        im = open_image(f)
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        out.append(np.asarray(im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)))
    return np.stack(out)


def profile_image_sets(profile: Profile, concepts: Iterable[str] | None = None,
                       keys: Sequence[str] = ("immunize", "attack", "reference"),
                       regularization: bool = True) -> list[tuple[str, ImageSet]]:
    """``(field, image set)`` of ``concepts`` (default: all): their ``images.<key>`` for ``keys``, and with
    ``regularization`` the prior images of their class prompts; ``field`` names the set as a profile error does."""
    names = set(profile.concept_names if concepts is None else concepts)
    out: dict[str, ImageSet] = {}
    for i, c in enumerate(profile.concepts):
        if c.name not in names:
            continue
        for key in keys:
            out[f"concepts.{i}.images.{key} (concept '{c.name}')"] = getattr(c.images, key)
        if regularization:
            out[f"regularization.images (class prompt '{c.class_prompt}')"] = profile.regularization.images_for(
                c.class_prompt)
    return list(out.items())


def check_image_sets(sets: Iterable[tuple[str, ImageSet]], path: str | os.PathLike | None = None) -> int:
    """Open every image of every folder set in ``sets`` (``(field, set)`` pairs, see :func:`profile_image_sets`)
    before any work; generated and rendered sets need no check. Returns the number of files read. Raises
    :class:`ImageSetError` naming ``path`` (the profile), the field (with its concept), the file and the reason."""
    n = 0
    for field, spec in sets:
        if not isinstance(spec, FolderImages):
            continue
        try:
            for f in folder_files(spec):
                open_image(f)
                n += 1
        except ImageSetError as e:
            raise ImageSetError(e.detail, path=path, field=field) from None
    return n


def render_set(prompt: str, seeds: range, concept: str | None = None) -> np.ndarray:
    """Testbed world renders of a concept (by name) or of a prompt the world understands."""
    from .testbed import world

    try:
        item = world.item_for(concept) if concept else world.item_for_prompt(prompt)
    except KeyError:
        item = world.item_for_prompt(prompt)
    return np.stack([world.render(item, world.item_seed(item, 0, s)) for s in seeds])


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
        atomic_savez(path, images=images, meta=np.array(json.dumps({"model": model_key, "prompt": prompt})))
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


def load_references(profile: Any, concepts: Sequence[str], size: int, runs_dir: str | Path,
                    device: str | None = None) -> dict[str, np.ndarray]:
    """``images.reference`` of each concept at ``size`` px (generated sets are made by ``[model] base``, cached)."""
    cache: dict[str, Any] = {}

    def base_pipe():
        if "p" not in cache:
            from engine.models import load_pipeline, pick_device, pick_dtype

            cache["p"] = load_pipeline(profile.model.base, pick_device(device or profile.model.device),
                                       pick_dtype(profile.model.dtype))
        return cache["p"]

    out = {}
    for name in concepts:
        c = profile.concept(name)
        out[name] = load_image_set(c.images.reference, prompt=c.prompt, size=size, concept=c.name, pipe_fn=base_pipe,
                                   model_key=profile.model.base, steps=profile.model.sample_steps,
                                   guidance=profile.model.guidance, cache_dir=Path(runs_dir) / ".cache")
    return out
