"""Held-out accuracy of a judge on fresh renders of every evaluation item (:func:`evaluate_judge`)."""

from __future__ import annotations

import zlib

import numpy as np
import torch

from engine.testbed import world
from engine.testbed.world import OBJECTS, PERSONAL, STYLES, Item

from .augment import _grayscale, degrade
from .batches import _EVAL_TAG, _near_miss
from .model import HEADS, Judge, to_canonical

__all__ = ["evaluation_items", "evaluate_judge"]


def evaluation_items() -> list[Item]:
    """Every world item the judge is evaluated on: 8 styles, 8 objects, 64 compositions, 6 personal, 2 generic."""
    items = [Item(style=s) for s in STYLES] + [Item(object=o) for o in OBJECTS]
    items += [Item(style=s, object=o) for s in STYLES for o in OBJECTS]
    items += [Item(personal=p.name) for p in PERSONAL]
    return items + [Item(generic="artwork"), Item(generic="object")]


def evaluate_judge(judge: Judge, n_per_class: int = 25, seed: int = 0) -> dict[str, float]:
    """Held-out accuracy on fresh renders (a seed namespace disjoint from training) of every evaluation item.

    ``judge_accuracy`` is per-head accuracy pooled over all images and all three heads: the share of the
    ``3 * N`` (image, head) decisions that are right ("none" counts as a label, e.g. the style head must say
    "none" for a plain object). Also: ``judge_exact_match`` (all three heads right), per-head accuracies,
    per-kind accuracies, ``judge_personal_recall`` (personal images named as their instance),
    ``judge_personal_near_miss_rejection`` (near-miss variants of personal instances given personal "none";
    not part of ``judge_accuracy``), ``judge_grayscale_style_accuracy`` (style head on grayscale-converted
    style and composition images) and ``judge_degraded_accuracy`` (like ``judge_accuracy`` on copies blurred
    with sigma 0.8 px and given gaussian noise of std 0.03, see :func:`degrade`).
    """
    items = [it for it in evaluation_items() for _ in range(n_per_class)]
    images = np.stack([world.render(it, [_EVAL_TAG, seed, i, zlib.crc32(repr(it).encode())]) for i, it in enumerate(items)])
    labels = torch.tensor([it.labels() for it in items])
    pred = judge.classify(images)
    pred = torch.stack([pred[h].cpu() for h in HEADS], dim=1)
    right = pred == labels  # [N, 3]
    out: dict[str, float] = {
        "judge_accuracy": float(right.float().mean()),
        "judge_exact_match": float(right.all(dim=1).float().mean()),
        "judge_n_images": float(len(items)),
    }
    for i, h in enumerate(HEADS):
        out[f"judge_{h}_head_accuracy"] = float(right[:, i].float().mean())
    kinds = {
        "style": [it.style is not None and it.object is None for it in items],
        "object": [it.object is not None and it.style is None for it in items],
        "composition": [it.style is not None and it.object is not None for it in items],
        "personal": [it.personal is not None for it in items],
        "generic": [it.generic is not None for it in items],
    }
    for k, mask in kinds.items():
        out[f"judge_{k}_accuracy"] = float(right[torch.tensor(mask)].float().mean())
    pmask = torch.tensor(kinds["personal"])
    out["judge_personal_recall"] = float(right[pmask, 2].float().mean())
    # near misses
    n_near = max(1, n_per_class * len(PERSONAL))
    near = [_near_miss(np.random.default_rng([_EVAL_TAG, seed, 10**6 + i])) for i in range(n_near)]
    near_pred = judge.classify(np.stack([img for img, _ in near]))["personal"].cpu()
    out["judge_personal_near_miss_rejection"] = float((near_pred == len(PERSONAL)).float().mean())
    # grayscale styles
    smask = torch.tensor([a or b for a, b in zip(kinds["style"], kinds["composition"])])
    gray = _grayscale(to_canonical(images[smask.numpy()]))
    gpred = judge.classify(gray)["style"].cpu()
    out["judge_grayscale_style_accuracy"] = float((gpred == labels[smask, 0]).float().mean())
    # degraded ("generated-looking") copies of every evaluation image
    dpred: dict[str, list[torch.Tensor]] = {h: [] for h in HEADS}
    for start in range(0, len(images), 512):
        part = degrade(to_canonical(images[start: start + 512]), seed=start)
        for h, v in judge.classify(part).items():
            dpred[h].append(v.cpu())
    dright = torch.stack([torch.cat(dpred[h]) for h in HEADS], dim=1) == labels
    out["judge_degraded_accuracy"] = float(dright.float().mean())
    return out
