"""The pieces of Stable Diffusion training that every method and attack shares.

- :func:`encode_images` — uint8 images -> scaled VAE latents (posterior mean; deterministic);
- :func:`encode_prompts` — prompts -> the text encoder's token embeddings ``[B, L, c]``;
- :func:`concept_rows` — the rows of a prompt's embedding after BOS up to and including EOS (the merge's ``C_n``);
- :func:`noise_loss` — the noise-prediction loss (Eq. 4) of a UNet, with ``epsilon`` and ``v_prediction``;
- :func:`draw_noise` — seeded noise and timesteps for one batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def images_to_tensor(images: np.ndarray, size: int | None = None) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in [-1, 1], resized to ``size`` if given."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


@torch.no_grad()
def encode_images(vae, images: np.ndarray, size: int | None = None, batch: int = 16) -> torch.Tensor:
    """Scaled latents (posterior mean x ``scaling_factor``) of uint8 images, on the VAE's device, float32."""
    dev, dtype = vae.device, vae.dtype
    out = []
    for i in range(0, len(images), batch):
        x = images_to_tensor(images[i : i + batch], size).to(dev, dtype)
        out.append(vae.encode(x).latent_dist.mean.float() * vae.config.scaling_factor)
    return torch.cat(out)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token embeddings ``[B, L, c]`` (the text encoder's last hidden state), float32."""
    ids = tokenize(tokenizer, prompts).to(text_encoder.device)
    return text_encoder(ids)[0].float()


def eos_index(tokenizer, prompt: str) -> int:
    """Position of the EOS token of ``prompt`` (after truncation)."""
    ids = tokenize(tokenizer, [prompt])[0].tolist()
    return ids.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in ids else len(ids) - 1


@torch.no_grad()
def concept_rows(text_encoder, tokenizer, prompt: str) -> torch.Tensor:
    """The rows of ``prompt``'s token embeddings after BOS up to and including EOS: ``[l, c]``."""
    return prompts_rows(text_encoder, tokenizer, [prompt])[0]


@torch.no_grad()
def prompts_rows(text_encoder, tokenizer, prompts: list[str], batch: int = 64) -> list[torch.Tensor]:
    """:func:`concept_rows` of many prompts, encoded in batches."""
    out = []
    for i in range(0, len(prompts), batch):
        chunk = list(prompts[i : i + batch])
        emb = encode_prompts(text_encoder, tokenizer, chunk)
        out += [e[1 : eos_index(tokenizer, p) + 1] for e, p in zip(emb, chunk)]
    return out


def seeded_generator(*key) -> torch.Generator:
    """A CPU generator seeded by a JSON-able key (e.g. ``(seed, stage, step)``): a pure function of the key, so a
    resumed loop draws exactly what an uninterrupted one would."""
    import json
    import zlib

    return torch.Generator().manual_seed(zlib.crc32(json.dumps(key).encode()))


def draw_noise(latents: torch.Tensor, generator: torch.Generator, num_train_timesteps: int = 1000):
    """Seeded ``(noise, timesteps)`` for a batch of latents (drawn on the CPU, moved to their device)."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    t = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator).to(latents.device)
    return noise, t


def noise_loss(unet_fn, scheduler, latents: torch.Tensor, context: torch.Tensor, noise: torch.Tensor,
               timesteps: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The diffusion loss ``|| target - unet(x_t, t, c) ||^2`` (Eq. 4).

    ``unet_fn(x_t, t, context)`` returns the prediction (a UNet's ``.sample`` or a functional call); the target is
    the noise (``epsilon``) or the velocity (``v_prediction``), as the scheduler says. ``reduction="none"`` gives one
    loss per sample.
    """
    xt = scheduler.add_noise(latents, noise, timesteps)
    pred = unet_fn(xt, timesteps, context)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {kind!r}")
    err = (pred.float() - target.float()) ** 2
    per_sample = err.flatten(1).mean(1)
    return per_sample if reduction == "none" else per_sample.mean()


def unet_call(unet):
    """``unet_fn`` for :func:`noise_loss` from a ``UNet2DConditionModel``."""
    return lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample


def training_scheduler(pipe):
    """A DDPM scheduler with the pipeline's noise schedule (what training adds noise with)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)
