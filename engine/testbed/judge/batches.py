"""The judge's training data: seeded world renders, extra compositions and personal instances, hard negatives."""

from __future__ import annotations

import colorsys
import zlib
from dataclasses import replace

import numpy as np

from engine.testbed import world
from engine.testbed.world import OBJECTS, PERSONAL, STYLES, Item

__all__ = ["COMPOSITION_EXTRA_SHARE", "PERSONAL_EXTRA_SHARE", "HARD_NEGATIVE_SHARE", "training_batch"]

# Batch mix (see training_batch): these shares are added on top of world.training_items(..., personal=True),
# which fills the rest. Overall: ~14 % styles, ~14 % objects, ~41 % compositions, ~5 % class-prompt items,
# ~18 % personal instances, ~8 % hard negatives for the personal head. Compositions are boosted because
# reading an outlined, textured silhouette on a textured background is the hardest task and dominates the
# evaluation (64 of its 88 items).
COMPOSITION_EXTRA_SHARE = 0.30
PERSONAL_EXTRA_SHARE = 0.12
HARD_NEGATIVE_SHARE = 0.08  # half ordinary objects of a personal instance's shape, half near-miss variants

# Seed namespaces: training and evaluation seeds start with different tags (so they are disjoint whatever the
# user's seeds) and are longer than the 3-element seeds of world.render_many / concept_images.
_TRAIN_TAG = zlib.crc32(b"mima-judge-train")
_EVAL_TAG = zlib.crc32(b"mima-judge-eval")


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """world.render's last step: faint sensor noise and uint8 quantisation."""
    img = img + rng.normal(0, 0.012, size=img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _far_colour(rng: np.random.Generator, ref: tuple[int, int, int]) -> tuple[int, int, int]:
    """A random colour clearly unlike ``ref`` (hue at least 60 degrees away, or luminance 0.3 apart)."""
    r = np.array(ref, dtype=np.float32) / 255
    h0 = colorsys.rgb_to_hsv(*r)[0]
    for _ in range(100):
        c = world._random_colour(rng)
        dh = abs(colorsys.rgb_to_hsv(*c)[0] - h0)
        if min(dh, 1 - dh) >= 1 / 6 or abs(world._luma(c) - world._luma(r)) >= 0.3:
            break
    return tuple(int(v * 255 + 0.5) for v in c)


def _near_miss(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A hard negative for the personal head: a personal instance with its look clearly altered.

    Either recoloured (body and accent), or its look put on another object's shape, or its pattern and detail
    swapped for other ones. Labels: no style, the drawn object, no personal instance.
    """
    p = PERSONAL[int(rng.integers(len(PERSONAL)))]
    mode = int(rng.integers(3))
    if mode == 0:
        q = replace(p, body=_far_colour(rng, p.body), accent=_far_colour(rng, p.accent))
    elif mode == 1:
        others = [o for o in OBJECTS if o != p.object]
        q = replace(p, object=others[int(rng.integers(len(others)))])
    else:
        patterns = [x for x in world.PATTERNS if x != p.pattern]
        details = [x for x in world.DETAILS if x != p.detail]
        q = replace(p, pattern=patterns[int(rng.integers(len(patterns)))], detail=details[int(rng.integers(len(details)))])
    img = _finish(world._personal_image(q, rng), rng)
    return img, (len(STYLES), OBJECTS.index(q.object), len(PERSONAL))


def training_batch(batch: int, seed: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The rendered training batch of ``step``: uint8 ``[batch, 64, 64, 3]`` and int64 labels ``[batch, 3]``.

    A pure function of ``(batch, seed, step)``. Mix: ``world.training_items(..., personal=True)`` for half of
    the batch, plus extra compositions (``COMPOSITION_EXTRA_SHARE``), extra personal instances (total personal
    share ~17 %) and hard negatives for the personal head (``HARD_NEGATIVE_SHARE``): ordinary objects of a
    personal instance's shape with random colours, and near-miss variants of personal instances (see
    :func:`_near_miss`). The images are shuffled.
    """
    rng = np.random.default_rng([_TRAIN_TAG, seed, step])
    n_personal = int(round(PERSONAL_EXTRA_SHARE * batch))
    n_hard = int(round(HARD_NEGATIVE_SHARE * batch))
    n_ordinary = n_hard - n_hard // 2
    n_comp = int(round(COMPOSITION_EXTRA_SHARE * batch))
    n_base = max(batch - n_personal - n_hard - n_comp, 0)
    items: list[Item] = world.training_items(n_base, seed=[_TRAIN_TAG, seed, step, 1], personal=True)
    items += [Item(style=STYLES[int(i)], object=OBJECTS[int(j)]) for i, j in rng.integers((len(STYLES), len(OBJECTS)), size=(n_comp, 2))]
    items += [Item(personal=PERSONAL[int(i)].name) for i in rng.integers(len(PERSONAL), size=n_personal)]
    items += [Item(object=PERSONAL[int(i)].object) for i in rng.integers(len(PERSONAL), size=n_ordinary)]
    images = [world.render(it, [_TRAIN_TAG, seed, step, i, zlib.crc32(repr(it).encode())]) for i, it in enumerate(items)]
    labels = [it.labels() for it in items]
    for i in range(len(items), batch):
        img, lab = _near_miss(np.random.default_rng([_TRAIN_TAG, seed, step, i, 7]))
        images.append(img)
        labels.append(lab)
    order = rng.permutation(batch)
    return np.stack(images)[order], np.asarray(labels, dtype=np.int64)[order]
