"""The cache of unimmunized attacks: one attack of a model's concept serves every immunization started from it.

The key of one concept's attack on one model is a hash of (model hash, attack, concept, settings, seed, evaluation
seeds and prompt, the training images' pixels, sampler, dtype and device type). An unimmunized attack run
(``extra.immunized`` false, no control) that finished a concept with the same key holds that concept's attack: its
evaluation images (and its weights when they were saved).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from engine.profile import AttackSettings
from engine.runs import CACHE_STATES, RunStatus, Runs, eval_steps, weights_dir

__all__ = ["image_digest", "cache_key", "is_cache_source", "find_cached"]


def image_digest(images: np.ndarray | None) -> str | None:
    """A short hash of an image array's shape and pixels (None for None)."""
    if images is None:
        return None
    h = hashlib.sha256(repr(images.shape).encode())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()[:20]


def cache_key(model_hash: str, settings: AttackSettings, concept: str, *, seed: int, eval_seeds: Sequence[int],
              prompt: str, eval_prompt: str, images: np.ndarray, class_images: np.ndarray | None = None,
              sample_steps: int, guidance: float, dtype: str, device: str) -> str:
    """The cache key of one concept's attack on one model (see the module docstring)."""
    payload = {"model": model_hash, "settings": asdict(settings), "concept": concept, "seed": int(seed),
               "eval_seeds": [int(s) for s in eval_seeds], "prompt": prompt, "eval_prompt": eval_prompt,
               "images": image_digest(images), "class_images": image_digest(class_images),
               "sample_steps": int(sample_steps), "guidance": float(guidance), "dtype": dtype, "device": device}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def is_cache_source(st: RunStatus) -> bool:
    """An unimmunized attack run (``immunized`` false, not only missing; no control) that ended: its finished concepts
    can be reused."""
    links = st.attack
    return (links is not None and "immunized" in links.model_fields_set and not links.immunized
            and not links.control and st.state in CACHE_STATES)


def find_cached(runs_dir: str | Path, keys: Mapping[str, str],
                need_weights: bool = False) -> tuple[Path | None, dict[str, Path]]:
    """``(whole, parts)``: a finished unimmunized attack run holding every concept of ``keys`` ({concept: key})
    with the same keys (newest first), and for each concept some run that holds it (its attack finished).
    ``need_weights``: only concepts whose attack output was saved (:func:`~engine.runs.weights_dir`) count."""
    whole, parts = None, {}
    for st in reversed(Runs.scan(runs_dir).select("attack", state=CACHE_STATES, where=is_cache_source)):
        links = st.attack
        have, done = links.cache_keys, set(links.done)
        run_dir = Path(st.dir)
        hits = {c for c, k in keys.items()
                if c in done and have.get(c) == k and eval_steps(run_dir, c)
                and (not need_weights or weights_dir(run_dir, c).is_dir())}
        if whole is None and st.finished and hits == set(keys):
            whole = run_dir
        for c in hits:
            parts.setdefault(c, run_dir)
    return whole, parts
