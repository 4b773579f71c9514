"""An immunization run's checkpoints: the changed parameters (safetensors) and the optimiser state of one step,
under ``checkpoints/step-<k>/`` with ``checkpoints/latest`` naming it; only finite weights are ever written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..runs import atomic_write
from .errors import NonFiniteCheckpoint

if TYPE_CHECKING:
    from .runner import Setup



def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold an ``inf`` or ``nan``."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def changed_names(setup: Setup) -> list[str]:
    return sorted(set(setup.upper) | (set(setup.lower) if setup.spec.algorithm == "alternating" else set()))


def checkpoint_step(run_dir: Path) -> int | None:
    """The step that ``checkpoints/latest`` holds (None: no checkpoint)."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    return int(latest.read_text().strip().split("-")[1]) if latest.exists() else None


def save_checkpoint(run_dir: Path, setup: Setup, opt, step: int) -> Path:
    """Write ``checkpoints/step-<k>/`` (changed parameters as safetensors + optimiser state), then point
    ``checkpoints/latest`` at it atomically and drop older ones. Only finite tensors are written: otherwise
    :class:`NonFiniteCheckpoint` is raised and the checkpoints on disk are left as they were."""
    from safetensors.torch import save_file

    params = dict(setup.pipe.unet.named_parameters())
    weights = {k: params[k].detach().contiguous().cpu() for k in changed_names(setup)}
    state = opt.state_dict()
    moments = {f"{i}.{k}": v for i, per in state["state"].items() for k, v in per.items() if torch.is_tensor(v)}
    bad = non_finite(weights) + non_finite(moments)
    if bad:
        raise NonFiniteCheckpoint(f"the weights after step {step} are not finite ({len(non_finite(weights))} of "
                                  f"{len(weights)} tensors, {len(non_finite(moments))} optimiser tensors), so they "
                                  "were not saved")
    ck = run_dir / "checkpoints"
    folder = ck / f"step-{step:07d}"
    tmp = ck / f".tmp-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, tmp / "unet_changed.safetensors", metadata={"step": str(step)})
    torch.save(state, tmp / "optimizer.pt")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    atomic_write(ck / "latest", folder.name)
    for old in ck.glob("step-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(run_dir: Path, setup: Setup, opt) -> int:
    """Restore the latest checkpoint; returns its step (0 if none)."""
    from safetensors.torch import load_file

    ck = run_dir / "checkpoints"
    if not (ck / "latest").exists():
        return 0
    folder = ck / (ck / "latest").read_text().strip()
    tensors = load_file(folder / "unet_changed.safetensors")
    params = dict(setup.pipe.unet.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))
    opt.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    return int(folder.name.split("-")[1])
