"""``dreambooth``: full-UNet fine-tuning on the concept images with an instance prompt (the attacker's token),
optionally with prior preservation on class images.

Output: the UNet as a diffusers model folder ``unet/`` (safetensors), plus ``mima_model.json`` naming the base
when the job knows it (then ``engine.models.load_pipeline(folder)`` opens the attacked pipeline). diffusers::

    pipe.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
"""

from __future__ import annotations

from pathlib import Path

import torch

from .common import AttackJob, Trainable, register


@register("dreambooth")
class DreamBooth:
    adds_token = False
    # diffusers examples/dreambooth/train_dreambooth.py (README): lr 5e-6, 400 steps, batch 1, prior weight 1
    defaults = dict(steps=400, lr=5e-6, batch=1, rank=4, alpha=4.0, prior_preservation=True)
    testbed_defaults = dict(steps=40, lr=1e-4, batch=1, rank=4, alpha=4.0, prior_preservation=True)

    def setup(self, pipe, job: AttackJob) -> Trainable:
        unet = pipe.unet
        unet.requires_grad_(True)
        if unet.dtype != torch.float32:  # mixed precision: the weights that train are float32
            unet.to(torch.float32)
        return Trainable(params=list(unet.parameters()))

    def save(self, pipe, job: AttackJob, folder: Path) -> None:
        from engine.models import save_model

        if job.base:
            save_model(pipe, folder, base=job.base, full=False)
        else:
            pipe.unet.save_pretrained(folder / "unet", safe_serialization=True)

    def load(self, pipe, folder: Path) -> None:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        pipe.register_modules(unet=unet.to(pipe.unet.device, pipe.unet.dtype))
