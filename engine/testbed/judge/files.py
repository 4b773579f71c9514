"""The judge's file: safetensors with fp16 storage and the model config as JSON metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from engine.runs.files import atomic_write

from .model import Judge

__all__ = ["save_judge", "load_judge_file"]

_FORMAT = "mima-testbed-judge"
_FORMAT_VERSION = "1"


def save_judge(judge: Judge, path: str | os.PathLike) -> None:
    """Save as safetensors with fp16 storage; the model config travels as JSON in the metadata."""
    from safetensors.torch import save_file

    tensors = {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).contiguous()
               for k, v in judge.state_dict().items()}
    meta = {"format": _FORMAT, "version": _FORMAT_VERSION, "config": json.dumps(judge.config, sort_keys=True)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


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
