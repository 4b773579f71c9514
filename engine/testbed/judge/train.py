"""Train a judge on freshly rendered world batches (:func:`train_judge`): deterministic in its seed, resumable."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.metrics.base import num_images
from engine.runs.files import atomic_write

from .augment import augment
from .batches import _TRAIN_TAG, training_batch
from .model import HEADS, IGNORE, Judge, to_canonical

__all__ = ["DEFAULT_STEPS", "DEFAULT_BATCH", "DEFAULT_LR", "DEFAULT_WEIGHT_DECAY", "DEFAULT_CHECKPOINT_EVERY",
           "train_judge"]

# Default training settings (see train_judge): 900 steps x 64 images, about 5 minutes on one CPU thread.
DEFAULT_STEPS = 900
DEFAULT_BATCH = 64
DEFAULT_LR = 3e-3
DEFAULT_WEIGHT_DECAY = 0.05
DEFAULT_CHECKPOINT_EVERY = 100


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
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


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
        x = to_canonical(images)
        y = torch.from_numpy(labels)
        if extra_images_fn is not None:
            ex_images, ex_labels = extra_images_fn(step)
            if num_images(ex_images):
                x = torch.cat([x, to_canonical(ex_images)])
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
