"""The testbed's judge: a small CNN that stands in for CLIP/DINO on the procedural world.

The judge is trained on renders of :mod:`engine.testbed.world` to name, for any 64x64 RGB image,

- its **style** (one of the 8 :data:`~engine.testbed.world.STYLES`, or "none"),
- its **object** (one of the 8 :data:`~engine.testbed.world.OBJECTS`, or "none"); a personal instance counts as
  its object (``greenfish`` is a ``fish``),
- which **personal instance** it shows (one of the 6 :data:`~engine.testbed.world.PERSONAL`, or "none").

Label index ``len(STYLES)`` / ``len(OBJECTS)`` / ``len(PERSONAL)`` of each head means "none", as in
:meth:`engine.testbed.world.Item.labels`. The L2-normalised embedding that feeds the three heads is the
testbed's image-similarity backend (the stand-in for CLIP/DINO image features).

Input convention: see :mod:`engine.testbed.judge.model` (uint8 arrays, PIL images or float tensors in ``[0, 1]``,
resized to 64x64; tensors stay differentiable).

Training (:func:`train_judge`) renders fresh, seeded batches every step, so it is deterministic and resumable
from a checkpoint. Augmentations make the judge read styles from pattern rather than palette (random
grayscale) and tolerate the slight blur, noise and colour drift of images produced by a generative model.
"""

from __future__ import annotations

from .augment import GRAYSCALE_P, _warp, augment, degrade  # noqa: F401  (_warp: tested on its own)
from .batches import COMPOSITION_EXTRA_SHARE, HARD_NEGATIVE_SHARE, PERSONAL_EXTRA_SHARE, training_batch
from .evaluate import evaluate_judge, evaluation_items
from .files import load_judge_file, save_judge
from .model import HEAD_CLASSES, HEADS, IGNORE, JUDGE_SIZE, Judge, accuracy, concept_head, similarity, to_canonical
from .train import DEFAULT_BATCH, DEFAULT_STEPS, train_judge

__all__ = [
    "JUDGE_SIZE", "HEADS", "HEAD_CLASSES", "IGNORE", "Judge", "to_canonical", "accuracy", "similarity", "save_judge",
    "load_judge_file", "training_batch", "augment", "degrade", "train_judge", "evaluation_items", "evaluate_judge",
    "COMPOSITION_EXTRA_SHARE", "PERSONAL_EXTRA_SHARE", "HARD_NEGATIVE_SHARE", "GRAYSCALE_P", "DEFAULT_STEPS",
    "DEFAULT_BATCH", "concept_head",
]
