"""CLIP image similarity: cosine of open_clip image features (default ViT-B-32 with the OpenAI weights, as IMMA).

Preprocessing is open_clip's own evaluation transform for the model and weights (ViT-B-32/openai: bicubic resize of
the shorter side to 224, centre crop 224, OpenAI mean/std), applied to PIL images.

Where the weights come from, in order: ``weights`` (``eval.clip_weights``: a local open_clip checkpoint of the
``pretrained`` tag, e.g. ``open_clip_pytorch_model.bin`` or ``open_clip_model.safetensors``); the Hugging Face
cache (the tag's hub repo, e.g. ``timm/vit_base_patch32_clip_224.openai``) or open_clip's URL cache
(``~/.cache/clip``); else a download through open_clip, unless offline (``HF_HUB_OFFLINE=1``). When none works,
:class:`~engine.metrics.base.MetricWeightsMissing` says so in one line.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch

from .base import (CosineFeatures, FeatureCache, Images, MetricWeightsMissing, check_not_empty, chunks, first_line,
                   hf_cache_dir, offline, to_pil)

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


class ClipBackend(CosineFeatures):
    """Cosine similarity of L2-normalised open_clip image features (``features``, ``pair_matrix``,
    ``mean_similarity``: :class:`~engine.metrics.base.CosineFeatures`).

    ``model``: an open_clip model whose ``visual.preprocess_cfg`` describes its input (set by
    ``open_clip.create_model``). ``random_init`` marks a backbone without pretrained weights (tests only): its
    numbers mean nothing and reports refuse them.
    """

    name = "clip"
    kind = "similarity"

    def __init__(self, model: torch.nn.Module, *, label: str = "", random_init: bool = False,
                 device: str | torch.device = "cpu", batch: int = 32, tokenizer=None):
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.label = label or "clip"
        self.random_init = bool(random_init)
        self.batch = int(batch)
        self.preprocess_cfg = dict(model.visual.preprocess_cfg)
        self.transform = image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)
        self.cache = FeatureCache()
        self.tokenizer = tokenizer

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.preprocess_cfg["size"]
        return (size, size) if isinstance(size, int) else tuple(size)

    def preprocess(self, images: Images) -> torch.Tensor:
        """The model input: float32 ``[n, 3, S, S]`` (S = the model's image size), normalised with its mean/std."""
        pil = to_pil(images)
        if not pil:
            return torch.zeros(0, 3, *self.image_size)
        return torch.stack([self.transform(im) for im in pil])

    def _compute(self, images: Images) -> torch.Tensor:
        pil = to_pil(images)
        out = []
        with torch.no_grad():
            for part in chunks(pil, self.batch):
                x = torch.stack([self.transform(im) for im in part]).to(self.device)
                out.append(self.model.encode_image(x, normalize=True).float().cpu())
        dim = int(getattr(self.model.visual, "output_dim", 0) or 0)
        return torch.cat(out) if out else torch.zeros(0, dim)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text features ``[len(prompts), D]`` (float32, on the CPU)."""
        if self.tokenizer is None:
            raise ValueError("this CLIP backend has no tokenizer (build it with load_clip)")
        with torch.no_grad():
            tokens = self.tokenizer(list(prompts)).to(self.device)
            return self.model.encode_text(tokens, normalize=True).float().cpu()

    def clip_score(self, images: Images, prompt: str) -> float:
        """CLIP score: the mean cosine of ``prompt``'s text features with each image's features."""
        check_not_empty(images)
        return float((self.features(images) @ self.text_features([prompt])[0]).double().mean())


# ----------------------------------------------------------------------------------------------- loading


def _how(repo: str | None, filename: str | None) -> str:
    fix = f"provide them with --set eval.clip_weights=/path/to/{filename or 'open_clip_pytorch_model.bin'}"
    if repo:
        fix += f" or pre-populate the Hugging Face cache on a connected machine (hf download {repo} {filename})"
    return fix


def cached_checkpoint(cfg: dict, cache_dir: str | os.PathLike | None = None) -> tuple[str | None, str | None, str, str]:
    """``(local file or None, hub repo or None, file name, where it was looked for)`` of the weights of an open_clip
    pretrained config (``open_clip.get_pretrained_cfg``); never downloads. A hub repo's safetensors file comes first."""
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])  # "org/name/" -> the default file name, as open_clip does
        filename = filename or "open_clip_pytorch_model.bin"
        names = (["open_clip_model.safetensors"] if filename == "open_clip_pytorch_model.bin" else
                 [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else []) + [filename]
        for name in names:
            hit = try_to_load_from_cache(repo, name, cache_dir=hf_cache_dir(cache_dir))
            if isinstance(hit, str):
                return hit, repo, name, ""
        return None, repo, names[0], f"{repo} ({', '.join(names)}) in the Hugging Face cache {hf_cache_dir(cache_dir)}"
    filename = os.path.basename(cfg.get("url", ""))
    path = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / filename
    return (str(path) if path.is_file() else None), None, filename, str(path)


def resolve_checkpoint(model: str = DEFAULT_MODEL, pretrained: str = DEFAULT_PRETRAINED, weights: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> tuple[str, dict]:
    """The local checkpoint file of ``model``/``pretrained`` and the tag's open_clip config; downloads if allowed.

    Raises :class:`MetricWeightsMissing` (one line) when the weights cannot be had, ``ValueError`` for an unknown
    model or tag.
    """
    import open_clip
    from open_clip.pretrained import download_pretrained

    if open_clip.get_model_config(model) is None:
        close = difflib.get_close_matches(model, open_clip.list_models(), n=1)
        raise ValueError(f"unknown open_clip model '{model}'" + (f"; did you mean '{close[0]}'?" if close else ""))
    cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
    what = f"CLIP weights {model}/{pretrained}"
    if weights:
        if not Path(weights).is_file():
            raise MetricWeightsMissing(f"{what} not found: eval.clip_weights={weights} is not a file; "
                                       f"{_how(None, None)}")
        return str(weights), cfg
    if not cfg:
        if Path(pretrained).is_file():
            return pretrained, cfg
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise ValueError(f"unknown open_clip weights '{pretrained}' for {model}; known: {', '.join(tags) or 'none'}")
    hit, repo, filename, where = cached_checkpoint(cfg, cache_dir)
    if hit:
        return hit, cfg
    if offline():
        raise MetricWeightsMissing(f"{what} not found offline (HF_HUB_OFFLINE=1): looked for {where}; "
                                   f"{_how(repo, filename)}")
    try:
        return download_pretrained(cfg, cache_dir=str(cache_dir) if cache_dir else None), cfg
    except Exception as e:  # any download failure: no network, missing file on the hub, ...
        raise MetricWeightsMissing(f"{what} not found: looked for {where}, and the download failed "
                                   f"({first_line(e, 100)}); {_how(repo, filename)}") from e


def load_clip(model: str = DEFAULT_MODEL, pretrained: str = DEFAULT_PRETRAINED, weights: str | None = None, *,
              device: str | torch.device = "cpu", random_init: bool = False,
              cache_dir: str | os.PathLike | None = None, batch: int = 32) -> ClipBackend:
    """A :class:`ClipBackend` for open_clip ``model`` with the ``pretrained`` tag's weights (or ``weights``).

    ``random_init``: the same architecture and preprocessing, no weights loaded (tests only).
    """
    import open_clip

    if random_init:
        if open_clip.get_model_config(model) is None:
            raise ValueError(f"unknown open_clip model '{model}'")
        cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
        checkpoint = None
    else:
        checkpoint, cfg = resolve_checkpoint(model, pretrained, weights, cache_dir)
    clip = open_clip.create_model(
        model, pretrained=checkpoint, device="cpu", force_quick_gelu=bool(cfg.get("quick_gelu", False)),
        force_preprocess_cfg={k: cfg[k] for k in _PREPROCESS_KEYS if k in cfg},
    )
    label = f"clip {model}/{pretrained}" + (" (random init)" if random_init else "")
    return ClipBackend(clip, label=label, random_init=random_init, device=device, batch=batch,
                       tokenizer=open_clip.get_tokenizer(model))
