"""Image-similarity metrics and the gap ratios MSGR / MRSGR (docs/method.md, Eq. 10-13).

    from engine.metrics import get_backend, get_backends
    clip = get_backend("clip", profile.eval)              # ViT-B-32 / openai unless the profile says otherwise
    clip.mean_similarity(reference, generated)            # M(A, B): mean cosine over all pairs
    backends = get_backends(profile.eval)                 # {name: backend} for eval.metrics

    from engine.metrics.gaps import msgr_images, mrsgr_images
    msgr_images(clip, refs, attacked, immunized)          # per-concept terms and their mean

Backends, one module each: ``clip`` (open_clip), ``dino`` (transformers ViT, CLS feature), ``lpips``
(``1 - LPIPS``), ``judge`` (the testbed judge's features) — all similarity backends with ``pair_matrix(a, b)``
and ``mean_similarity(a, b)`` — and ``judge-acc`` (an accuracy backend: ``accuracy(images, concept)`` and
``agreement(a, b, concept)``). Image sets are uint8 ``[n, H, W, 3]`` arrays or lists of PIL images.

Every backend has ``random_init``: True only when built with ``random_init=True`` (tests) — its numbers mean
nothing, and :func:`require_trained` refuses it. Missing pretrained weights raise :class:`MetricWeightsMissing`
whose message is one line (which weights, where they were looked for, how to provide them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from .base import Images, MetricWeightsMissing, offline

METRICS = ("clip", "dino", "lpips", "judge", "judge-acc")
SIMILARITY_METRICS = ("clip", "dino", "lpips", "judge")
ACCURACY_METRICS = ("judge-acc",)


@runtime_checkable
class SimilarityBackend(Protocol):
    name: str
    kind: str  # "similarity"
    label: str
    random_init: bool

    def pair_matrix(self, a: Images, b: Images) -> torch.Tensor: ...

    def mean_similarity(self, a: Images, b: Images) -> float: ...


@runtime_checkable
class AccuracyBackend(Protocol):
    name: str
    kind: str  # "accuracy"
    label: str
    random_init: bool

    def accuracy(self, images: Images, concept: str) -> float: ...

    def agreement(self, a: Images, b: Images, concept: str) -> float: ...


def _eval_section(config: Any):
    from engine.profile import EvalSection

    if config is None:
        return EvalSection()
    if isinstance(config, EvalSection):
        return config
    if isinstance(getattr(config, "eval", None), EvalSection):  # a whole Profile
        return config.eval
    if isinstance(config, Mapping):
        return EvalSection.model_validate(dict(config))
    raise TypeError(f"expected an EvalSection, a Profile or a mapping, got {type(config).__name__}")


def get_backend(name: str, config: Any = None, device: str | torch.device = "cpu", *, random_init: bool = False,
                cache_dir: str | os.PathLike | None = None, judge: torch.nn.Module | None = None, **options: Any):
    """The backend of metric ``name`` configured by ``config`` (an ``EvalSection``, a ``Profile``, a mapping of
    ``[eval]`` keys, or None for the defaults).

    ``random_init``: the architecture without pretrained weights (tests only; ``backend.random_init`` is True).
    ``cache_dir``: where weights are looked for and downloaded to (default: each library's usual cache).
    ``judge``: an already loaded judge model for ``judge`` / ``judge-acc``. ``options`` go to the loader (e.g.
    ``batch``, or ``size`` for lpips). Raises :class:`MetricWeightsMissing` when pretrained weights are missing.
    """
    cfg = _eval_section(config)
    if name == "clip":
        from .clip import load_clip

        return load_clip(cfg.clip_model, cfg.clip_pretrained, cfg.clip_weights, device=device,
                         random_init=random_init, cache_dir=cache_dir, **options)
    if name == "dino":
        from .dino import load_dino

        return load_dino(cfg.dino_model, cfg.dino_weights, device=device, random_init=random_init,
                         cache_dir=cache_dir, **options)
    if name == "lpips":
        from .lpips import load_lpips

        return load_lpips(cfg.lpips_net, cfg.lpips_weights, device=device, random_init=random_init,
                          cache_dir=cache_dir, **options)
    if name in ("judge", "judge-acc"):
        from .judge import JudgeAccuracy, JudgeBackend, load_judge_model

        model = judge if judge is not None else load_judge_model(cfg.judge_weights, device=device,
                                                                 random_init=random_init, **options)
        cls = JudgeBackend if name == "judge" else JudgeAccuracy
        label = name + (" (random init)" if random_init else "")
        return cls(model, label=label, random_init=random_init, device=device)
    import difflib

    close = difflib.get_close_matches(name, METRICS, n=1)
    raise ValueError(f"unknown metric '{name}'; " + (f"did you mean '{close[0]}'?" if close else
                                                     f"choose from {', '.join(METRICS)}"))


def get_backends(config: Any = None, device: str | torch.device = "cpu", *, metrics: Sequence[str] | None = None,
                 random_init: bool = False, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{name: backend}`` for ``metrics`` (default: ``config.metrics``); judge and judge-acc share one judge."""
    cfg = _eval_section(config)
    out: dict[str, Any] = {}
    judge = None
    for name in metrics if metrics is not None else cfg.metrics:
        out[name] = get_backend(name, cfg, device, random_init=random_init, cache_dir=cache_dir, judge=judge)
        if name in ("judge", "judge-acc"):
            judge = out[name].judge
    return out


def require_trained(backend: Any) -> None:
    """Raise ``ValueError`` for a randomly initialised backend: a report never shows its numbers."""
    if getattr(backend, "random_init", False):
        raise ValueError(f"metric '{backend.name}' has a randomly initialised backbone ({backend.label}); "
                         f"its numbers are meaningless and are not reported")


__all__ = [
    "ACCURACY_METRICS", "METRICS", "SIMILARITY_METRICS", "AccuracyBackend", "Images", "MetricWeightsMissing",
    "SimilarityBackend", "get_backend", "get_backends", "offline", "require_trained",
]
