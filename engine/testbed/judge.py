"""The testbed's judge: a small CNN that stands in for CLIP/DINO on the procedural world.

The judge is trained on renders of :mod:`engine.testbed.world` to name, for any 64x64 RGB image,

- its **style** (one of the 8 :data:`~engine.testbed.world.STYLES`, or "none"),
- its **object** (one of the 8 :data:`~engine.testbed.world.OBJECTS`, or "none"); a personal instance counts as
  its object (``greenfish`` is a ``fish``),
- which **personal instance** it shows (one of the 6 :data:`~engine.testbed.world.PERSONAL`, or "none").

Label index ``len(STYLES)`` / ``len(OBJECTS)`` / ``len(PERSONAL)`` of each head means "none", as in
:meth:`engine.testbed.world.Item.labels`. The L2-normalised embedding that feeds the three heads is the
testbed's image-similarity backend (the stand-in for CLIP/DINO image features).

Input convention: :meth:`Judge.preprocess` turns a uint8 numpy array ``[B, H, W, 3]``, a list of PIL images or a
float tensor ``[B, 3, H, W]`` in ``[0, 1]`` into the judge's canonical input, a float32 tensor
``[B, 3, 64, 64]`` in ``[0, 1]`` (other sizes are resized with antialiasing). The fixed standardisation
``(x - 0.5) / 0.25`` is applied inside :meth:`Judge.logits`, so ``preprocess`` is idempotent and feeding its
output back into any method is safe. Tensor inputs stay differentiable through ``preprocess`` and ``logits``.

Training (:func:`train_judge`) renders fresh, seeded batches every step, so it is deterministic and resumable
from a checkpoint. Augmentations make the judge read styles from pattern rather than palette (random
grayscale) and tolerate the slight blur, noise and colour drift of images produced by a generative model.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.testbed import world
from engine.testbed.world import OBJECTS, PERSONAL, PERSONAL_BY_NAME, STYLES, Item

JUDGE_SIZE = world.SIZE  # 64
HEADS = ("style", "object", "personal")
HEAD_CLASSES = {"style": len(STYLES) + 1, "object": len(OBJECTS) + 1, "personal": len(PERSONAL) + 1}
IGNORE = -100  # label value that leaves a head out of the loss for that image

_MEAN, _STD = 0.5, 0.25
_LUMA = (0.299, 0.587, 0.114)
_FORMAT = "mima-testbed-judge"
_FORMAT_VERSION = "1"

# Default training settings (see train_judge): 900 steps x 64 images, about 5 minutes on one CPU thread.
DEFAULT_STEPS = 900
DEFAULT_BATCH = 64
DEFAULT_LR = 3e-3
DEFAULT_WEIGHT_DECAY = 0.05
DEFAULT_CHECKPOINT_EVERY = 100
# Batch mix (see training_batch): these shares are added on top of world.training_items(..., personal=True),
# which fills the rest. Overall: ~14 % styles, ~14 % objects, ~41 % compositions, ~5 % class-prompt items,
# ~18 % personal instances, ~8 % hard negatives for the personal head. Compositions are boosted because
# reading an outlined, textured silhouette on a textured background is the hardest task and dominates the
# evaluation (64 of its 88 items).
COMPOSITION_EXTRA_SHARE = 0.30
PERSONAL_EXTRA_SHARE = 0.12
HARD_NEGATIVE_SHARE = 0.08  # half ordinary objects of a personal instance's shape, half near-miss variants
GRAYSCALE_P = 0.3

# Seed namespaces: training and evaluation seeds start with different tags (so they are disjoint whatever the
# user's seeds) and are longer than the 3-element seeds of world.render_many / concept_images.
_TRAIN_TAG = zlib.crc32(b"mima-judge-train")
_EVAL_TAG = zlib.crc32(b"mima-judge-eval")


# ----------------------------------------------------------------------------------------------- model


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
        return _to_canonical(images, self.device)

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
            out = [F.normalize(self._embed(self.preprocess(part)).float(), dim=-1) for part in _chunks(images, chunk)]
        if not out:
            return torch.zeros(0, self.config["feature_dim"], device=self.device)
        return torch.cat(out)

    def classify(self, images: Any, chunk: int = 256) -> dict[str, torch.Tensor]:
        """Predicted label per head, ``{"style": LongTensor[B], "object": ..., "personal": ...}`` (no grad, eval mode)."""
        preds: dict[str, list[torch.Tensor]] = {h: [] for h in HEADS}
        with self._inference():
            for part in _chunks(images, chunk):
                for h, v in self.logits(part).items():
                    preds[h].append(v.argmax(dim=-1))
        return {h: torch.cat(v) if v else torch.zeros(0, dtype=torch.long, device=self.device) for h, v in preds.items()}


def _num_images(images: Any) -> int:
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return 1 if images.ndim == 3 else int(images.shape[0])
    return len(images)


def _chunks(images: Any, size: int):
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3:
        yield images
        return
    n = _num_images(images)
    for i in range(0, n, size):
        yield images[i: i + size]


def _resize(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] == (JUDGE_SIZE, JUDGE_SIZE):
        return x
    return F.interpolate(x, size=(JUDGE_SIZE, JUDGE_SIZE), mode="bilinear", align_corners=False, antialias=True)


def _to_canonical(images: Any, device: torch.device | str = "cpu") -> torch.Tensor:
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
    if isinstance(images, np.ndarray):
        a = images
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"expected a uint8 array [B, H, W, 3], got shape {images.shape}")
        if a.dtype != np.uint8:
            raise TypeError(f"expected a uint8 array, got {a.dtype}")
        a = np.ascontiguousarray(a)
        if not a.flags.writeable:
            a = a.copy()
        x = torch.from_numpy(a).to(device).permute(0, 3, 1, 2).float() / 255.0
        return _resize(x)
    if isinstance(images, (list, tuple)):
        if not images:
            return torch.zeros(0, 3, JUDGE_SIZE, JUDGE_SIZE, device=device)
        parts = []
        for im in images:
            if not hasattr(im, "convert"):
                raise TypeError(f"expected PIL images in the list, got {type(im).__name__}")
            a = np.asarray(im.convert("RGB"), dtype=np.uint8)
            parts.append(_to_canonical(a, device))
        return torch.cat(parts)
    raise TypeError(f"unsupported image input: {type(images).__name__}")


# ----------------------------------------------------------------------------------------------- API


def _concept_head(concept: str) -> tuple[str, int]:
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
    head, index = _concept_head(concept)
    if _num_images(images) == 0:
        raise ValueError("accuracy of an empty image set is undefined")
    pred = judge.classify(images)[head]
    return float((pred == index).float().mean())


def similarity(judge: Judge, a: Any, b: Any) -> float:
    """Mean pairwise cosine similarity of the judge's features over all pairs ``(a_i, b_j)``."""
    fa, fb = judge.features(a), judge.features(b)
    if len(fa) == 0 or len(fb) == 0:
        raise ValueError("similarity of an empty image set is undefined")
    return float((fa @ fb.T).mean())


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_judge(judge: Judge, path: str | os.PathLike) -> None:
    """Save as safetensors with fp16 storage; the model config travels as JSON in the metadata."""
    from safetensors.torch import save_file

    tensors = {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).contiguous()
               for k, v in judge.state_dict().items()}
    meta = {"format": _FORMAT, "version": _FORMAT_VERSION, "config": json.dumps(judge.config, sort_keys=True)}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def load_judge_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> Judge:
    """Load a judge saved by :func:`save_judge`: fp32 weights, eval mode, on ``device``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a testbed judge file (format={meta.get('format')!r})")
        state = {k: _fp32(f.get_tensor(k)) for k in f.keys()}
    judge = Judge(**json.loads(meta["config"]))
    judge.load_state_dict(state)
    return judge.to(device).eval()


# ----------------------------------------------------------------------------------------------- data


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


# ----------------------------------------------------------------------------------------------- augmentation


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True).expand_as(x)


def _blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Separable gaussian blur of ``x`` ``[B, C, H, W]`` with one ``sigma`` (px) per image; edges replicated."""
    r = radius
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.to(x.dtype)[:, None] ** 2))
    k = (k / k.sum(dim=1, keepdim=True)).view(len(x), 1, 2 * r + 1, 1, 1)
    y = F.pad(x, (r, r, r, r), mode="replicate")
    h, w = x.shape[2], x.shape[3]
    y = sum(k[:, :, i] * y[:, :, :, i: i + w] for i in range(2 * r + 1))  # horizontal
    return sum(k[:, :, i] * y[:, :, i: i + h, :] for i in range(2 * r + 1))  # vertical


def _warp(x: torch.Tensor, amp: torch.Tensor, gen: torch.Generator, cells: int = 4) -> torch.Tensor:
    """Elastic warp of ``x`` ``[B, C, H, W]``: a random ``cells x cells`` field of displacements (at most ``amp`` px
    per image), bicubically upsampled, moves every pixel; edges replicated."""
    b, _, h, w = x.shape
    coarse = (torch.rand(b, 2, cells, cells, generator=gen) * 2 - 1) * amp.view(b, 1, 1, 1)
    flow = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    grid = torch.stack([xs, ys], dim=-1).unsqueeze(0) + flow * torch.tensor([2 / (w - 1), 2 / (h - 1)])
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def degrade(x: torch.Tensor, seed: int = 0, sigma: float = 0.8, noise: float = 0.03) -> torch.Tensor:
    """A fixed "generated-looking" degradation of canonical images: gaussian blur then gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    y = _blur(x, torch.full((len(x),), sigma)) + noise * torch.randn(x.shape, generator=gen)
    return y.clamp(0, 1)


def augment(x: torch.Tensor, gen: torch.Generator, grayscale_p: float = GRAYSCALE_P) -> tuple[torch.Tensor, torch.Tensor]:
    """Training augmentation of canonical images ``x`` ``[B, 3, 64, 64]``; returns (images, grayscale mask).

    Per image: a smooth elastic warp (p=0.5, displacements up to 4 px: generated silhouettes are wobbly copies of
    the rendered ones, and a judge trained on crisp shapes alone took generated instances that a person recognises
    for "none"), mild colour jitter (p=0.8: brightness and contrast x[0.85, 1.15], saturation x[0.8, 1.2], hue
    +-0.08 rad), grayscale (p=``grayscale_p``), gaussian blur (p=0.5, sigma 0.3-1.8 px), gaussian noise
    (p=0.35, std 0.005-0.04). Deterministic given ``gen``.
    """
    b = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    def coin(p: float) -> torch.Tensor:
        return torch.rand(b, generator=gen) < p

    jit = coin(0.8)
    one = torch.ones(b)
    bright = torch.where(jit, u(0.85, 1.15), one)
    contrast = torch.where(jit, u(0.85, 1.15), one)
    sat = torch.where(jit, u(0.8, 1.2), one)
    hue = torch.where(jit, u(-0.08, 0.08), torch.zeros(b))
    gray_mask = coin(grayscale_p)
    warp_mask = coin(0.5)
    warp_amp = u(0.5, 4.0)
    blur_mask = coin(0.5)
    sigma = u(0.3, 1.8)
    noise_mask = coin(0.35)
    noise_std = u(0.005, 0.04)

    # Colour: every step is affine in RGB, so compose one 3x3 matrix and offset per image.
    eye = torch.eye(3).expand(b, 3, 3)
    w = torch.tensor(_LUMA)
    to_luma = torch.ones(3, 1) * w  # rows = luma weights: L = to_luma @ rgb, replicated on 3 channels
    mean_luma = torch.einsum("c,bchw->b", w, x) / (x.shape[2] * x.shape[3])
    mat = bright.view(b, 1, 1) * eye  # brightness
    off = (1 - contrast) * bright * mean_luma  # contrast around the (brightened) mean luma
    mat = contrast.view(b, 1, 1) * mat
    sat_m = sat.view(b, 1, 1) * eye + (1 - sat).view(b, 1, 1) * to_luma  # saturation
    rgb2yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    c, s = torch.cos(hue), torch.sin(hue)
    rot = torch.zeros(b, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    hue_m = torch.linalg.inv(rgb2yiq) @ rot @ rgb2yiq  # rotate the chroma plane of YIQ
    gray_m = torch.where(gray_mask.view(b, 1, 1), to_luma.expand(b, 3, 3), eye)
    post = gray_m @ hue_m @ sat_m  # all fix luma-weighted grey, so the offset passes through them as grey
    mat = post @ mat
    off3 = post @ (off.view(b, 1, 1) * torch.ones(b, 3, 1))
    x = (torch.bmm(mat, x.reshape(b, 3, -1)) + off3).view_as(x)

    idx = warp_mask.nonzero().flatten()
    if len(idx):
        x = x.index_copy(0, idx, _warp(x[idx], warp_amp[idx], gen))
    idx = blur_mask.nonzero().flatten()
    if len(idx):
        x = x.index_copy(0, idx, _blur(x[idx], sigma[idx]))
    idx = noise_mask.nonzero().flatten()
    if len(idx):
        noise = torch.randn((len(idx), *x.shape[1:]), generator=gen) * noise_std[idx].view(-1, 1, 1, 1)
        x = x.index_add(0, idx, noise)
    return x.clamp(0, 1), gray_mask


# ----------------------------------------------------------------------------------------------- training


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warmup over the first 5 % of steps, then cosine decay to 1 % of ``lr``."""
    warm = max(1, int(0.05 * steps))
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _save_checkpoint(path: Path, model: Judge, opt: torch.optim.Optimizer, step: int, run: dict[str, Any]) -> None:
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "run": json.dumps(run, sort_keys=True)}
    _atomic_write(path, lambda tmp: torch.save(payload, tmp))


def train_judge(
    steps: int = DEFAULT_STEPS,
    batch: int = DEFAULT_BATCH,
    seed: int = 0,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = True,
    extra_images_fn: Callable[[int], tuple[Any, Any]] | None = None,
    *,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    model_config: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> Judge:
    """Train a judge on freshly rendered world batches; deterministic in ``seed`` and resumable.

    Step ``s`` trains on :func:`training_batch` ``(batch, seed, s)`` (plus ``extra_images_fn(s)`` if given),
    augmented by :func:`augment` with a generator seeded by ``(seed, s)``. Loss: the sum of the three heads'
    cross-entropies (label smoothing 0.05); grayscale-augmented images leave the personal head out (an
    instance's identity includes its colours). AdamW with warmup + cosine decay (see :func:`_lr_at`).

    ``extra_images_fn(step) -> (images, labels)``: extra images (anything :meth:`Judge.preprocess` accepts,
    e.g. uint8 ``[m, H, W, 3]``) with int labels ``[m, 3]`` (style, object, personal; ``-100`` leaves a head
    out) mixed into that step's batch; it must be a pure function of ``step`` for resumes to be exact.

    ``checkpoint_path``: model, optimizer and step are saved there (atomically, ``torch.save`` of tensors and
    plain values only, loadable with ``weights_only=True``) every ``checkpoint_every`` steps and at the end.
    With ``resume`` an existing checkpoint of the same run settings is continued from its step (a checkpoint
    of different settings raises ``ValueError``). ``progress(step, steps, info)`` is called after every step
    with ``step`` the number of steps done and ``info`` holding ``loss``, per-head losses, ``lr``,
    ``images_per_s`` and ``elapsed_s``. Returns the judge in eval mode.
    """
    if steps < 0 or batch < 1:
        raise ValueError("steps must be >= 0 and batch >= 1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Judge(**(model_config or {})).to(device)
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999))
    run = {"steps": steps, "batch": batch, "seed": seed, "lr": lr, "weight_decay": weight_decay,
           "model": model.config, "extra_images": extra_images_fn is not None}
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    start = 0
    if ckpt is not None and resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if json.loads(state["run"]) != run:
            raise ValueError(f"checkpoint {ckpt} belongs to another run: {state['run']} != {json.dumps(run, sort_keys=True)}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
    model.train()
    t0 = time.perf_counter()
    for step in range(start, steps):
        images, labels = training_batch(batch, seed, step)
        x = _to_canonical(images)
        y = torch.from_numpy(labels)
        if extra_images_fn is not None:
            ex_images, ex_labels = extra_images_fn(step)
            if _num_images(ex_images):
                x = torch.cat([x, _to_canonical(ex_images)])
                y = torch.cat([y, torch.as_tensor(np.asarray(ex_labels), dtype=torch.long).view(-1, 3)])
        gen = torch.Generator().manual_seed(int(np.random.default_rng([_TRAIN_TAG, seed, step, 2]).integers(2**62)))
        x, gray = augment(x, gen)
        y = y.clone()
        y[gray, 2] = IGNORE
        x, y = x.to(device), y.to(device)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        out = model.logits(x)
        losses = {h: F.cross_entropy(out[h], y[:, i], ignore_index=IGNORE, label_smoothing=0.05) for i, h in enumerate(HEADS)}
        losses = {h: v if torch.isfinite(v) else out[h].sum() * 0 for h, v in losses.items()}  # a head with no labels
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if ckpt is not None and (done % checkpoint_every == 0 or done == steps):
            _save_checkpoint(ckpt, model, opt, done, run)
        if progress is not None:
            elapsed = time.perf_counter() - t0
            info = {"loss": float(loss.detach()), **{f"loss_{h}": float(v.detach()) for h, v in losses.items()},
                    "lr": opt.param_groups[0]["lr"], "elapsed_s": elapsed,
                    "images_per_s": (done - start) * batch / max(elapsed, 1e-9)}
            progress(done, steps, info)
    return model.eval()


# ----------------------------------------------------------------------------------------------- evaluation


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
    gray = _grayscale(_to_canonical(images[smask.numpy()]))
    gpred = judge.classify(gray)["style"].cpu()
    out["judge_grayscale_style_accuracy"] = float((gpred == labels[smask, 0]).float().mean())
    # degraded ("generated-looking") copies of every evaluation image
    dpred: dict[str, list[torch.Tensor]] = {h: [] for h in HEADS}
    for start in range(0, len(images), 512):
        part = degrade(_to_canonical(images[start: start + 512]), seed=start)
        for h, v in judge.classify(part).items():
            dpred[h].append(v.cpu())
    dright = torch.stack([torch.cat(dpred[h]) for h in HEADS], dim=1) == labels
    out["judge_degraded_accuracy"] = float(dright.float().mean())
    return out
