"""Run an immunization method from a profile: data, the step loop, samples, checkpoints, resume, the saved model.

``immunize(...)`` writes ``runs/<id>/`` (see :mod:`engine.runs`): per-step scalars ``inner_loss/<concept>``,
``outer_loss``, ``prior_loss``, ``merge_residual``, ``grad_norm``, ``step_seconds``, ``peak_memory_mb``; sample images
``samples/<concept>`` every ``sample_every`` steps for each target and one non-target concept (fixed seeds);
checkpoints of the changed parameters (safetensors) under ``checkpoints/``; and the immunized model in ``model/``.
Batches are drawn from generators seeded by ``(seed, step, task, level)``, so ``--resume`` continues exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..image_sets import check_image_sets, load_image_set, profile_image_sets
from ..diffusion import concept_rows, seeded_generator, encode_images, encode_prompts, prompts_rows, training_scheduler
from ..editing import discriminative_basis, merge_projector
from ..models import kv_layer_names, param_names, pick_dtype
from ..profile import Concept, Profile
from . import MethodSpec, get_method
from .checkpoints import checkpoint_step, load_checkpoint, save_checkpoint
from .core import ADAM_IMPLEMENTATIONS, Batch, BiLevel, Preserve, StepStats, Subspace, Task, make_merge_fn
from .distributed import Split, current_split, process_device
from .errors import ImmunizationError, ImmunizationInterrupted, ImmunizationUsageError, NonFiniteCheckpoint

SAMPLE_SEEDS = (1000, 1001, 1002, 1003)


@dataclass
class ConceptData:
    name: str
    prompt: str
    context: torch.Tensor  # [L, c] prompt embedding
    class_context: torch.Tensor  # [L, c]
    rows: torch.Tensor  # [l, c] the merge's C_n
    latents: torch.Tensor  # [n, 4, h, w]
    prior: torch.Tensor  # [k, 4, h, w]


def draw_batch(c: ConceptData, batch: int, gen: torch.Generator, num_train_timesteps: int = 1000) -> Batch:
    """``batch`` instance images of ``c`` and as many prior images, with noise and timesteps, from ``gen``."""
    ii = torch.randint(0, len(c.latents), (batch,), generator=gen)
    pi = torch.randint(0, len(c.prior), (batch,), generator=gen)
    lat = torch.cat([c.latents[ii], c.prior[pi]])
    ctx = torch.cat([c.context.expand(batch, -1, -1), c.class_context.expand(batch, -1, -1)])
    noise = torch.randn(lat.shape, generator=gen).to(lat.device, lat.dtype)
    t = torch.randint(0, num_train_timesteps, (2 * batch,), generator=gen).to(lat.device)
    return Batch(lat, ctx.to(lat.dtype), noise, t, n_instance=batch)


def make_tasks(spec: MethodSpec, concepts: list[ConceptData], batch: int, seed: int, step: int,
               inner_steps: int = 1) -> list[Task]:
    def draw(c: ConceptData, level: str) -> Batch:
        return draw_batch(c, batch, seeded_generator(seed, step, c.name, level))

    more = [f"lower-{j}" for j in range(2, inner_steps + 1)]  # inner step 1 keeps its batch of one-step runs
    if spec.tasks == "joint":
        return [Task("joint", Batch.cat([draw(c, "lower") for c in concepts]),
                     Batch.cat([draw(c, "upper") for c in concepts]),
                     [Batch.cat([draw(c, level) for c in concepts]) for level in more])]
    return [Task(c.name, draw(c, "lower"), draw(c, "upper"), [draw(c, level) for level in more]) for c in concepts]


# ------------------------------------------------------------------------------------------- preparation


def lower_set(spec: MethodSpec, s) -> str:
    """The lower-level parameter set: the method's own, IMMA's adaptation, or ``[immunize] lower``."""
    if spec.lower:
        return spec.lower
    if spec.name == "imma":
        return s.imma_adaptation
    return s.lower_set


def upper_set(spec: MethodSpec, s) -> str:
    return spec.upper or s.upper_set


@dataclass
class Setup:
    spec: MethodSpec
    pipe: object
    concepts: list[ConceptData]
    samples: list[tuple[str, str]]  # (concept name, prompt) to draw every sample_every steps
    lower: list[str]
    upper: list[str]
    bilevel: BiLevel
    projector: object
    kv_names: set[str]
    split: Split | None = None  # this process's share of the tasks under a multi-process launch
    keep: KeepPool | None = None  # what the preservation term draws its batches from
    subspace: Subspace | None = None  # the plane the upper level's k/v updates are kept to


@dataclass
class KeepPool:
    """The preservation term's prompts (their embeddings) and the latents its noisy inputs are made from."""

    contexts: torch.Tensor  # [P, L, c]
    latents: torch.Tensor  # [n, 4, h, w]
    prompts: list[str]

    def draw(self, batch: int, gen: torch.Generator, num_train_timesteps: int = 1000) -> Batch:
        ci = torch.randint(0, len(self.contexts), (batch,), generator=gen)
        li = torch.randint(0, len(self.latents), (batch,), generator=gen)
        lat = self.latents[li]
        noise = torch.randn(lat.shape, generator=gen).to(lat.device, lat.dtype)
        t = torch.randint(0, num_train_timesteps, (batch,), generator=gen).to(lat.device)
        return Batch(lat, self.contexts[ci].to(lat.dtype), noise, t, n_instance=batch)


def keep_prompts(profile: Profile, others: list[Concept]) -> list[str]:
    """The prompts the preservation term sees (``[immunize] preserve_prompts``)."""
    which = profile.immunize.preserve_prompts
    out = [c.prompt for c in others] if which in ("others", "both") else []
    if which in ("captions", "both"):
        out += profile.regularization_captions()
    return list(dict.fromkeys(out))


def prepare(pipe, profile: Profile, spec: MethodSpec, targets: list[Concept], others: list[Concept],
            base_pipe_fn: Callable[[], object], cache_dir: Path | None, progress=None) -> Setup:
    s = profile.immunize
    alternating = spec.algorithm == "alternating"
    gradient = "first-order" if alternating else s.gradient
    if s.inner_steps > 1 and gradient != "first-order":
        raise ImmunizationUsageError(f"immunize.inner_steps = {s.inner_steps} needs immunize.gradient = "
                                     f"\"first-order\" (it is {gradient!r}): nothing is carried back through inner "
                                     "steps 2..K")
    unet, vae = pipe.unet, pipe.vae
    size = s.resolution
    gen_kw = dict(pipe_fn=base_pipe_fn, model_key=profile.model.base, steps=profile.model.sample_steps,
                  guidance=profile.model.guidance, cache_dir=cache_dir)
    concepts = []
    for i, c in enumerate(targets):
        imgs = load_image_set(c.images.immunize, prompt=c.prompt, size=size, concept=c.name, **gen_kw)
        reg = profile.regularization.images_for(c.class_prompt)
        prior = load_image_set(reg, prompt=c.class_prompt, size=size, **gen_kw)
        ctx = encode_prompts(pipe.text_encoder, pipe.tokenizer, [c.prompt, c.class_prompt])
        concepts.append(ConceptData(
            c.name, c.prompt, ctx[0], ctx[1], concept_rows(pipe.text_encoder, pipe.tokenizer, c.prompt),
            encode_images(vae, imgs, size), encode_images(vae, prior, size)))
        if progress:
            progress("data", i + 1, len(targets), {"concept": c.name})
    lower = param_names(unet, lower_set(spec, s))
    upper = param_names(unet, upper_set(spec, s))
    kv = set(kv_layer_names(unet)) & set(lower)
    projector = None
    if spec.merge and len(concepts) > 1 and kv or spec.algorithm == "alternating":
        captions = profile.regularization_captions()
        reg_rows = torch.cat(prompts_rows(pipe.text_encoder, pipe.tokenizer, captions))
        projector = merge_projector([c.rows for c in concepts], reg_rows, s.merge.ridge, s.merge.mu)
    samples = [(c.name, c.prompt) for c in targets] + [(c.name, c.prompt) for c in others[:1]]
    for name, p in unet.named_parameters():
        p.requires_grad_(name in set(lower) | set(upper))
    merge_fn = make_merge_fn(projector, kv) if projector is not None and (spec.merge or alternating) else None
    params = dict(unet.named_parameters())
    anchor = None
    if merge_fn is not None and s.merge.anchor == "pretrained" and not alternating:
        anchor = {k: params[k].detach().clone() for k in lower}
    preserve, keep, subspace = None, None, None
    if s.preserve_weight > 0 or s.subspace == "target":
        prompts = keep_prompts(profile, others)
        if not prompts:
            raise ImmunizationError("immunize.preserve_weight > 0 or subspace = 'target' but there are no prompts "
                                    f"to keep (preserve_prompts = {s.preserve_prompts!r} and the group has no other "
                                    "concepts)")
        with torch.no_grad():  # noisy prior (class) latents under the kept prompts: the inputs only; the parent's
            contexts = encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts)  # prediction is the target
        keep = KeepPool(contexts, torch.cat([c.prior for c in concepts]), prompts)
    if s.preserve_weight > 0:
        preserve = Preserve(s.preserve_weight, {k: params[k].detach().clone() for k in upper}, s.preserve_at)
    if s.subspace == "target":
        names = [k for k in kv_layer_names(unet) if k in set(upper)]  # every upper set holds them
        kept_others = {c.prompt for c in others}
        other = torch.tensor([p in kept_others for p in keep.prompts])  # else a caption
        basis = discriminative_basis(torch.cat([c.context for c in concepts]),
                                     [keep.contexts[other].flatten(0, 1), keep.contexts[~other].flatten(0, 1)],
                                     min(s.subspace_rank, keep.contexts.shape[-1]), s.subspace_ridge)
        subspace = Subspace(basis, {k: params[k].detach().clone() for k in names})
    keep = keep if s.preserve_weight > 0 else None
    bilevel = BiLevel(unet, training_scheduler(pipe), lower, upper, s.inner_lr, s.prior_weight, gradient, s.fd_eps,
                      merge_fn, anchor, s.fd_scheme, preserve, s.ascent, s.ascent_cap, s.gradient_checkpointing,
                      None if s.autocast == "off" else pick_dtype(s.autocast))
    return Setup(spec, pipe, concepts, samples, lower, upper, bilevel, projector, kv, keep=keep, subspace=subspace)


def inner_lr_at(s, seed: int, step: int) -> float:
    """α of outer step ``step``: ``s.inner_lr``, or a log-uniform draw from ``[inner_lr, inner_lr_max]`` that depends
    on ``(seed, step)`` only."""
    if s.inner_lr_max is None:
        return s.inner_lr
    u = float(torch.rand((), generator=seeded_generator(seed, step, "inner_lr"), dtype=torch.float64))
    lo, hi = math.log(s.inner_lr), math.log(s.inner_lr_max)
    return math.exp(lo + u * (hi - lo))


def outer_step(setup: Setup, opt, profile: Profile, step: int) -> StepStats:
    """One outer step: the meta-gradient (or the alternating scheme's gradient), then the ascent step."""
    s = profile.immunize
    setup.bilevel.inner_lr = inner_lr_at(s, profile.model.seed, step)
    tasks = make_tasks(setup.spec, setup.concepts, s.batch, profile.model.seed, step, s.inner_steps)
    keep = (setup.keep.draw(s.preserve_batch, seeded_generator(profile.model.seed, step, "preserve", "upper"))
            if setup.keep is not None else None)
    core = setup.bilevel
    fn = core.alternating_gradient if setup.spec.algorithm == "alternating" else core.meta_gradient
    grads, stats = fn(tasks, setup.split, keep)
    _check_finite(stats, step)
    if setup.subspace is not None:
        setup.subspace.project(grads)
    for k, g in grads.items():
        core.params[k].grad = g.to(core.params[k].dtype)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if setup.subspace is not None:
        setup.subspace.restore(core.params)
    return stats


def _check_finite(stats: StepStats, step: int) -> None:
    values = [stats.outer_loss, stats.prior_loss, stats.grad_norm, *stats.inner_loss.values()]
    if not all(np.isfinite(values)):
        raise ImmunizationError(f"non-finite loss or gradient at step {step}")


# ------------------------------------------------------------------------------------------------ loop


def log_samples(logger, setup: Setup, profile: Profile, step: int) -> None:
    from PIL import Image

    from ..sampling import generate

    for name, prompt in setup.samples:
        imgs = generate(setup.pipe, prompt, SAMPLE_SEEDS, profile.model.sample_steps, profile.model.guidance)
        logger.log_image(f"samples/{name}", step, Image.fromarray(np.concatenate(list(imgs), axis=1)), concept=name)


def run_loop(setup: Setup, profile: Profile, logger, run_dir: Path, start_step: int = 0, opt=None,
             progress=None, interrupt=None) -> int:
    """Steps ``start_step+1 .. steps``; returns the last step done. Ctrl-C (``interrupt.hit``, checked between steps)
    checkpoints the last finished step, then raises ``KeyboardInterrupt``. ``logger`` and ``run_dir`` are None on
    the processes other than the first of a multi-process launch: they compute and write nothing."""
    s = profile.immunize
    step_fn = outer_step
    params = dict(setup.pipe.unet.named_parameters())
    dev = next(iter(params.values())).device
    step = done = start_step  # done: the last step whose update the weights hold
    try:
        for step in range(start_step + 1, s.steps + 1):
            t0 = time.perf_counter()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            stats = step_fn(setup, opt, profile, step)
            done = step
            if logger is None:
                if interrupt is not None and interrupt.hit:
                    raise KeyboardInterrupt
                continue
            for name, v in stats.inner_loss.items():
                logger.log_scalar(f"inner_loss/{name}", v, step, concept=name)
            logger.log_scalar("outer_loss", stats.outer_loss, step)
            logger.log_scalar("prior_loss", stats.prior_loss, step)
            if setup.keep is not None:
                logger.log_scalar("preserve_loss", stats.preserve_loss, step)
            logger.log_scalar("merge_residual", stats.merge_residual, step)
            logger.log_scalar("grad_norm", stats.grad_norm, step)
            if s.inner_lr_max is not None:
                logger.log_scalar("inner_lr", setup.bilevel.inner_lr, step)
            logger.log_scalar("step_seconds", time.perf_counter() - t0, step)
            if dev.type == "cuda":
                logger.log_scalar("peak_memory_mb", torch.cuda.max_memory_allocated(dev) / 2**20, step)
            logger.progress(step, s.steps)
            if progress:
                progress("immunize", step, s.steps, {"outer": stats.outer_loss})
            if s.sample_every and step % s.sample_every == 0:
                log_samples(logger, setup, profile, step)
            if s.checkpoint_every and step % s.checkpoint_every == 0 and step < s.steps:
                save_checkpoint(run_dir, setup, opt, step)
            if interrupt is not None and interrupt.hit:
                save_checkpoint(run_dir, setup, opt, step)
                raise KeyboardInterrupt
    except ImmunizationError as e:
        if run_dir is None:
            raise
        why = str(e)
        if not isinstance(e, NonFiniteCheckpoint) and done > (checkpoint_step(run_dir) or 0):
            try:
                save_checkpoint(run_dir, setup, opt, done)
            except NonFiniteCheckpoint as refused:
                why += f"; {refused}"
        kept = checkpoint_step(run_dir)
        raise ImmunizationError(why + (f"; the last good checkpoint holds step {kept}" if kept else
                                       "; no checkpoint was kept (--resume starts again from step 0)")) from None
    return step


def make_optimizer(setup: Setup, profile: Profile):
    params = dict(setup.pipe.unet.named_parameters())
    s = profile.immunize
    return torch.optim.AdamW([params[k] for k in setup.upper], lr=s.outer_lr, weight_decay=s.weight_decay,
                             maximize=True, **ADAM_IMPLEMENTATIONS[s.adam])


class _DeferredInterrupt:
    """Ctrl-C sets a flag that the loop checks between steps, so a checkpoint never holds a half-applied step."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.hit:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def find_erase_run(runs_dir: Path, profile_name: str | None, group: str | None, base: str) -> Path | None:
    """The newest finished erase run of this profile, group and base model."""
    from ..runs import newest

    st = newest(runs_dir, "erase", group=group, profile=profile_name, where=lambda s: s.extra.get("base") == base)
    return Path(runs_dir) / st.id if st is not None else None


def immunize(profile: Profile | None, *, runs_dir: str | Path, group: str | None = None, method: str | None = None,
             profile_name: str | None = None, parent: str | None = None, device: str | None = None,
             resume: str | None = None, progress=None) -> Path:
    """Immunize the group's target concepts with ``method`` (default ``[immunize] method``); returns the run dir.

    ``parent``: the model to start from (a run id / run dir / model reference). Default: the newest finished
    erase run of this profile and group when ``[erase] method = "uce"`` (one is made first if there is none), else
    ``[model] base``. ``resume``: the id of an interrupted run to continue from its last checkpoint.
    """
    from ..models import load_pipeline, model_hash, pick_device, save_model
    from ..runs import RunWriter, find_run, read_status

    runs_dir = Path(runs_dir)
    if resume:
        run_dir = find_run(runs_dir, resume)
        st = read_status(run_dir)
        if st.get("kind") != "immunize":
            raise ImmunizationUsageError(f"{run_dir.name} is not an immunization run (kind {st.get('kind')!r})")
        from ..profile import load_profile

        profile = load_profile(run_dir / "profile.toml")
        group, method = st.get("group"), st.get("method")
        parent = (st.get("extra") or {}).get("parent_model") or st.get("parent")
        profile_name = st.get("profile")
    method = method or profile.immunize.method
    spec = get_method(method)
    grp = profile.group(group) if group else None
    targets = list(grp.targets) if grp else list(profile.concepts)
    others = list(grp.others) if grp else []
    if spec.tasks == "single":
        name = profile.immunize.imma_concept or targets[0].name
        chosen = [c for c in targets if c.name == name]
        if not chosen:
            raise ImmunizationUsageError(f"immunize.imma_concept {name!r} is not a target of group {group!r}")
        others = [c for c in targets if c.name != name] + others
        targets = chosen
    check_image_sets(profile_image_sets(profile, [c.name for c in targets], ("immunize",)), path=profile_name)
    base = profile.model.base
    dev = process_device(pick_device(device or profile.model.device))
    split = current_split(cpu=dev.type != "cuda")
    main = split is None or split.main
    progress = progress if main else None
    if parent is None and profile.erase.method == "uce":
        found = find_erase_run(runs_dir, profile_name, group, base)
        if found is None and main:
            from ..erase import erase

            found = erase(profile, runs_dir=runs_dir, group=group, profile_name=profile_name, device=device,
                          progress=progress)
        if split is not None:
            split.barrier()  # the first process erases; the others then find its run
            found = found or find_erase_run(runs_dir, profile_name, group, base)
        parent = str(found)
    parent_ref = parent or base
    dtype = pick_dtype(profile.model.dtype)
    pipe = load_pipeline(parent_ref, dev, dtype)
    parent_id = Path(parent_ref).name if Path(parent_ref).is_dir() and (Path(parent_ref) / "status.json").exists() else None
    base_pipe_cache: dict = {}

    def base_pipe():
        if "p" not in base_pipe_cache:
            base_pipe_cache["p"] = load_pipeline(base, dev, dtype)
        return base_pipe_cache["p"]

    setup = prepare(pipe, profile, spec, targets, others, base_pipe, runs_dir / ".cache", progress)
    setup.split = split
    if profile.immunize.gradient == "exact" and spec.algorithm == "bilevel":
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())  # SDPA kernels have no double backward
    opt = make_optimizer(setup, profile)
    if not main:  # another process of a launch: same steps, nothing written
        with _DeferredInterrupt() as intr:
            run_loop(setup, profile, None, None, load_checkpoint(run_dir, setup, opt) if resume else 0, opt,
                     interrupt=intr)
        return Path(split.gather(None)[0])
    parent_hash = model_hash(pipe)
    writer = RunWriter(
        runs_dir, "immunize", method=method, profile=profile if not resume else None, profile_name=profile_name,
        group=group, concepts=[c.name for c in targets], parent=parent_id or (None if parent_ref == base else parent_ref),
        base_model_hash=parent_hash, run_id=resume, resume=bool(resume),
        extra={"parent_model": str(parent_ref), "base": base, "anchor": profile.immunize.merge.anchor,
               "gradient": profile.immunize.gradient, "lower": lower_set(spec, profile.immunize),
               "upper": upper_set(spec, profile.immunize), "others": [c.name for c in others],
               "processes": split.world if split else 1},
    )
    with writer:
        start = load_checkpoint(writer.dir, setup, opt) if resume else 0
        writer.log_status(f"{method}: {len(targets)} target(s), steps {start + 1}..{profile.immunize.steps}, "
                          f"merge anchor {profile.immunize.merge.anchor}, gradient {profile.immunize.gradient}"
                          + (f", concepts split across {split.world} processes" if split else "")
                          + (" (LABELLED REPRODUCTION of the released code's scheme)" if spec.algorithm == "alternating" else ""))
        try:
            with _DeferredInterrupt() as intr:
                last = run_loop(setup, profile, writer, writer.dir, start, opt, progress, interrupt=intr)
        except KeyboardInterrupt as e:
            raise ImmunizationInterrupted(writer.dir.name, checkpoint_step(writer.dir)) from e
        save_checkpoint(writer.dir, setup, opt, last)
        if profile.immunize.gradient == "exact":
            pipe.unet.set_default_attn_processor()
        for p in pipe.unet.parameters():
            p.requires_grad_(False)
        save_model(pipe, writer.dir / "model", base=base, full=False)
        if profile.utility.enabled:
            from ..metrics.utility import measure_run_utility

            writer.set_phase("utility")
            measure_run_utility(writer, profile, [c.name for c in targets], [c.name for c in others],
                                model=(lambda: pipe, model_hash(pipe)),
                                parent=(lambda: load_pipeline(parent_ref, dev, dtype), parent_hash),
                                base=(base_pipe, None), cache_dir=runs_dir / ".cache", device=str(dev),
                                progress=progress)
        writer.finish()
    if split is not None:
        split.gather(str(writer.dir))
    return writer.dir
