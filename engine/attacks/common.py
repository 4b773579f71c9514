"""What every attack shares: the job it runs, the training loop, evaluation images, the result.

An attack is a pure function of its inputs: the same pipeline weights, images, prompts, settings and seed give
the same losses, weights and evaluation images. Batches, noise and timesteps of step ``k`` come from a generator
seeded by ``(seed, k)``; attack-specific initialisation (LoRA matrices) runs under a forked RNG seeded by ``seed``.

An attack **trains ``job.pipe`` in place**: afterwards it *is* the attacked model (LoRA adapters attached, new
tokens in the tokenizer, Custom Diffusion processors installed, ...). Give every attack a freshly loaded pipeline
(the orchestrator attacks an immunized model and its unimmunized twin, each loaded anew).

Each attack module provides only what differs (see :class:`Attack`): which parameters train, how a new token is
added, how the result is saved and loaded back with diffusers. The job, the training loop and the result stay in
this one module (a little over 450 lines) so that the recipe every attack shares reads top to bottom.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from engine.diffusion import (
    draw_noise,
    encode_images,
    encode_prompts,
    noise_loss,
    tokenize,
    training_scheduler,
    unet_call,
)
from engine.profile import AttackSettings
from engine.runs import EventLogger, NullLogger

ATTACK_JSON = "mima_attack.json"
EVAL_SEED = 90_000
"""First seed of the evaluation images (image ``i``: ``EVAL_SEED + i``), far from the seeds of the image sets
(0, 10 000, 20 000 by default) so that evaluation never re-draws a training or reference image."""


# ---------------------------------------------------------------------------------------------- job


@dataclass
class AttackJob:
    """Everything one attack on one concept needs.

    ``images`` are the concept's ``images.attack`` (uint8 ``[n, H, W, 3]``; never ``images.immunize``).
    ``prompt`` is the instance prompt, with the *attacker's* token for personal concepts; ``token`` is that token
    when the attack adds it to the tokenizer (textual inversion, Custom Diffusion), initialised from the embedding
    of ``init_text`` (the class word). ``class_prompt``/``class_images`` feed prior preservation
    (``settings.prior_preservation``), weighted by ``prior_weight``.
    """

    pipe: Any
    settings: AttackSettings
    images: np.ndarray
    prompt: str
    concept: str = "concept"
    eval_prompt: str | None = None
    token: str | None = None
    init_text: str | None = None
    class_prompt: str | None = None
    class_images: np.ndarray | None = None
    prior_weight: float = 1.0
    seed: int = 0
    eval_seed: int = EVAL_SEED
    sample_steps: int = 50
    guidance: float = 7.5
    eval_at_start: bool = True
    """Also generate evaluation images at step 0 (before any training): the start of the curves."""
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    base: str | None = None
    """Model reference of ``pipe`` (written beside outputs that hold a full UNet, so that
    ``engine.models.load_pipeline(out)`` opens them)."""
    tags: dict[str, Any] = field(default_factory=dict)
    """Extra tags of every logged event (e.g. ``model="immunized"``)."""
    log_images: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray) or self.images.ndim != 4 or self.images.shape[-1] != 3:
            got = getattr(self.images, "shape", type(self.images))
            raise ValueError(f"images: expected a uint8 array [n, H, W, 3], got {got}")
        if len(self.images) == 0:
            raise ValueError("images: no attack images")
        if self.settings.prior_preservation:
            if self.class_images is None or len(self.class_images) == 0 or not self.class_prompt:
                raise ValueError(f"class_images: {self.settings.method} with prior preservation needs class_prompt "
                                 "and class_images")
        if self.token is not None and self.token not in self.prompt:
            raise ValueError(f"token: '{self.token}' does not appear in the prompt '{self.prompt}'")

    @property
    def eval_text(self) -> str:
        return self.eval_prompt or self.prompt

    @property
    def eval_seeds(self) -> list[int]:
        return list(range(self.eval_seed, self.eval_seed + self.settings.eval_images))

    @property
    def prior(self) -> bool:
        return bool(self.settings.prior_preservation)


def job_for_concept(pipe, concept, settings: AttackSettings, images: np.ndarray, *,
                    class_images: np.ndarray | None = None, **fields: Any) -> AttackJob:
    """An :class:`AttackJob` for a profile concept (``engine.profile.Concept``).

    The instance and evaluation prompts use the attacker's token (``settings.token``) in place of the concept's;
    a personal concept needs one, and it must differ from the concept's own. Attacks that add a token (textual
    inversion, Custom Diffusion) initialise it from the class prompt. ``fields`` go to :class:`AttackJob`.
    """
    attack_token = settings.token
    new_token = get_attack(settings.method).adds_token
    if concept.token is not None or new_token:
        if not attack_token:
            raise ValueError(f"attack.token: {settings.method} of concept '{concept.name}' needs the attacker's token")
        if attack_token == concept.token:
            raise ValueError(f"attack.token: '{attack_token}' is the token concept '{concept.name}' was immunized "
                             "with; the attacker must use a different one")
    prompt = concept.format("{prompt}", token=attack_token)
    if new_token and attack_token not in prompt:
        raise ValueError(f"{settings.method}: the prompt '{prompt}' of concept '{concept.name}' has no token to learn")
    fields.setdefault("eval_prompt", concept.format(settings.eval_prompt or "{prompt}", token=attack_token))
    return AttackJob(
        pipe=pipe, settings=settings, images=images, prompt=prompt, concept=concept.name,
        token=attack_token if new_token else None, init_text=concept.class_prompt, class_prompt=concept.class_prompt,
        class_images=class_images if settings.prior_preservation else None, **fields,
    )


@dataclass
class AttackResult:
    method: str
    concept: str
    losses: list[float]
    """Training loss of every step (instance + prior_weight * prior)."""
    eval_images: dict[int, np.ndarray]
    """Attack step -> uint8 ``[eval_images, H, W, 3]`` generated from ``eval_prompt`` with ``eval_seeds``."""
    eval_prompt: str
    eval_seeds: list[int]
    output: Path | None
    seconds: float


# ----------------------------------------------------------------------------------------- protocol


@dataclass
class Trainable:
    """What an attack's ``setup`` hands the loop."""

    params: list[torch.Tensor]
    """The optimizer's parameters (float32)."""
    text_trains: bool = False
    """The text embedding depends on ``params`` (a learned token): encode the prompts at every step."""
    finish: Callable[[], None] | None = None
    """Called once after the last step (write learned rows into the model, drop hooks)."""


class Attack(Protocol):
    name: str
    adds_token: bool
    defaults: dict[str, Any]
    """Per-method defaults (``steps lr batch rank alpha prior_preservation``) of the diffusers examples/paper."""
    testbed_defaults: dict[str, Any]
    """The same, sized for the testbed (seconds per concept on a CPU)."""

    def setup(self, pipe, job: AttackJob) -> Trainable: ...

    def save(self, pipe, job: AttackJob, folder: Path) -> None: ...

    def load(self, pipe, folder: Path) -> None: ...


ATTACKS: dict[str, Attack] = {}


def register(name: str):
    """Class decorator: register an attack (an instance of the class) under ``name``."""

    def wrap(cls):
        cls.name = name
        ATTACKS[name] = cls()
        return cls

    return wrap


def get_attack(name: str) -> Attack:
    try:
        return ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack '{name}'; expected one of {', '.join(ATTACKS)}") from None


def default_settings(method: str, testbed: bool = False, **overrides: Any) -> AttackSettings:
    """:class:`AttackSettings` of ``method``: its defaults (``testbed``: the testbed-sized ones), then ``overrides``."""
    attack = get_attack(method)
    base = dict(attack.testbed_defaults if testbed else attack.defaults)
    values = dict(method=method, eval_every=0, eval_images=8, eval_prompt=None, token=None, **base)
    values.update(overrides)
    if values.get("alpha") is None or ("rank" in overrides and "alpha" not in overrides):
        values["alpha"] = float(values["rank"])
    return AttackSettings(**values)


# ------------------------------------------------------------------------------------------ helpers


def step_generator(seed: int, stream: int, step: int) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, stream, step)``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, stream, step]).generate_state(2)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


class EpochSampler:
    """Indices of the images of step ``k`` (1-based): consecutive slices of seeded per-epoch permutations, so every
    image is seen once per epoch and step ``k``'s batch depends only on ``(seed, k)``."""

    def __init__(self, n: int, batch: int, seed: int, stream: int) -> None:
        self.n, self.batch, self.seed, self.stream = n, batch, seed, stream
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=step_generator(self.seed, self.stream, epoch))
        return self._perms[epoch]

    def __call__(self, step: int) -> torch.Tensor:
        start = (step - 1) * self.batch
        return torch.stack([self._perm(i // self.n)[i % self.n] for i in range(start, start + self.batch)])


def autocast_for(pipe):
    """Mixed precision when the pipeline is in half precision (the VAE's dtype, which no attack changes); the
    parameters that train are float32."""
    dtype = pipe.vae.dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(pipe.vae.device.type, dtype=dtype)


def resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def add_token(pipe, token: str, init_text: str | None):
    """Add ``token`` to the tokenizer as one new token, resize the embeddings and return ``(token_id, row, finish)``:
    ``row`` a float32 parameter ``[c]`` (initialised from the mean input embedding of ``init_text``'s tokens)
    that a forward hook substitutes wherever the token appears; ``finish()`` writes it into the embedding matrix and
    removes the hook.
    """
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    if token in tokenizer.get_vocab() or tokenizer.add_tokens(token) == 0:
        raise ValueError(f"token: '{token}' is already in the tokenizer; this attack needs a new one "
                         f"(e.g. '<{token}>')")
    token_id = tokenizer.convert_tokens_to_ids(token)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = text_encoder.get_input_embeddings()
    with torch.no_grad():
        init_ids = tokenize(tokenizer, [init_text or "*"])[0].tolist()
        special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
        init_ids = [i for i in init_ids if i not in special] or [tokenizer.bos_token_id]
        init = emb.weight[init_ids].float().mean(0)
        emb.weight[token_id] = init.to(emb.weight.dtype)
    row = torch.nn.Parameter(init.clone())

    def hook(module, inputs, output):
        mask = (inputs[0] == token_id).unsqueeze(-1)
        return torch.where(mask, row.to(output.dtype), output)

    handle = emb.register_forward_hook(hook)

    def finish() -> None:
        handle.remove()
        with torch.no_grad():
            emb.weight[token_id] = row.detach().to(emb.weight.dtype)

    return token_id, row, finish


def learn_new_token(pipe, job: AttackJob, method: str, what: str = "token"):
    """Setup of the attacks that learn a new token: check that ``job`` has one, freeze the UNet and the text encoder,
    add ``job.token`` with :func:`add_token` (initialised from ``job.init_text``) and return ``(row, finish)``.
    ``method`` and ``what`` (how the attack calls the token) name them in the error when the job has no token."""
    if not job.token:
        raise ValueError(f"token: {method} needs the attacker's {what}")
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    _, row, finish = add_token(pipe, job.token, job.init_text)
    return row, finish


def save_token_embedding(pipe, token: str, folder: Path) -> Path:
    """``learned_embeds.safetensors``: ``{token: [1, c]}``, the format of diffusers' textual-inversion example;
    ``pipe.load_textual_inversion(folder)`` reads it."""
    from safetensors.torch import save_file

    token_id = pipe.tokenizer.convert_tokens_to_ids(token)
    row = pipe.text_encoder.get_input_embeddings().weight[token_id : token_id + 1].detach().float().cpu().contiguous()
    path = folder / "learned_embeds.safetensors"
    save_file({token: row}, path, metadata={"format": "pt"})
    return path


def write_attack_json(job: AttackJob, folder: Path) -> None:
    s = job.settings
    meta = {"method": s.method, "concept": job.concept, "prompt": job.prompt, "token": job.token, "seed": job.seed,
            "base": job.base,
            "settings": {k: getattr(s, k) for k in ("steps", "lr", "batch", "rank", "alpha", "prior_preservation")}}
    (folder / ATTACK_JSON).write_text(json.dumps(meta, indent=1))


# --------------------------------------------------------------------------------------------- loop


class Batches:
    """The training batches of a job: latents encoded once; step ``k``'s images, noise and timesteps depend only on
    ``(job.seed, k)``. A batch holds ``settings.batch`` instance latents, then as many class latents with prior
    preservation."""

    def __init__(self, job: AttackJob) -> None:
        pipe, device = job.pipe, job.pipe.unet.device
        size = resolution(pipe)
        self.job = job
        self.instance = encode_images(pipe.vae, job.images, size).to(device)
        self.classes = encode_images(pipe.vae, job.class_images, size).to(device) if job.prior else None
        b = job.settings.batch
        self._inst = EpochSampler(len(self.instance), b, job.seed, 0)
        self._cls = EpochSampler(len(self.classes), b, job.seed, 1) if job.prior else None
        self.n_train = training_scheduler(pipe).config.num_train_timesteps

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = self.instance.device
        lat = self.instance[self._inst(step).to(device)]
        if self._cls is not None:
            lat = torch.cat([lat, self.classes[self._cls(step).to(device)]])
        noise, t = draw_noise(lat, step_generator(self.job.seed, 2, step), self.n_train)
        return lat, noise, t


def batch_loss(job: AttackJob, context: torch.Tensor, lat: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
               scheduler=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(total, prior)`` loss of one batch; ``context`` holds the instance prompt's embedding (then the class
    prompt's) ``[1 or 2, L, c]``. ``total`` = instance loss + ``prior_weight`` x prior loss."""
    pipe, b = job.pipe, job.settings.batch
    scheduler = scheduler or training_scheduler(pipe)
    with autocast_for(pipe):
        per_sample = noise_loss(unet_call(pipe.unet), scheduler, lat, context.repeat_interleave(b, dim=0), noise, t,
                                reduction="none")
    loss = per_sample[:b].mean()
    if not job.prior:
        return loss, None
    prior = per_sample[b:].mean()
    return loss + job.prior_weight * prior, prior


def prompt_ids(job: AttackJob) -> torch.Tensor:
    """Token ids of the instance prompt (and the class prompt with prior preservation)."""
    prompts = [job.prompt] + ([job.class_prompt] if job.prior else [])
    return tokenize(job.pipe.tokenizer, prompts).to(job.pipe.text_encoder.device)


def run_attack(job: AttackJob, logger: EventLogger | None = None,
               on_eval: Callable[[int, np.ndarray], None] | None = None, out: str | Path | None = None) -> AttackResult:
    """Run ``job.settings.method`` on ``job.pipe`` (in place), evaluate, and save the result into ``out`` if given.

    Evaluation images (``settings.eval_images`` per step, seeds ``job.eval_seeds``, the same for every model) are
    generated at step 0 (if ``job.eval_at_start``) and at ``settings.eval_steps``; each set goes to ``on_eval(step,
    images)`` and, one image per event, to ``logger.log_image("eval/<concept>", step, ...)``. The loss of every step
    is logged as ``loss/<concept>`` (and ``loss_prior/<concept>`` with prior preservation).
    """
    from engine.sampling import generate

    attack = get_attack(job.settings.method)
    logger = logger or NullLogger()
    pipe, s = job.pipe, job.settings
    t0 = time.perf_counter()
    device = pipe.unet.device
    pipe.set_progress_bar_config(disable=True)
    tags = dict(job.tags, attack=s.method)

    batches = Batches(job)
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(job.seed)
        trainable = attack.setup(pipe, job)
    ids = prompt_ids(job)
    if not trainable.text_trains:
        prompts = [job.prompt] + ([job.class_prompt] if job.prior else [])
        fixed_context = encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts)
    scheduler = training_scheduler(pipe)
    opt = torch.optim.AdamW(trainable.params, lr=s.lr, weight_decay=job.weight_decay)

    eval_images: dict[int, np.ndarray] = {}
    eval_steps = set(s.eval_steps)

    def evaluate(step: int) -> None:
        with autocast_for(pipe):
            images = generate(pipe, job.eval_text, job.eval_seeds, job.sample_steps, job.guidance)
        eval_images[step] = images
        if job.log_images:
            from PIL import Image

            for seed, im in zip(job.eval_seeds, images):
                logger.log_image(f"eval/{job.concept}", step, Image.fromarray(im), seed=seed, **tags)
        if on_eval is not None:
            on_eval(step, images)

    if job.eval_at_start:
        evaluate(0)
    losses: list[float] = []
    for step in range(1, s.steps + 1):
        lat, noise, t = batches(step)
        with autocast_for(pipe):
            context = pipe.text_encoder(ids)[0] if trainable.text_trains else fixed_context
        total, prior = batch_loss(job, context, lat, noise, t, scheduler)
        opt.zero_grad(set_to_none=True)
        total.backward()
        if job.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable.params, job.max_grad_norm)
        opt.step()
        losses.append(float(total.detach()))
        logger.log_scalar(f"loss/{job.concept}", losses[-1], step, **tags)
        if prior is not None:
            logger.log_scalar(f"loss_prior/{job.concept}", float(prior.detach()), step, **tags)
        logger.progress(step, s.steps)
        if step in eval_steps:
            evaluate(step)
    if trainable.finish is not None:
        trainable.finish()
    for p in trainable.params:
        p.requires_grad_(False)

    folder = None
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        attack.save(pipe, job, folder)
        write_attack_json(job, folder)
    return AttackResult(method=s.method, concept=job.concept, losses=losses, eval_images=eval_images,
                        eval_prompt=job.eval_text, eval_seeds=job.eval_seeds, output=folder,
                        seconds=time.perf_counter() - t0)


def load_attack_output(pipe, folder: str | Path, method: str | None = None):
    """Load an attack's output folder into ``pipe`` (in place) with the diffusers API of its method; returns ``pipe``.
    ``method`` defaults to the one recorded in the folder's ``mima_attack.json``."""
    folder = Path(folder)
    if method is None:
        meta_path = folder / ATTACK_JSON
        if not meta_path.exists():
            raise FileNotFoundError(f"{folder}: no {ATTACK_JSON}; pass the attack method")
        method = json.loads(meta_path.read_text())["method"]
    get_attack(method).load(pipe, folder)
    return pipe


def with_settings(job: AttackJob, **changes: Any) -> AttackJob:
    """A copy of ``job`` whose settings have ``changes``."""
    return replace(job, settings=replace(job.settings, **changes))


__all__ = [
    "ATTACKS", "ATTACK_JSON", "EVAL_SEED", "Attack", "AttackJob", "AttackResult", "Trainable", "register", "get_attack",
    "default_settings", "job_for_concept", "run_attack", "load_attack_output", "with_settings",
]
