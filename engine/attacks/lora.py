"""``lora``: text-to-image LoRA on the UNet's attention projections (peft), the paper's re-learning attack.

Output: ``pytorch_lora_weights.safetensors`` written by ``StableDiffusionPipeline.save_lora_weights`` *with* the
adapter's metadata (rank, alpha, target modules), so that::

    pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors")

restores the same ``alpha / rank`` scale (without the metadata diffusers would assume alpha = rank).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .common import AttackJob, Trainable, register

TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
"""The attention projections of every attention layer (self and cross), as in diffusers' LoRA examples."""
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(pipe, rank: int, alpha: float) -> Trainable:
    """Freeze the UNet and attach a fresh LoRA adapter (gaussian A, zero B); its parameters train in float32."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet = pipe.unet
    unet.requires_grad_(False)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), init_lora_weights="gaussian",
                        target_modules=TARGET_MODULES)
    unet.add_adapter(config)
    cast_training_params(unet, dtype=torch.float32)
    return Trainable(params=[p for p in unet.parameters() if p.requires_grad])


def save_lora(pipe, folder: Path) -> Path:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = pipe.unet
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers, unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        weight_name=WEIGHT_NAME, safe_serialization=True,
    )
    return folder / WEIGHT_NAME


def load_lora(pipe, folder: Path) -> None:
    pipe.load_lora_weights(folder, weight_name=WEIGHT_NAME)


class LoRAAdapter:
    """``setup``/``save``/``load`` of the attacks that train a fresh LoRA adapter (``job.settings.rank``/``alpha``)
    on the UNet's attention projections: ``lora`` and ``dreambooth-lora``."""

    def setup(self, pipe, job: AttackJob) -> Trainable:
        return add_lora(pipe, job.settings.rank, job.settings.alpha)

    def save(self, pipe, job: AttackJob, folder: Path) -> None:
        save_lora(pipe, folder)

    def load(self, pipe, folder: Path) -> None:
        load_lora(pipe, folder)


@register("lora")
class LoRA(LoRAAdapter):
    adds_token = False
    # paper (re-learning): rank 4, lr 1e-4, 400 steps, batch 4; diffusers train_text_to_image_lora: rank 4, lr 1e-4
    defaults = dict(steps=400, lr=1e-4, batch=4, rank=4, alpha=4.0, prior_preservation=False)
    testbed_defaults = dict(steps=80, lr=1e-3, batch=4, rank=4, alpha=4.0, prior_preservation=False)
