"""DINO image similarity: cosine of the CLS feature of a DINO ViT (default ``facebook/dino-vits16``, transformers).

The feature is the CLS token of the last hidden state (after the final layer norm), as in DINO's own k-NN
evaluation. Preprocessing is DINO's evaluation transform: bicubic resize of the shorter side to 256 (for 224 px
models; ``S * 256 / 224`` in general), centre crop ``S``, ImageNet mean/std. The hub's ``preprocessor_config.json``
of ``facebook/dino-vits16`` says mean = std = 0.5 and a plain 224x224 resize, which is not how DINO was trained,
so it is not used.

Where the weights come from, in order: ``weights`` (``eval.dino_weights``: a local folder with ``config.json`` and
``model.safetensors`` or ``pytorch_model.bin``); the Hugging Face cache; else a download through transformers,
unless offline (``HF_HUB_OFFLINE=1``). When none works, :class:`~engine.metrics.base.MetricWeightsMissing` says
so in one line.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import (CosineFeatures, FeatureCache, Images, MetricWeightsMissing, chunks, first_line, hf_cache_dir,
                   offline, to_pil)

DEFAULT_MODEL = "facebook/dino-vits16"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Architectures of the released DINO ViTs (their config.json), so that random_init works without a download.
_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)
_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
KNOWN_CONFIGS = {
    "facebook/dino-vits16": dict(_SMALL, patch_size=16),
    "facebook/dino-vits8": dict(_SMALL, patch_size=8),
    "facebook/dino-vitb16": dict(_BASE, patch_size=16),
    "facebook/dino-vitb8": dict(_BASE, patch_size=8),
}


def dino_transform(image_size: int = 224):
    """DINO's evaluation transform for PIL images: resize shorter side, centre crop, ImageNet normalisation."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(int(round(image_size * 256 / 224)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class DinoBackend(CosineFeatures):
    """Cosine similarity of L2-normalised DINO CLS features (:class:`~engine.metrics.base.CosineFeatures`).
    ``model``: a transformers ``ViTModel``."""

    name = "dino"
    kind = "similarity"

    def __init__(self, model: torch.nn.Module, *, label: str = "", random_init: bool = False,
                 device: str | torch.device = "cpu", batch: int = 32):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.label = label or "dino"
        self.random_init = bool(random_init)
        self.batch = int(batch)
        size = model.config.image_size
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.transform = dino_transform(self.image_size)
        self.cache = FeatureCache()

    def preprocess(self, images: Images) -> torch.Tensor:
        """The model input: float32 ``[n, 3, S, S]``, ImageNet-normalised."""
        pil = to_pil(images)
        if not pil:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        return torch.stack([self.transform(im) for im in pil])

    def _compute(self, images: Images) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for part in chunks(to_pil(images), self.batch):
                x = torch.stack([self.transform(im) for im in part]).to(self.device)
                cls = self.model(pixel_values=x).last_hidden_state[:, 0]
                out.append(F.normalize(cls.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


# ----------------------------------------------------------------------------------------------- loading


def _how(model: str) -> str:
    name = model.rsplit("/", 1)[-1]
    return (f"provide a local copy with --set eval.dino_weights=/path/to/{name} (a folder with config.json and "
            f"model.safetensors or pytorch_model.bin) or pre-populate the Hugging Face cache on a connected machine "
            f"(hf download {model})")


def _config(model: str, cache_dir: str | os.PathLike | None):
    from transformers import AutoConfig, ViTConfig

    try:
        return AutoConfig.from_pretrained(model, local_files_only=True, cache_dir=cache_dir)
    except OSError:
        if model in KNOWN_CONFIGS:
            return ViTConfig(image_size=224, **KNOWN_CONFIGS[model])
        raise ValueError(f"no architecture known for '{model}' offline; random_init knows {', '.join(KNOWN_CONFIGS)}")


def load_vit(model: str = DEFAULT_MODEL, weights: str | None = None, *,
             cache_dir: str | os.PathLike | None = None) -> torch.nn.Module:
    """The pretrained ``ViTModel`` (no pooler) from ``weights``, the cache, or a download; else MetricWeightsMissing."""
    from transformers import ViTModel

    what = f"DINO weights {model}"
    kwargs = dict(add_pooling_layer=False, cache_dir=cache_dir)
    if weights:
        if not Path(weights).is_dir():
            raise MetricWeightsMissing(f"{what} not found: eval.dino_weights={weights} is not a folder; {_how(model)}")
        try:
            return ViTModel.from_pretrained(weights, local_files_only=True, **kwargs)
        except OSError as e:
            raise MetricWeightsMissing(f"{what} not found: eval.dino_weights={weights} holds no ViT model "
                                       f"({first_line(e, 100)}); {_how(model)}") from e
    try:
        return ViTModel.from_pretrained(model, local_files_only=True, **kwargs)
    except OSError as e:
        cached = e
    if Path(model).is_dir():
        raise MetricWeightsMissing(f"{what} not found: {model} holds no ViT model ({first_line(cached, 100)}); "
                                   f"{_how(model)}") from cached
    where = f"{model} in the Hugging Face cache {hf_cache_dir(cache_dir)}"
    if offline():
        raise MetricWeightsMissing(f"{what} not found offline (HF_HUB_OFFLINE=1): looked for {where}; "
                                   f"{_how(model)}") from cached
    try:
        return ViTModel.from_pretrained(model, **kwargs)
    except OSError as e:
        raise MetricWeightsMissing(f"{what} not found: looked for {where}, and the download failed "
                                   f"({first_line(e, 100)}); {_how(model)}") from e


def load_dino(model: str = DEFAULT_MODEL, weights: str | None = None, *, device: str | torch.device = "cpu",
              random_init: bool = False, cache_dir: str | os.PathLike | None = None, batch: int = 32) -> DinoBackend:
    """A :class:`DinoBackend` for ``model`` (hub id or folder) or the folder ``weights``.

    ``random_init``: the same architecture (from a cached config, or the known DINO configs) without weights.
    """
    from transformers import ViTModel

    if random_init:
        vit = ViTModel(_config(weights or model, cache_dir), add_pooling_layer=False)
    else:
        vit = load_vit(model, weights, cache_dir=cache_dir)
    label = f"dino {model}" + (" (random init)" if random_init else "")
    return DinoBackend(vit, label=label, random_init=random_init, device=device, batch=batch)
