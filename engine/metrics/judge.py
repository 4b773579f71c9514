"""The testbed judge as a metric: ``judge`` (cosine of its L2-normalised features) and ``judge-acc``.

On the testbed these are the metrics (the 64 px world is far from CLIP/DINO/LPIPS's training data). The judge's
own preprocessing applies (64x64, values in ``[0, 1]``, its fixed standardisation inside the model).

``judge-acc`` is an accuracy, not a similarity of two sets. :class:`JudgeAccuracy` offers

- :meth:`~JudgeAccuracy.accuracy` ``(x, n)``: the share of images ``x`` the judge names as concept ``n`` (its
  style head for a style, object head for an object, personal head for a personal instance);
- :meth:`~JudgeAccuracy.agreement` ``(a, b, n)``: the mean over all pairs ``(a_i, b_j)`` of ``[the judge gives
  a_i and b_j the same label on concept n's head]``, i.e. ``M(a, b)`` with a 0/1 similarity.

How the gap ratios use them is in :mod:`engine.metrics.gaps`: accuracy is ``agreement`` with an ideal reference
set that is all labelled ``n``.

Weights: ``eval.judge_weights`` or the judge shipped with the testbed (``engine/testbed/weights/judge.safetensors``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .base import CosineFeatures, FeatureCache, Images, MetricWeightsMissing, check_not_empty, num_images


class _OnJudge:
    """A metric computed by a testbed judge (on ``device``), with a cache of per-set results."""

    name: str

    def __init__(self, judge: torch.nn.Module, *, label: str = "", random_init: bool = False,
                 device: str | torch.device = "cpu"):
        self.judge = judge.to(device).eval()
        self.device = torch.device(device)
        self.label = label or self.name
        self.random_init = bool(random_init)
        self.cache = FeatureCache()


class JudgeBackend(_OnJudge, CosineFeatures):
    """Cosine similarity of the judge's L2-normalised embeddings (``Judge.features``; see
    :class:`~engine.metrics.base.CosineFeatures`)."""

    name = "judge"
    kind = "similarity"

    def preprocess(self, images: Images) -> torch.Tensor:
        """The judge's canonical input: float32 ``[n, 3, 64, 64]`` in ``[0, 1]``."""
        return self.judge.preprocess(images)

    def _compute(self, images: Images) -> torch.Tensor:
        return self.judge.features(images).float().cpu()


class JudgeAccuracy(_OnJudge):
    """``judge-acc``: the share of images the judge recognises as the intended concept, and label agreement."""

    name = "judge-acc"
    kind = "accuracy"

    def head(self, concept: str) -> tuple[str, int]:
        """``(head, label index)`` of a concept name (``KeyError`` naming the known concepts otherwise)."""
        from engine.testbed.judge import concept_head

        return concept_head(concept)

    def predictions(self, images: Images) -> dict[str, torch.Tensor]:
        """Predicted label per head, ``{"style": LongTensor[n], "object": ..., "personal": ...}`` (cached)."""
        return self.cache.get(images, lambda x: {h: v.cpu() for h, v in self.judge.classify(x).items()})

    def labels(self, images: Images, concept: str) -> torch.Tensor:
        """Predicted labels on the head of ``concept``, ``LongTensor[n]``."""
        head, _ = self.head(concept)
        return self.predictions(images)[head]

    def accuracy(self, images: Images, concept: str) -> float:
        """Share of ``images`` the judge names as ``concept``."""
        _, index = self.head(concept)
        if num_images(images) == 0:
            raise ValueError("the accuracy of an empty image set is undefined")
        return float((self.labels(images, concept) == index).double().mean())

    def agreement_matrix(self, a: Images, b: Images, concept: str) -> torch.Tensor:
        """``[len(a), len(b)]`` of 1.0 where the judge gives both images the same label on ``concept``'s head."""
        la, lb = self.labels(a, concept), self.labels(b, concept)
        return (la[:, None] == lb[None, :]).float()

    def agreement(self, a: Images, b: Images, concept: str) -> float:
        """Mean of :meth:`agreement_matrix` over all pairs (``sum_c p_a(c) p_b(c)`` over the head's labels)."""
        check_not_empty(a)
        check_not_empty(b)
        return float(self.agreement_matrix(a, b, concept).double().mean())


def load_judge_model(weights: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                     random_init: bool = False, seed: int = 0) -> torch.nn.Module:
    """The judge from ``weights`` or the testbed's shipped file; ``random_init``: an untrained ``Judge`` (``seed``)."""
    from engine.testbed import JUDGE_FILE
    from engine.testbed.judge import Judge, load_judge_file

    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Judge().to(device).eval()
    path = Path(weights) if weights else JUDGE_FILE
    if not path.is_file():
        where = f"eval.judge_weights={path}" if weights else f"the testbed's {path}"
        raise MetricWeightsMissing(f"testbed judge weights not found: looked for {where}; train and install them with "
                                   f"`mima testbed build --install` or give a judge file with "
                                   f"--set eval.judge_weights=/path/to/judge.safetensors")
    return load_judge_file(path, device=device)
