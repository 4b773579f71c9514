"""Train the testbed from scratch: render data, train the VAE and the judge, train the text encoder, then the UNet
on the frozen text encoder (as Stable Diffusion's UNet was trained on a frozen CLIP).

``build_testbed(out)`` runs the stages in order. Each stage is seeded and step-indexed (batch ``k`` is drawn
from a generator seeded by ``(seed, stage, k)``), checkpoints itself every ``checkpoint_minutes`` with an atomic
write, resumes from its checkpoint, and leaves a ``<stage>.done`` marker; a finished stage is skipped. The
timings of every stage are written to ``timings.json``. Progress goes to a callback, never to stdout.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..diffusion import images_to_tensor, seeded_generator, tokenize
from ..runs import atomic_savez, atomic_write
from . import world
from .build import DEFAULT, NOISE_SCHEDULE, TestbedConfig, assemble_pipeline, make_text_encoder, make_tokenizer, make_unet, make_vae

Progress = Callable[[str, int, int, dict], None]
STAGES = ("data", "vae", "latents", "judge", "text", "unet", "export")


def _noop(stage: str, step: int, total: int, info: dict) -> None:
    pass


def _atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


class _Clock:
    """Says when a checkpoint is due (every ``minutes``; 0 = every step)."""

    def __init__(self, minutes: float):
        self.every = minutes * 60
        self.last = time.monotonic()

    def due(self) -> bool:
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            return True
        return False


class _StageState:
    """A stage's resumable state: the ``state_dict`` of each named part (modules, optimizer, EMA) and the steps done,
    loaded from ``path`` if it exists (``start``) and saved atomically every ``minutes`` and after the last step."""

    def __init__(self, path: Path, minutes: float, **parts):
        self.path, self.parts, self.start = path, parts, 0
        if (ck := _load(path)) is not None:
            for name, part in parts.items():
                part.load_state_dict(ck[name])
            self.start = int(ck["step"])
        self.clock = _Clock(minutes)

    def save(self, steps_done: int) -> None:
        _atomic_save({**{name: part.state_dict() for name, part in self.parts.items()}, "step": steps_done}, self.path)

    def stepped(self, step: int, total: int) -> None:
        """After step ``step`` (from 0) of ``total``: save if a checkpoint is due or the stage is done."""
        if self.clock.due() or step + 1 == total:
            self.save(step + 1)


def _cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up then cosine decay to ``floor`` of the peak (diffusers' ``get_scheduler("cosine")`` decays to 0;
    the floor is the testbed's trained recipe), as a multiplier of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


# ----------------------------------------------------------------------------------------------- stages


def stage_data(out: Path, cfg: TestbedConfig, seed: int, progress: Progress, device: str = "cpu") -> None:
    items = world.training_items(cfg.n_images, seed, whole_look_share=cfg.whole_look_share)
    images = np.zeros((len(items), cfg.image_size, cfg.image_size, 3), np.uint8)
    chunk = 1000
    for i in range(0, len(items), chunk):
        for j, it in enumerate(items[i : i + chunk]):
            images[i + j] = world.render(it, world.item_seed(it, seed, i + j))
        progress("data", min(i + chunk, len(items)), len(items), {})
    prompts = np.array([it.prompt() for it in items])
    labels = np.array([it.labels() for it in items], dtype=np.int64)
    looks = np.array([it.look_labels() for it in items], dtype=np.int64)
    atomic_savez(out / "data.npz", images=images, prompts=prompts, labels=labels, looks=looks)


def _data(out: Path, *keys: str) -> dict:
    """The arrays ``keys`` of the rendered data (default: all; the images alone are 0.5 GB at the default size)."""
    with np.load(out / "data.npz") as d:
        return {k: d[k] for k in keys or d.files}


_INIT_PARTS = ("vae", "text_encoder", "unet")


def _init_folder(cfg: TestbedConfig, name: str) -> Path:
    """The folder of component ``name`` of ``cfg.init_from``'s pipeline; a clear error if there is none."""
    folder = Path(cfg.init_from) / name
    if not folder.is_dir():
        raise ValueError(f"init_from: {cfg.init_from} has no {name}/ (expected a testbed pipeline folder)")
    return folder


def _init_part(cfg: TestbedConfig, name: str) -> torch.nn.Module:
    """Component ``name`` (one of :data:`_INIT_PARTS`) of ``cfg.init_from``'s pipeline in float32, checked against
    the architecture ``cfg`` builds (a clear error instead of a state-dict mismatch)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = _init_folder(cfg, name)
    cls = {"vae": AutoencoderKL, "text_encoder": CLIPTextModel, "unet": UNet2DConditionModel}[name]
    part = cls.from_pretrained(folder, torch_dtype=torch.float32)
    fresh = {"vae": make_vae, "text_encoder": make_text_encoder, "unet": make_unet}[name](cfg)
    theirs, ours = part.state_dict(), fresh.state_dict()
    if {k: v.shape for k, v in theirs.items()} != {k: v.shape for k, v in ours.items()}:
        raise ValueError(f"init_from: {folder} is not the architecture this configuration builds")
    fresh.load_state_dict(theirs)
    return fresh


def stage_vae(out: Path, cfg: TestbedConfig, seed: int, progress: Progress, device: str = "cpu") -> None:
    if cfg.init_from:
        _atomic_save({"model": _init_part(cfg, "vae").state_dict(), "step": 0}, out / "vae.ckpt")
        return
    images = _data(out, "images")["images"]
    torch.manual_seed(seed)
    vae = make_vae(cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    state = _StageState(out / "vae.ckpt", cfg.checkpoint_minutes, model=vae, opt=opt)
    vae.train()
    for step in range(state.start, cfg.vae_steps):
        g = seeded_generator(seed, "vae", step)
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=g)
        x = images_to_tensor(images[idx.numpy()]).to(device)
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * _cosine(step, cfg.vae_steps, 50)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        loss = rec_loss + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        progress("vae", step + 1, cfg.vae_steps, {"loss": float(rec_loss.detach())})
        state.stepped(step, cfg.vae_steps)


def _trained_vae(out: Path, cfg: TestbedConfig):
    vae = make_vae(cfg)
    vae.load_state_dict(_load(out / "vae.ckpt")["model"])
    return vae.eval()


def stage_latents(out: Path, cfg: TestbedConfig, seed: int, progress: Progress, device: str = "cpu") -> None:
    images = _data(out, "images")["images"]
    vae = _trained_vae(out, cfg).to(device)
    lat = torch.zeros(len(images), 4, cfg.latent_size, cfg.latent_size)
    chunk = 256
    with torch.no_grad():
        for i in range(0, len(images), chunk):
            x = images_to_tensor(images[i : i + chunk]).to(device)
            lat[i : i + chunk] = vae.encode(x).latent_dist.mean.cpu()
            progress("latents", min(i + chunk, len(images)), len(images), {})
    # a continued build keeps its VAE's scaling, which its UNet was trained with
    if cfg.init_from:
        from diffusers import AutoencoderKL

        scale = float(AutoencoderKL.load_config(_init_folder(cfg, "vae"))["scaling_factor"])
    else:
        scale = float(1.0 / lat.std())
    _atomic_save({"latents": lat.half(), "scaling_factor": torch.tensor(scale)}, out / "latents.pt")


def stage_judge(out: Path, cfg: TestbedConfig, seed: int, progress: Progress, device: str = "cpu") -> None:
    from .judge import save_judge, train_judge

    given = Path(cfg.init_from).parent / "judge.safetensors" if cfg.init_from else None
    if given and given.exists():
        shutil.copyfile(given, out / "judge.safetensors")
        return
    judge = train_judge(
        steps=cfg.judge_steps, seed=seed, checkpoint_path=out / "judge.ckpt", device=device,
        progress=lambda s, t, info: progress("judge", s, t, info),
    )
    save_judge(judge.cpu(), out / "judge.safetensors")


def _prompt_table(prompts: np.ndarray, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids of the distinct training prompts, and each training image's index into them."""
    uniq, inverse = np.unique(prompts, return_inverse=True)
    return tokenize(tokenizer, list(uniq)), torch.from_numpy(inverse.astype(np.int64))


def _fresh_text_encoder(cfg: TestbedConfig, seed: int):
    """The text stage's starting point: random weights, token embeddings drawn with ``cfg.text_init_std``."""
    torch.manual_seed(seed + 2)
    text = make_text_encoder(cfg)
    with torch.no_grad():  # distinct prompts must give distinct contexts from step 0 (CLIP's 0.02 makes them ~equal)
        text.get_input_embeddings().weight.normal_(0.0, cfg.text_init_std)
    return text


def _trained_text(out: Path, cfg: TestbedConfig):
    text = make_text_encoder(cfg)
    text.load_state_dict(_load(out / "text.ckpt")["text"])
    return text.eval()


def stage_text(out: Path, cfg: TestbedConfig, seed: int, progress: Progress, device: str = "cpu") -> None:
    """Train the text encoder so that every position from EOS on carries the prompt's (style, object) and the look it
    names (body colour, accent region and colour, detail).

    A CLIP text encoder trained from random weights together with the UNet keeps the concept in its own token and
    leaves EOS and padding (most of the cross-attention context) nearly identical across prompts, so the UNet learns
    to ignore the prompt; and while the UNet does not yet read the prompt, joint training collapses the distinctions
    this stage makes (the spread of the 8 object prompts' padding outputs goes from 0.71 to 0.05 in 1000 joint
    steps). SD's pretrained CLIP spreads the prompt over every position and stays frozen; this stage gives the
    tiny encoder that property with a linear probe on the training prompts' labels (the empty prompt is "no style, no
    object"), and the UNet stage keeps it frozen. Full batch, deterministic, resumable; the probe is thrown
    away. It costs 11 s on an H200 and 28.6 min on 2 CPU cores (seed 0, default settings: 3591 distinct prompts).
    With ``cfg.init_from`` the pipeline's text encoder is taken as it is."""
    if cfg.init_from:
        _atomic_save({"text": _init_part(cfg, "text_encoder").state_dict(), "step": 0}, out / "text.ckpt")
        return
    data = _data(out, "prompts", "labels", "looks")
    tokenizer = make_tokenizer(cfg, out / "tokenizer")
    ids, inverse = _prompt_table(data["prompts"], tokenizer)
    first = np.unique(inverse.numpy(), return_index=True)[1]
    labels = torch.from_numpy(np.concatenate([data["labels"][first, :2], data["looks"][first]], axis=1))
    ids = torch.cat([ids, tokenize(tokenizer, [""])])
    labels = torch.cat([labels, torch.tensor([[len(world.STYLES), len(world.OBJECTS), *world.NO_LOOK]])])
    eos = (ids == tokenizer.eos_token_id).int().argmax(1)
    tail = torch.arange(ids.shape[1])[None] >= eos[:, None]
    labels = labels[:, None].expand(-1, ids.shape[1], -1)[tail].to(device)
    ids, tail = ids.to(device), tail.to(device)

    text = _fresh_text_encoder(cfg, seed).to(device)
    # one probe head per label: style, object, and the look's body, pattern, accent and detail (each with "none")
    sizes = [len(world.STYLES) + 1, len(world.OBJECTS) + 1, *(n + 1 for n in world.NO_LOOK)]
    probe = torch.nn.Linear(cfg.text_width, sum(sizes)).to(device)
    opt = torch.optim.AdamW([*text.parameters(), *probe.parameters()], lr=cfg.text_lr)
    state = _StageState(out / "text.ckpt", cfg.checkpoint_minutes, text=text, probe=probe, opt=opt)
    text.train()
    for step in range(state.start, cfg.text_steps):
        logits = probe(text(ids)[0][tail]).split(sizes, dim=1)
        loss = sum(F.cross_entropy(lg, labels[:, k]) for k, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress("text", step + 1, cfg.text_steps, {"loss": float(loss.detach())})
        state.stepped(step, cfg.text_steps)


def _snr_weight(sched, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al., 2023): ``min(SNR, gamma) / SNR``; 1 if gamma=0."""
    from diffusers.training_utils import compute_snr

    if not gamma:
        return torch.ones(t.shape)
    snr = compute_snr(sched, t)
    return torch.clamp(snr, max=gamma) / snr


def _mix_weights(labels: np.ndarray, mix: tuple[float, ...]) -> torch.Tensor:
    """Per-image sampling weights so that styles, objects, compositions and class-prompt images are drawn in the
    proportions ``mix`` (the gated style and object prompts get most of the UNet's few CPU steps)."""
    has_style, has_object = labels[:, 0] < len(world.STYLES), labels[:, 1] < len(world.OBJECTS)
    kinds = np.select([has_style & ~has_object, has_object & ~has_style, has_style & has_object], [0, 1, 2], 3)
    counts = np.bincount(kinds, minlength=4)
    w = np.asarray(mix, np.float64)[kinds] / np.maximum(counts[kinds], 1)
    return torch.from_numpy(w / w.sum())


def stage_unet(out: Path, cfg: TestbedConfig, seed: int, progress: Progress, device: str = "cpu",
               eval_every: int = 1000) -> None:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    data = _data(out, "prompts", "labels")
    lat_ck = _load(out / "latents.pt")
    latents = lat_ck["latents"].to(device)
    scale = float(lat_ck["scaling_factor"])
    tokenizer = make_tokenizer(cfg, out / "tokenizer")
    uniq_ids, inverse = _prompt_table(data["prompts"], tokenizer)
    empty_ids = tokenize(tokenizer, [""])[0]
    weights = _mix_weights(data["labels"], cfg.unet_mix)

    text = _trained_text(out, cfg).to(device)
    with torch.no_grad():  # the text encoder is frozen (as SD's CLIP is): every prompt's context is computed once
        uniq_ctx, empty_ctx = text(uniq_ids.to(device))[0], text(empty_ids[None].to(device))[0][0]
    del text
    inverse = inverse.to(device)

    torch.manual_seed(seed + 1)
    unet = (_init_part(cfg, "unet") if cfg.init_from else make_unet(cfg)).to(device)  # a checkpoint overrides it
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    ema = EMAModel(params, decay=cfg.ema_decay)
    sched = DDPMScheduler(**NOISE_SCHEDULE)
    state = _StageState(out / "unet.ckpt", cfg.checkpoint_minutes, unet=unet, opt=opt, ema=ema)
    unet.train()
    for step in range(state.start, cfg.unet_steps):
        g = seeded_generator(seed, "unet", step)
        idx = torch.multinomial(weights, cfg.unet_batch, replacement=True, generator=g).to(device)
        x0 = latents[idx].float() * scale
        ctx = uniq_ctx[inverse[idx]]
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.prompt_dropout
        ctx = torch.where(drop[:, None, None].to(device), empty_ctx[None], ctx)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=g)
        snr_w = _snr_weight(sched, t, cfg.snr_gamma).to(device)
        t = t.to(device)
        xt = sched.add_noise(x0, noise, t)
        for group in opt.param_groups:
            group["lr"] = cfg.unet_lr * _cosine(step, cfg.unet_steps, cfg.unet_warmup)
        err = (unet(xt, t, ctx).sample - noise).pow(2).flatten(1).mean(1)
        loss = (err * snr_w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(params)
        info = {"loss": float(loss.detach())}
        if eval_every and (step + 1) % eval_every == 0 and (out / "judge.safetensors").exists():
            state.save(step + 1)
            info.update(_quick_eval(out, cfg, seed))
        progress("unet", step + 1, cfg.unet_steps, info)
        state.stepped(step, cfg.unet_steps)


def export_pipeline(out: Path, cfg: TestbedConfig, folder: Path, dtype=torch.float32):
    """Assemble the pipeline from the checkpoints (EMA weights) and save it as a diffusers folder, every component
    in ``dtype`` (float32: plain ``StableDiffusionPipeline.from_pretrained(folder)`` then runs in one dtype; the
    transformers text encoder would otherwise load in the dtype it was stored in, the diffusers parts in float32)."""
    ck = _load(out / "unet.ckpt")
    unet, text = make_unet(cfg), _trained_text(out, cfg)
    unet.load_state_dict(ck["unet"])
    with torch.no_grad():
        for p, s in zip(unet.parameters(), ck["ema"]["shadow_params"]):
            p.copy_(s)
    vae = _trained_vae(out, cfg)
    vae.register_to_config(scaling_factor=float(_load(out / "latents.pt")["scaling_factor"]))
    pipe = assemble_pipeline(unet.eval(), vae, text.eval(), make_tokenizer(cfg, out / "tokenizer"))
    pipe.to(dtype=dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
    (Path(folder) / "testbed.json").write_text(json.dumps({"config": cfg.to_dict()}, indent=1, default=list))
    return pipe


def _quick_eval(out: Path, cfg: TestbedConfig, seed: int, n: int = 4) -> dict:
    """Judge accuracy of a few generations per style and object prompt with the current EMA weights."""
    import tempfile

    from ..sampling import generate
    from .judge import accuracy, load_judge_file

    with tempfile.TemporaryDirectory() as tmp:
        pipe = export_pipeline(out, cfg, Path(tmp) / "p", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge_file(out / "judge.safetensors")
    accs = {}
    for concept, prompt in [*((s, world.style_prompt(s)) for s in world.STYLES),
                            *((o, world.object_prompt(o)) for o in world.OBJECTS)]:
        imgs = generate(pipe, prompt, range(1000, 1000 + n), cfg.sample_steps, cfg.guidance_scale)
        accs[concept] = accuracy(judge, imgs, concept)
    return {"gen_acc": float(np.mean(list(accs.values()))), "gen_min": float(min(accs.values())),
            "worst": min(accs, key=accs.get)}


STAGE_FNS = {"data": stage_data, "vae": stage_vae, "latents": stage_latents, "judge": stage_judge, "text": stage_text,
             "unet": stage_unet}


TIMINGS_EVERY_S = 30.0  # how often a running stage's time is written to timings.json


def build_testbed(out: str | Path, cfg: TestbedConfig = DEFAULT, seed: int = 0, progress: Progress | None = None,
                  stages: tuple[str, ...] = STAGES, device: str = "cpu") -> dict:
    """Run (or resume) every stage into ``out``; the final pipeline lands in ``out/pipeline`` and the judge in
    ``out/judge.safetensors``. Returns ``{stage: seconds}`` of the stages run in this call and earlier ones.

    ``device`` trains the VAE, the judge, the text encoder and the UNet there (e.g. ``"cuda"``); batches and noise are still drawn on
    the CPU from the step-indexed generators, so a build resumes on another device (with that device's rounding)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress = progress or _noop
    for name in _INIT_PARTS if cfg.init_from else ():  # before any stage runs
        _init_folder(cfg, name)
    cfg_path = out / "config.json"
    cfg_json = json.dumps(cfg.to_dict(), sort_keys=True, default=list)
    if cfg_path.exists() and cfg_path.read_text() != cfg_json:
        raise ValueError(f"{out} holds a build with another configuration ({cfg_path}); use a new --out")
    cfg_path.write_text(cfg_json)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}

    def record(stage: str, since: float, base: float) -> None:
        timings[stage] = base + time.monotonic() - since
        atomic_write(timings_path, json.dumps(timings, indent=2) + "\n")

    for stage in stages:
        if (out / f"{stage}.done").exists():
            continue
        t0, base, last = time.monotonic(), timings.get(stage, 0.0), [time.monotonic()]

        def tracked(*args, stage=stage, t0=t0, base=base, last=last) -> None:
            # the time spent so far is saved as it goes, so that an interrupted stage's time still counts on resume
            if time.monotonic() - last[0] >= TIMINGS_EVERY_S:
                last[0] = time.monotonic()
                record(stage, t0, base)
            progress(*args)

        if stage == "export":
            export_pipeline(out, cfg, out / "pipeline")
        else:
            STAGE_FNS[stage](out, cfg, seed, tracked, device=device)
        record(stage, t0, base)
        (out / f"{stage}.done").write_text("")
    return timings
