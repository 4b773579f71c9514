"""The judge's network (:class:`Judge`), its canonical input, and what it says of a concept's images.

Input convention: :meth:`Judge.preprocess` turns a uint8 numpy array ``[B, H, W, 3]``, a list of PIL images or a
float tensor ``[B, 3, H, W]`` in ``[0, 1]`` into the judge's canonical input, a float32 tensor
``[B, 3, 64, 64]`` in ``[0, 1]`` (other sizes are resized with antialiasing). The fixed standardisation
``(x - 0.5) / 0.25`` is applied inside :meth:`Judge.logits`, so ``preprocess`` is idempotent and feeding its
output back into any method is safe. Tensor inputs stay differentiable through ``preprocess`` and ``logits``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.metrics.base import chunks, num_images, to_uint8_list
from engine.testbed import world
from engine.testbed.world import OBJECTS, PERSONAL, PERSONAL_BY_NAME, STYLES

__all__ = ["JUDGE_SIZE", "HEADS", "HEAD_CLASSES", "IGNORE", "Judge", "to_canonical", "accuracy", "similarity"]

JUDGE_SIZE = world.SIZE  # 64
HEADS = ("style", "object", "personal")
HEAD_CLASSES = {"style": len(STYLES) + 1, "object": len(OBJECTS) + 1, "personal": len(PERSONAL) + 1}
IGNORE = -100  # label value that leaves a head out of the loss for that image

_MEAN, _STD = 0.5, 0.25


def _norm(kind: str, groups: int, channels: int) -> nn.Module:
    return nn.GroupNorm(groups, channels) if kind == "group" else nn.BatchNorm2d(channels)


class _Residual(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class Judge(nn.Module):
    """A small CNN with three classification heads over a shared L2-normalisable embedding.

    ``widths``/``depths``: channels and number of 3x3 conv layers (conv + norm + SiLU; with ``residual`` every
    layer after a stage's first adds its input back) per stage; every stage but the last ends with 2x2
    max-pooling. Global pooling (``"avgmax"``: average and max concatenated, so that a small object on a busy
    background is not averaged away), a two-layer neck to ``feature_dim`` (the embedding), then three linear
    heads. ``norm``: ``"batch"`` (default; trains much faster here) or ``"group"``. :meth:`features` and
    :meth:`classify` always run in eval mode (BatchNorm running statistics), whatever the module's mode.

    Default: 32-64-128-128 channels, 1-2-2-2 layers, ~0.68 M parameters (~1.35 MB in fp16).
    """

    def __init__(
        self,
        widths: Sequence[int] = (32, 64, 128, 128),
        depths: Sequence[int] = (1, 2, 2, 2),
        feature_dim: int = 128,
        neck_dim: int = 256,
        groups: int = 8,
        norm: str = "batch",
        pool: str = "avgmax",
        residual: bool = True,
    ):
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError("widths and depths must have the same length")
        self.config: dict[str, Any] = {
            "widths": [int(w) for w in widths],
            "depths": [int(d) for d in depths],
            "feature_dim": int(feature_dim),
            "neck_dim": int(neck_dim),
            "groups": int(groups),
            "norm": str(norm),
            "pool": str(pool),
            "residual": bool(residual),
        }
        if norm not in ("group", "batch"):
            raise ValueError(f"norm must be 'group' or 'batch', got {norm!r}")
        if pool not in ("avg", "avgmax"):
            raise ValueError(f"pool must be 'avg' or 'avgmax', got {pool!r}")
        layers: list[nn.Module] = []
        ci = 3
        for i, (co, depth) in enumerate(zip(widths, depths)):
            for j in range(depth):
                layer = nn.Sequential(nn.Conv2d(ci, co, 3, padding=1, bias=False), _norm(norm, groups, co), nn.SiLU())
                layers.append(_Residual(layer) if residual and j > 0 else layer)
                ci = co
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.neck = nn.Sequential(nn.Linear(ci * (2 if pool == "avgmax" else 1), neck_dim), nn.SiLU(),
                                  nn.Linear(neck_dim, feature_dim))
        self.style_head = nn.Linear(feature_dim, HEAD_CLASSES["style"])
        self.object_head = nn.Linear(feature_dim, HEAD_CLASSES["object"])
        self.personal_head = nn.Linear(feature_dim, HEAD_CLASSES["personal"])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- input

    def preprocess(self, images: Any) -> torch.Tensor:
        """Canonical judge input: float32 ``[B, 3, 64, 64]`` in ``[0, 1]`` on the judge's device.

        Accepts a uint8 numpy array ``[B, H, W, 3]`` (or one ``[H, W, 3]`` image), a list of PIL images (any
        sizes, converted to RGB), or a float tensor ``[B, 3, H, W]`` (or ``[3, H, W]``) in ``[0, 1]``; a uint8
        tensor ``[B, 3, H, W]`` is scaled by 1/255. Other sizes are resized to 64x64 with antialiasing.
        """
        return to_canonical(images, self.device)

    # -- outputs

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - _MEAN) / _STD
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.body(x)
        g = h.mean(dim=(2, 3))
        if self.config["pool"] == "avgmax":
            g = torch.cat([g, h.amax(dim=(2, 3))], dim=1)
        return self.neck(g)

    def logits(self, x: Any) -> dict[str, torch.Tensor]:
        """Logits of the three heads, ``{"style": [B, 9], "object": [B, 9], "personal": [B, 7]}``.

        ``x`` is anything :meth:`preprocess` accepts (canonical tensors pass through untouched); differentiable.
        """
        e = self._embed(self.preprocess(x))
        return {"style": self.style_head(e), "object": self.object_head(e), "personal": self.personal_head(e)}

    def forward(self, x: Any) -> dict[str, torch.Tensor]:
        return self.logits(x)

    @contextmanager
    def _inference(self):
        """No grad and eval-mode normalisation (running statistics are used, never updated); restores the mode."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    def features(self, images: Any, chunk: int = 256) -> torch.Tensor:
        """L2-normalised embeddings ``[B, feature_dim]`` (the input of the heads), float32, no grad, eval mode."""
        with self._inference():
            out = [F.normalize(self._embed(self.preprocess(part)).float(), dim=-1) for part in chunks(images, chunk)]
        if not out:
            return torch.zeros(0, self.config["feature_dim"], device=self.device)
        return torch.cat(out)

    def classify(self, images: Any, chunk: int = 256) -> dict[str, torch.Tensor]:
        """Predicted label per head, ``{"style": LongTensor[B], "object": ..., "personal": ...}`` (no grad, eval mode)."""
        preds: dict[str, list[torch.Tensor]] = {h: [] for h in HEADS}
        with self._inference():
            for part in chunks(images, chunk):
                for h, v in self.logits(part).items():
                    preds[h].append(v.argmax(dim=-1))
        return {h: torch.cat(v) if v else torch.zeros(0, dtype=torch.long, device=self.device) for h, v in preds.items()}


def _resize(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] == (JUDGE_SIZE, JUDGE_SIZE):
        return x
    return F.interpolate(x, size=(JUDGE_SIZE, JUDGE_SIZE), mode="bilinear", align_corners=False, antialias=True)


def to_canonical(images: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """The judge's canonical input (see :meth:`Judge.preprocess`). Tensors keep their float values (and their
    gradient); arrays and lists of images are read as every metric reads them (:func:`engine.metrics.base.to_uint8_list`)."""
    if isinstance(images, torch.Tensor):
        x = images
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a tensor [B, 3, H, W], got shape {tuple(images.shape)}")
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        elif not x.is_floating_point():
            raise TypeError(f"expected a float tensor in [0, 1] or uint8, got {x.dtype}")
        elif x.numel():
            lo, hi = float(x.detach().min()), float(x.detach().max())
            if lo < -0.5 or hi > 1.5:
                raise ValueError(f"float images must be in [0, 1] (got values in [{lo:.3g}, {hi:.3g}])")
        x = x.to(device=device, dtype=torch.float32)
        return _resize(x).clamp(0.0, 1.0)
    arrays = to_uint8_list(images)  # a uint8 array [B, H, W, 3], or a list of PIL images / uint8 arrays
    if not arrays:
        return torch.zeros(0, 3, JUDGE_SIZE, JUDGE_SIZE, device=device)
    groups = [arrays] if isinstance(images, np.ndarray) else [[a] for a in arrays]  # a list may hold any sizes
    return torch.cat([_resize(torch.from_numpy(np.stack(g)).to(device).permute(0, 3, 1, 2).float() / 255.0)
                      for g in groups])


def concept_head(concept: str) -> tuple[str, int]:
    """``(head, label index)`` of a concept name: a style, an object or a personal instance (``KeyError`` naming
    the known concepts otherwise)."""
    if concept in STYLES:
        return "style", STYLES.index(concept)
    if concept in OBJECTS:
        return "object", OBJECTS.index(concept)
    if concept in PERSONAL_BY_NAME:
        return "personal", [p.name for p in PERSONAL].index(concept)
    known = ", ".join((*STYLES, *OBJECTS, *PERSONAL_BY_NAME))
    raise KeyError(f"the judge has no head for concept {concept!r}; known: {known}")


def accuracy(judge: Judge, images: Any, concept: str) -> float:
    """Share of ``images`` the judge recognises as ``concept``.

    A style name is checked by the style head, an object name by the object head, a personal instance name by
    the personal head (so a composition "star in strieker style" counts for both "star" and "strieker").
    """
    head, index = concept_head(concept)
    if num_images(images) == 0:
        raise ValueError("accuracy of an empty image set is undefined")
    pred = judge.classify(images)[head]
    return float((pred == index).float().mean())


def similarity(judge: Judge, a: Any, b: Any) -> float:
    """Mean pairwise cosine similarity of the judge's features over all pairs ``(a_i, b_j)``."""
    fa, fb = judge.features(a), judge.features(b)
    if len(fa) == 0 or len(fb) == 0:
        raise ValueError("similarity of an empty image set is undefined")
    return float((fa @ fb.T).mean())
