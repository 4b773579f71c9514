"""``dreambooth-lora``: DreamBooth (instance prompt with the attacker's token, optional prior preservation) training
a LoRA adapter on the UNet's attention projections instead of the full weights.

Output: ``pytorch_lora_weights.safetensors`` with the adapter metadata, as for :mod:`engine.attacks.lora`::

    pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors")
"""

from __future__ import annotations

from .common import register
from .lora import LoRAAdapter


@register("dreambooth-lora")
class DreamBoothLoRA(LoRAAdapter):
    adds_token = False
    # diffusers examples/dreambooth/train_dreambooth_lora.py (README): rank 4, lr 1e-4, 500 steps, batch 1
    defaults = dict(steps=500, lr=1e-4, batch=1, rank=4, alpha=4.0, prior_preservation=True)
    testbed_defaults = dict(steps=40, lr=1e-3, batch=1, rank=4, alpha=4.0, prior_preservation=True)
