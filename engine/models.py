"""Load pipelines (the testbed, a local diffusers folder, a hub id, a run's output), save models, and name
the parameter subsets that immunization and attacks touch.

A model reference is one of:

- ``"testbed"`` — the shipped testbed pipeline;
- a local diffusers pipeline folder (``model_index.json``);
- a run directory, or its ``model/`` folder — a model that mima wrote (see :func:`save_model`);
- a Hugging Face hub id, taken from the local cache only (``local_files_only``): nothing is downloaded here.

An immunized/erased model is saved as ``<run>/model/``: a full pipeline folder for small models (the
testbed), or ``model/unet`` (+ ``model/text_encoder`` if it changed) beside ``model/mima_model.json`` naming the
base it completes. Either way one line of diffusers opens it (see :func:`load_pipeline`'s docstring).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import UsageError

MODEL_JSON = "mima_model.json"
SUBSETS = ("unet", "xattn", "xattn-kv")


class ModelNotAvailable(FileNotFoundError, UsageError):
    """A model reference that cannot be opened here (one-line message says what and how to fix it)."""


class DeviceError(ValueError, UsageError):
    """A device name torch does not know, or one this machine does not have."""


def pick_device(spec: str = "auto") -> torch.device:
    """The torch device ``spec`` names (``auto``: CUDA if there is one); ``ValueError`` with a one-line message for a
    name torch does not know or a CUDA device this machine does not have."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"device {spec!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r}: no CUDA device is available here")
    return dev


def pick_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def resolve_model(ref: str | Path) -> Path:
    """The local folder holding the pipeline (or the mima model folder) that ``ref`` names."""
    from .testbed import PIPELINE_DIR, TESTBED, TestbedMissing

    if str(ref) == TESTBED:
        if not (PIPELINE_DIR / "model_index.json").exists():
            raise TestbedMissing(f"testbed weights not found at {PIPELINE_DIR}; run `mima testbed build --install`")
        return PIPELINE_DIR
    path = Path(ref)
    if path.exists():
        if (path / "model" / "model_index.json").exists() or (path / "model" / MODEL_JSON).exists():
            return path / "model"
        if (path / "model_index.json").exists() or (path / MODEL_JSON).exists():
            return path
        raise ModelNotAvailable(f"{path}: not a diffusers pipeline folder (no model_index.json) nor a mima model")
    if str(ref).count("/") == 1 and not str(ref).startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(str(ref), local_files_only=True))
        except Exception:
            raise ModelNotAvailable(
                f"{ref}: not in the local Hugging Face cache and downloads are off; fetch it once with "
                f"`hf download {ref}` on a machine with network, or pass a local folder"
            ) from None
    raise ModelNotAvailable(f"{ref}: no such folder, and not a hub id of the form owner/name")


def load_pipeline(ref: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Open ``ref`` as a ``StableDiffusionPipeline`` (no safety checker, progress bars off).

    A mima model folder that holds only the changed parts opens in one line of diffusers::

        StableDiffusionPipeline.from_pretrained(base, unet=UNet2DConditionModel.from_pretrained("runs/ID/model/unet"))

    (``base`` is named in ``runs/ID/model/mima_model.json``); a full folder opens with ``from_pretrained(folder)``.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    folder = resolve_model(ref)
    parts = {}
    if (folder / MODEL_JSON).exists() and not (folder / "model_index.json").exists():
        meta = json.loads((folder / MODEL_JSON).read_text())
        parts["unet"] = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=dtype)
        if (folder / "text_encoder").exists():
            from transformers import CLIPTextModel

            parts["text_encoder"] = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype)
        folder = resolve_model(meta["base"])
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        local_files_only=True, **parts,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def save_model(pipe, folder: str | Path, base: str, full: bool | None = None, text_encoder_changed: bool = False) -> Path:
    """Save ``pipe`` as a mima model folder. ``full`` (default: when the UNet is under 100 M parameters) writes the
    whole pipeline; otherwise only the UNet (and the text encoder if it changed) plus ``mima_model.json``."""
    folder = Path(folder)
    n = sum(p.numel() for p in pipe.unet.parameters())
    full = n < 100_000_000 if full is None else full
    folder.mkdir(parents=True, exist_ok=True)
    if full:
        pipe.save_pretrained(folder, safe_serialization=True)
    else:
        pipe.unet.save_pretrained(folder / "unet", safe_serialization=True)
        if text_encoder_changed:
            pipe.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    (folder / MODEL_JSON).write_text(json.dumps({"base": str(base), "full": full}, indent=1))
    return folder


def tensors_hash(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_hash(pipe) -> str:
    """A short content hash of the UNet and text encoder weights (caches key on it)."""
    return tensors_hash([*(("unet." + k, v) for k, v in sorted(pipe.unet.state_dict().items())),
                         *(("text." + k, v) for k, v in sorted(pipe.text_encoder.state_dict().items()))])


def is_xattn(name: str) -> bool:
    return ".attn2." in f".{name}"


def is_xattn_kv(name: str) -> bool:
    return is_xattn(name) and (".to_k." in name or ".to_v." in name)


def param_names(unet, subset: str) -> list[str]:
    """Names of the UNet parameters in ``subset``: ``unet`` (all), ``xattn`` (every ``attn2`` parameter) or
    ``xattn-kv`` (``attn2.to_k``/``attn2.to_v`` weights)."""
    names = [n for n, _ in unet.named_parameters()]
    if subset == "unet":
        return names
    if subset == "xattn":
        return [n for n in names if is_xattn(n)]
    if subset == "xattn-kv":
        return [n for n in names if is_xattn_kv(n)]
    raise ValueError(f"unknown parameter subset {subset!r}; expected one of {', '.join(SUBSETS)}")


def kv_layer_names(unet) -> list[str]:
    """Cross-attention key/value projection weights (``...attn2.to_k.weight``, ``...attn2.to_v.weight``)."""
    return [n for n in param_names(unet, "xattn-kv") if n.endswith(".weight")]
