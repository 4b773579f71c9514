"""``dreambooth-lora``: DreamBooth (instance prompt with the attacker's token, optional prior preservation) training
a LoRA adapter on the UNet's attention projections instead of the full weights.

Output: ``pytorch_lora_weights.safetensors`` with the adapter metadata, as for :mod:`engine.attacks.lora`::

    pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors")
"""

from __future__ import annotations

from pathlib import Path

from .common import AttackJob, Trainable, register
from .lora import add_lora, load_lora, save_lora


@register("dreambooth-lora")
class DreamBoothLoRA:
    adds_token = False
    # diffusers examples/dreambooth/train_dreambooth_lora.py (README): rank 4, lr 1e-4, 500 steps, batch 1
    defaults = dict(steps=500, lr=1e-4, batch=1, rank=4, alpha=4.0, prior_preservation=True)
    testbed_defaults = dict(steps=40, lr=1e-3, batch=1, rank=4, alpha=4.0, prior_preservation=True)

    def setup(self, pipe, job: AttackJob) -> Trainable:
        return add_lora(pipe, job.settings.rank, job.settings.alpha)

    def save(self, pipe, job: AttackJob, folder: Path) -> None:
        save_lora(pipe, folder)

    def load(self, pipe, folder: Path) -> None:
        load_lora(pipe, folder)
