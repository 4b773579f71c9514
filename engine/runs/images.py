"""Evaluation images in a run directory: what an attack run generates at each evaluation step, kept as arrays.

``<run>/eval/<concept>/step-<k>.npz`` holds ``images`` (uint8 ``[n, H, W, 3]``), ``seeds``, ``prompt``, ``concept``
and ``step``, so that every metric can be recomputed from the run directories alone. ``<run>/checkpoints/<concept>/``
holds a concept's attack output when it was saved.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import atomic_savez

__all__ = ["EVAL_DIR", "EvalImages", "concept_dir", "eval_path", "save_eval_images", "load_eval_images",
           "eval_steps", "copy_eval_images", "weights_dir"]

EVAL_DIR = "eval"


def concept_dir(concept: str) -> str:
    """A folder name for a concept name (``Van Gogh`` -> ``Van_Gogh``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", concept).strip("_") or "concept"


def eval_path(run_dir: str | Path, concept: str, step: int) -> Path:
    return Path(run_dir) / EVAL_DIR / concept_dir(concept) / f"step-{int(step):06d}.npz"


def weights_dir(run_dir: str | Path, concept: str) -> Path:
    """Where an attack run keeps a concept's attack output (``--save-weights``): ``<run>/checkpoints/<concept>/``."""
    return Path(run_dir) / "checkpoints" / concept_dir(concept)


def save_eval_images(run_dir: str | Path, concept: str, step: int, images: np.ndarray, seeds: Sequence[int],
                     prompt: str) -> Path:
    """Write one evaluation step's images (atomically: a reader never sees half a file)."""
    return atomic_savez(eval_path(run_dir, concept, step), images=np.asarray(images, dtype=np.uint8),
                        seeds=np.asarray(list(seeds), dtype=np.int64), prompt=np.array(prompt),
                        concept=np.array(concept), step=np.array(int(step)))


@dataclass
class EvalImages:
    images: np.ndarray
    seeds: list[int]
    prompt: str


def load_eval_images(run_dir: str | Path, concept: str, step: int) -> EvalImages | None:
    """The evaluation images of ``concept`` at ``step`` in a run, or None when there are none."""
    path = eval_path(run_dir, concept, step)
    if not path.exists():
        return None
    with np.load(path) as d:
        return EvalImages(d["images"], [int(s) for s in d["seeds"]], str(d["prompt"]))


def eval_steps(run_dir: str | Path, concept: str) -> list[int]:
    """Attack steps with evaluation images of ``concept`` in a run, ascending."""
    folder = Path(run_dir) / EVAL_DIR / concept_dir(concept)
    steps = []
    for p in folder.glob("step-*.npz") if folder.is_dir() else ():
        try:
            steps.append(int(p.stem.split("-", 1)[1]))
        except ValueError:
            continue
    return sorted(steps)


def copy_eval_images(source: str | Path, dest: str | Path, concept: str, step: int) -> EvalImages:
    """Copy one step's evaluation images of ``concept`` from run ``source`` to run ``dest``; returns them."""
    target = eval_path(dest, concept, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(eval_path(source, concept, step), target)
    return load_eval_images(source, concept, step)
