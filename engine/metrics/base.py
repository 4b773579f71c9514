"""What every similarity backend shares: image inputs, a feature cache, the missing-weights error, offline mode.

Image sets are what :func:`engine.sampling.generate` returns, a uint8 array ``[n, H, W, 3]``; also accepted: one
``[H, W, 3]`` image, a list of PIL images or of uint8 ``[H, W, 3]`` arrays (sizes may differ), and a tensor
``[n, 3, H, W]`` (uint8, or float in ``[0, 1]``, quantised to uint8 so that every input takes the same path).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

Images = Any  # np.ndarray [n, H, W, 3] uint8 | list of PIL images / uint8 arrays | torch.Tensor [n, 3, H, W]

DEFAULT_CACHE_BYTES = 512 * 2**20


class MetricWeightsMissing(FileNotFoundError):
    """Pretrained weights of a metric backbone are not available (offline, not cached, bad path).

    ``str(error)`` is one line: which weights, where they were looked for, and how to provide them.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


def offline() -> bool:
    """True when Hugging Face offline mode is on (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``).

    Read at call time (``huggingface_hub`` reads it once, at import). mima also honours it for the torchvision
    download of the LPIPS trunk: offline, nothing is downloaded and missing weights fail at once.
    """
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def hf_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """The Hugging Face hub cache that is searched (``cache_dir`` or ``HF_HUB_CACHE``)."""
    from huggingface_hub import constants

    return str(cache_dir) if cache_dir else str(constants.HF_HUB_CACHE)


def first_line(error: BaseException, limit: int = 160) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------------------------------- images


def to_uint8_list(images: Images) -> list[np.ndarray]:
    """Every image of a set as a uint8 ``[H, W, 3]`` array (a view where possible)."""
    if isinstance(images, torch.Tensor):
        x = images.detach().cpu()
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a tensor [n, 3, H, W], got shape {tuple(images.shape)}")
        if x.dtype != torch.uint8:
            if not x.is_floating_point():
                raise TypeError(f"expected a uint8 tensor or a float tensor in [0, 1], got {x.dtype}")
            x = (x.float().clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        return list(x.permute(0, 2, 3, 1).contiguous().numpy())
    if isinstance(images, np.ndarray):
        a = images[None] if images.ndim == 3 else images
        if a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"expected a uint8 array [n, H, W, 3], got shape {images.shape}")
        if a.dtype != np.uint8:
            raise TypeError(f"expected a uint8 array, got {a.dtype}")
        return list(a)
    if isinstance(images, (list, tuple)):
        out = []
        for im in images:
            if isinstance(im, Image.Image):
                out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            elif isinstance(im, np.ndarray) and im.ndim == 3 and im.shape[-1] == 3 and im.dtype == np.uint8:
                out.append(im)
            else:
                raise TypeError(f"expected PIL images or uint8 [H, W, 3] arrays in the list, got {type(im).__name__}")
        return out
    raise TypeError(f"unsupported image input: {type(images).__name__}")


def to_pil(images: Images) -> list[Image.Image]:
    return [Image.fromarray(np.ascontiguousarray(a)) for a in to_uint8_list(images)]


def num_images(images: Images) -> int:
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return 1 if images.ndim == 3 else int(images.shape[0])
    return len(images)


def fingerprint(images: Images) -> bytes:
    """A digest of the pixels (and shapes) of an image set: equal sets share cached features."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(images, torch.Tensor) and images.dtype != torch.uint8:  # floats: exact values, not quantised
        x = images.detach().cpu().contiguous()
        h.update(f"{x.dtype}{tuple(x.shape)}".encode())
        h.update(x.view(torch.uint8).numpy().data if x.numel() else b"")
        return h.digest()
    for a in to_uint8_list(images):
        h.update(repr(a.shape).encode())
        h.update(np.ascontiguousarray(a).data)
    return h.digest()


def chunks(images: Images, size: int):
    """Slices of at most ``size`` images of a set (one image ``[H, W, 3]`` / ``[3, H, W]`` is one slice)."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3:
        yield images
        return
    for i in range(0, num_images(images), size):
        yield images[i : i + size]


class FeatureCache:
    """A least-recently-used cache of per-set results keyed by the set's pixels, bounded in bytes."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[bytes, Any] = OrderedDict()
        self._sizes: dict[bytes, int] = {}
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, images: Images, compute: Callable[[Images], Any]) -> Any:
        key = fingerprint(images)
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        value = compute(images)
        size = _nbytes(value)
        if size <= self.max_bytes:
            self._items[key] = value
            self._sizes[key] = size
            while self.nbytes > self.max_bytes:
                old, _ = self._items.popitem(last=False)
                del self._sizes[old]
        return value

    def clear(self) -> None:
        self._items.clear()
        self._sizes.clear()


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def check_not_empty(images: Images, what: str = "image set") -> None:
    if num_images(images) == 0:
        raise ValueError(f"the similarity of an empty {what} is undefined")


class CosineFeatures:
    """What the cosine-feature backends (clip, dino, judge) share: cached features and their cosine similarity.

    A backend sets ``self.cache`` (a :class:`FeatureCache`) and provides ``_compute(images)``: the L2-normalised
    features ``[n, D]`` of an image set (float32, on the CPU).
    """

    cache: FeatureCache

    def _compute(self, images: Images) -> torch.Tensor:
        raise NotImplementedError

    def features(self, images: Images) -> torch.Tensor:
        """L2-normalised features ``[n, D]`` (float32, on the CPU; cached by the images' pixels)."""
        return self.cache.get(images, self._compute)

    def pair_matrix(self, a: Images, b: Images) -> torch.Tensor:
        """Cosine similarity of every pair, ``[len(a), len(b)]``."""
        return self.features(a) @ self.features(b).T

    def mean_similarity(self, a: Images, b: Images) -> float:
        """``M(a, b)``: the mean of :meth:`pair_matrix` over all pairs."""
        check_not_empty(a)
        check_not_empty(b)
        return float(self.pair_matrix(a, b).double().mean())
