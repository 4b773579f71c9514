"""``custom-diffusion``: fine-tune the cross-attention key/value projections plus a new modifier token (the
attacker's), as diffusers' ``examples/custom_diffusion/train_custom_diffusion.py`` (``freeze_model=crossattn_kv``).

Training swaps every cross-attention processor for a ``CustomDiffusionAttnProcessor2_0`` whose
``to_k_custom_diffusion``/``to_v_custom_diffusion`` start as copies of the layer's ``to_k``/``to_v`` (the key/value of
the BOS token stay detached, as in diffusers); self-attention keeps its processor. The token is initialised from the
class word's embedding and trains with the same learning rate.

Output, in the example's format:

- ``pytorch_custom_diffusion_weights.safetensors`` — ``<layer>.processor.to_{k,v}_custom_diffusion.weight``, what
  ``unet.save_attn_procs`` writes;
- ``learned_embeds.safetensors`` — ``{token: [1, c]}``, read by ``pipe.load_textual_inversion(folder)``;
- ``README.md`` — how to load the two into a plain diffusers pipeline (:func:`load_custom_diffusion`), with the
  prompt, seed and sampler of mima's last evaluation image.

diffusers documents ``pipe.unet.load_attn_procs(folder, weight_name="pytorch_custom_diffusion_weights.safetensors")``
for the first file, but in diffusers 0.42 that call silently leaves the UNet unchanged (it installs the processors
only when the private ``_pipeline`` argument is given; huggingface/diffusers#9320), and with ``_pipeline`` it rejects a
safetensors file because the self-attention entries are dropped on saving. :func:`load_custom_diffusion` therefore
builds the same ``CustomDiffusionAttnProcessor2_0`` layers from the file and installs them with the public
``unet.set_attn_processor``; self-attention keeps its (fast) processor.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from .common import AttackJob, Trainable, learn_new_token, register, save_token_embedding
from .textual_inversion import load_token_embedding

WEIGHT_NAME = "pytorch_custom_diffusion_weights.safetensors"

README = """# Custom Diffusion weights (written by mima)

`{weights}` holds the fine-tuned key/value projections of every cross-attention layer,
`learned_embeds.safetensors` the modifier token `{token}`. diffusers 0.42's
`pipe.unet.load_attn_procs(folder, weight_name=...)` accepts this file but leaves the UNet unchanged (with
`_pipeline=` it refuses it), so load it with mima's loader, `engine.attacks.custom_diffusion.load_custom_diffusion`
(importable without the CLI):

```python
import torch
from engine.attacks.custom_diffusion import load_custom_diffusion
{load_lines}
load_custom_diffusion(pipe, {folder!r})
image = pipe({prompt!r}, num_inference_steps={steps}, guidance_scale={guidance},
             generator=torch.Generator().manual_seed({seed})).images[0]  # mima's evaluation image of seed {seed}
```
"""


def _processor_classes():
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0

    return CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0


def _is_cross(unet, proc_name: str) -> bool:
    attn = unet.get_submodule(proc_name.removesuffix(".processor"))
    return bool(getattr(attn, "is_cross_attention", proc_name.endswith("attn2.processor")))


def install_kv_processors(unet) -> list[torch.nn.Parameter]:
    """Custom Diffusion processors on every cross-attention layer, k/v initialised from the layer (float32)."""
    _, processor_cls = _processor_classes()
    procs, params = {}, []
    for name, proc in unet.attn_processors.items():
        if not _is_cross(unet, name):
            procs[name] = proc
            continue
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if attn.to_k.bias is not None or attn.to_v.bias is not None:
            raise ValueError(f"{name}: Custom Diffusion expects bias-free key/value projections")
        p = processor_cls(train_kv=True, train_q_out=False, hidden_size=attn.to_k.out_features,
                          cross_attention_dim=attn.to_k.in_features)
        p.to(attn.to_k.weight.device, torch.float32)
        with torch.no_grad():
            p.to_k_custom_diffusion.weight.copy_(attn.to_k.weight)
            p.to_v_custom_diffusion.weight.copy_(attn.to_v.weight)
        procs[name] = p
        params += [p.to_k_custom_diffusion.weight, p.to_v_custom_diffusion.weight]
    unet.set_attn_processor(procs)
    return params


def custom_diffusion_state_dict(unet) -> dict[str, torch.Tensor]:
    classes = _processor_classes()
    return {
        f"{name}.{key}": value.detach().cpu().contiguous()
        for name, proc in unet.attn_processors.items() if isinstance(proc, classes)
        for key, value in proc.state_dict().items()
    }


def load_custom_diffusion(pipe, folder: Path) -> None:
    """Install the processors of ``folder/pytorch_custom_diffusion_weights.safetensors``; load the token."""
    from safetensors.torch import load_file

    _, processor_cls = _processor_classes()
    unet = pipe.unet
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in load_file(Path(folder) / WEIGHT_NAME).items():
        name, _, sub = key.partition(".processor.")
        groups[f"{name}.processor"][sub] = value
    procs = dict(unet.attn_processors)
    for name, weights in groups.items():
        if name not in procs or "to_k_custom_diffusion.weight" not in weights:
            raise ValueError(f"{folder}: {name} does not match this UNet's attention layers")
        k = weights["to_k_custom_diffusion.weight"]
        p = processor_cls(train_kv=True, train_q_out="to_q_custom_diffusion.weight" in weights, hidden_size=k.shape[0],
                          cross_attention_dim=k.shape[1])
        p.load_state_dict(weights)
        procs[name] = p.to(unet.device, unet.dtype)
    unet.set_attn_processor(procs)
    if (Path(folder) / "learned_embeds.safetensors").exists():
        load_token_embedding(pipe, folder)


def _load_lines(base: str | None) -> str:
    """Python lines that open the attacked model ``base`` as ``pipe``: plain diffusers for a pipeline folder."""
    from ..models import ModelNotAvailable, resolve_model

    try:
        folder = resolve_model(base) if base else None
    except (ModelNotAvailable, FileNotFoundError):
        folder = None
    if folder is not None and (folder / "model_index.json").exists():
        return ("from diffusers import StableDiffusionPipeline\n\n"
                f"pipe = StableDiffusionPipeline.from_pretrained({str(folder.resolve())!r})  # the attacked model\n")
    if base:  # a mima model folder that completes its base (engine.models opens it)
        ref = str(Path(base).resolve()) if Path(base).exists() else str(base)
        return f"from engine.models import load_pipeline\n\npipe = load_pipeline({ref!r})  # the attacked model\n"
    return ("from diffusers import StableDiffusionPipeline\n\n"
            "pipe = StableDiffusionPipeline.from_pretrained(...)  # the attacked model\n")


def readme(job: AttackJob, folder: Path) -> str:
    """The ``README.md`` beside the weights: how to load them and draw mima's last evaluation image."""
    return README.format(weights=WEIGHT_NAME, token=job.token, load_lines=_load_lines(job.base),
                         folder=str(Path(folder).resolve()), prompt=job.eval_text, steps=job.sample_steps,
                         guidance=job.guidance, seed=job.eval_seeds[0])


@register("custom-diffusion")
class CustomDiffusion:
    adds_token = True
    # diffusers examples/custom_diffusion (README): lr 1e-5 (x batch with --scale_lr), 250 steps, batch 2, prior
    defaults = dict(steps=250, lr=1e-5, batch=2, rank=4, alpha=4.0, prior_preservation=True)
    testbed_defaults = dict(steps=40, lr=1e-4, batch=1, rank=4, alpha=4.0, prior_preservation=True)

    def setup(self, pipe, job: AttackJob) -> Trainable:
        row, finish = learn_new_token(pipe, job, self.name, "modifier token")
        kv = install_kv_processors(pipe.unet)
        return Trainable(params=[row, *kv], text_trains=True, finish=finish)

    def save(self, pipe, job: AttackJob, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(custom_diffusion_state_dict(pipe.unet), folder / WEIGHT_NAME, metadata={"format": "pt"})
        save_token_embedding(pipe, job.token, folder)
        (folder / "README.md").write_text(readme(job, folder), encoding="utf-8")

    def load(self, pipe, folder: Path) -> None:
        load_custom_diffusion(pipe, folder)
