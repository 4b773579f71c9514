"""Step time and peak memory of immunization steps at Stable Diffusion scale (random weights, no download).

    python -m engine.bench --arch sd1 --device cuda            # SD v1.4 UNet architecture, bf16 autocast
    python -m engine.bench --arch testbed --device cpu         # the testbed UNet on the CPU

Imports only torch, numpy and diffusers (it runs where the rest of mima is not installed). Prints one JSON line per
measurement: ``{"name", "mode", "n", "seconds" (median after warm-up), "peak_gib", "device", "arch", ...}``.
Measured: a plain fine-tuning step (fwd + bwd + AdamW, batch 2 = instance + prior); the ``alternating`` scheme of
the released code; ``mima`` in ``exact`` (classic attention: SDPA kernels have no double backward), ``fd`` and
``first-order`` for each N. Configurations predicted not to fit in the device's memory are skipped (a JSON line says so).

    python -m engine.bench --memory --arch sd1 --n 1 2 3 --latent 8   # bytes by component on the CPU, and the model

``--memory`` counts what one mima step holds, by component (:func:`memory`, :mod:`engine.memory`), and fits each
component's constant and per-concept bytes (:func:`memory_model`), with the peak predicted at 64x64 in bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

SD1_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD2_UNET = dict(SD1_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
TEXT = {"sd1": (77, 768), "sd2": (77, 1024)}
STEP_GIB = {"fine-tune": (17.8, 0.0), "exact": (13.1, 38.0), "fd": (41.7, 16.0), "first-order": (41.5, 13.0)}
"""Peak GiB of one step at SD 1.x shapes as ``(base, per concept)``: the line through the measurements at N = 2 and 3
(one H200, batch 2 per concept at 64x64 latents, bf16 autocast; table in benchmarks/README.md), with every concept's
upper batch run at once. The step runs them one at a time, so for fd and first-order the per-concept slope is an
upper bound; the CPU memory model (:func:`memory_model`, benchmarks/README.md) predicts at most ~15 GiB for fd and
first-order at N = 3 and 10. ``run`` skips the exact rows predicted above 90% of the card instead of running them."""


def predicted_gib(mode: str, n: int) -> float:
    """Predicted peak GiB of a ``mode`` step (``fine-tune``, ``exact``, ``fd``, ``first-order``) for N concepts at SD 1.x
    shapes, 512 px, one instance and one prior image per concept (:data:`STEP_GIB`)."""
    base, per = STEP_GIB[mode]
    return base + per * n


def build_unet(arch: str):
    """A randomly initialised UNet of ``arch`` (sd1, sd2, testbed) and its (text length, text width)."""
    from diffusers import UNet2DConditionModel

    if arch == "testbed":
        from .testbed.build import DEFAULT, make_unet

        return make_unet(DEFAULT), (DEFAULT.max_length, DEFAULT.text_width)
    cfg = {"sd1": SD1_UNET, "sd2": SD2_UNET}[arch]
    return UNet2DConditionModel(**cfg), TEXT[arch]


def synthetic_tasks(n: int, unet, text: tuple[int, int], device, seed: int = 0):
    """``n`` tasks with random latents and text (1 instance + 1 prior image per batch)."""
    from .immunize.core import Batch, Task

    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size

    def batch():
        return Batch(torch.randn(2, 4, size, size, generator=g).to(device),
                     torch.randn(2, *text, generator=g).to(device),
                     torch.randn(2, 4, size, size, generator=g).to(device),
                     torch.randint(0, 1000, (2,), generator=g).to(device), n_instance=1)

    return [Task(f"c{i}", batch(), batch()) for i in range(n)]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, device, repeats: int = 5, warmup: int = 2) -> tuple[float, float]:
    """Median seconds of ``step()`` after ``warmup`` calls, and the peak GiB allocated (CUDA; 0 elsewhere)."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return statistics.median(times), peak


def _step_sets(unet):
    """The scheduler and the parameter sets of every measured step: lower ``unet``, upper ``xattn``, the k/v weights."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    names = [k for k, _ in unet.named_parameters()]
    upper = [k for k in names if ".attn2." in k]
    kv = {k for k in upper if (".to_k." in k or ".to_v." in k) and k.endswith(".weight")}
    return sched, names, upper, kv


def mima_step(unet, text: tuple[int, int], n: int, mode: str, inner_lr: float = 1e-5, **switches):
    """A :class:`~engine.immunize.core.BiLevel` for ``n`` random concepts (6 merge rows each, 200 regularisation
    rows, ridge 1e-2) and their synthetic tasks, on ``unet``'s device; ``switches``: BiLevel's ``checkpointing`` and
    ``autocast``."""
    from .editing import merge_projector
    from .immunize.core import BiLevel, make_merge_fn

    dev = next(unet.parameters()).device
    sched, names, upper, kv = _step_sets(unet)
    g = torch.Generator().manual_seed(1)
    proj = merge_projector([torch.randn(6, text[1], generator=g).to(dev) for _ in range(n)],
                           torch.randn(200, text[1], generator=g).to(dev), ridge=1e-2)
    core = BiLevel(unet, sched, names, upper, inner_lr, 1.0, mode, 1e-3, make_merge_fn(proj, kv), **switches)
    return core, synthetic_tasks(n, unet, text, dev, seed=n)


def upper_step(core, tasks, opt, alternating: bool = False, tracker=None) -> None:
    """One outer step: the meta-gradient (or the alternating scheme's gradient) into ``.grad``, then ``opt``. With a
    :class:`~engine.memory.MemoryTracker`, what the optimiser creates is counted as ``optimizer``."""
    grads, _ = (core.alternating_gradient if alternating else core.meta_gradient)(tasks)
    for k, g in grads.items():
        core.params[k].grad = g
    del grads
    if tracker is not None:
        tracker.phase = "optimizer"
    opt.step()
    opt.zero_grad(set_to_none=True)
    if tracker is not None:
        tracker.phase = "step"


def run(arch: str = "sd1", device: str = "cuda", ns=(2, 3, 10), modes=("exact", "fd", "first-order"),
        repeats: int = 5, warmup: int = 2, autocast: bool | None = None, inner_lr: float = 1e-5,
        emit=lambda row: None, checkpointing: bool = False) -> list[dict]:
    """One row per measured step (see the module's docstring); ``checkpointing``: the mima ``fd`` and
    ``first-order`` steps with block-wise gradient checkpointing (the plain and alternating steps as they are)."""
    from diffusers.models.attention_processor import AttnProcessor

    from .immunize.core import BiLevel

    dev = torch.device(device)
    autocast = dev.type == "cuda" if autocast is None else autocast
    torch.manual_seed(0)
    unet, text = build_unet(arch)
    unet = unet.to(dev)
    sched, names, upper, _ = _step_sets(unet)
    total_gib = torch.cuda.get_device_properties(dev).total_memory / 2**30 if dev.type == "cuda" else float("inf")
    rows = []
    base = {"arch": arch, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "autocast": "bf16" if autocast else "off", "params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1)}

    def ctx():
        return torch.autocast(dev.type, dtype=torch.bfloat16) if autocast else torch.autocast(dev.type, enabled=False)

    def record(name, mode, n, fn):
        try:
            with ctx():
                seconds, peak = measure(fn, dev, repeats, warmup)
            row = {**base, "name": name, "mode": mode, "n": n, "seconds": round(seconds, 4), "peak_gib": round(peak, 2),
                   "checkpointing": unet.is_gradient_checkpointing}  # as the measured step's BiLevel set it
        except torch.OutOfMemoryError:  # a row that does not fit is a result; the next ones may fit
            row = {**base, "name": name, "mode": mode, "n": n, "skipped": f"out of memory ({total_gib:.0f} GiB)"}
        rows.append(row)
        emit(row)
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def plain_step():
        """A plain fine-tuning step; its AdamW state is freed once the measurement drops the step."""
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-6)
        core0 = BiLevel(unet, sched, names, upper, inner_lr, 1.0, "first-order")
        (task,) = synthetic_tasks(1, unet, text, dev)

        def step():
            core0.inner_objective({}, task.lower).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    record("plain", "fine-tune", 1, plain_step())
    for p in unet.parameters():
        p.grad = None
    up_opt = torch.optim.AdamW([dict(unet.named_parameters())[k] for k in upper], lr=1e-6, maximize=True)

    def make(n, mode, switch=True):
        return mima_step(unet, text, n, mode, inner_lr, checkpointing=switch and checkpointing and mode != "exact")

    def stepper(core, tasks, alternating=False):
        return lambda: upper_step(core, tasks, up_opt, alternating)

    core, tasks = make(3, "first-order", switch=False)
    state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    record("alternating", "first-order", 3, stepper(core, tasks, alternating=True))
    unet.load_state_dict(state)
    for n in ns:
        for mode in modes:
            if mode == "exact":
                need = predicted_gib("exact", n) if arch != "testbed" else 0.0
                if need > 0.9 * total_gib:
                    row = {**base, "name": "mima", "mode": mode, "n": n, "skipped": f"predicted {need:.0f} GiB > "
                           f"0.9 x {total_gib:.0f} GiB"}
                    rows.append(row)
                    emit(row)
                    continue
                unet.set_attn_processor(AttnProcessor())
            core, tasks = make(n, mode)
            record("mima", mode, n, stepper(core, tasks))
            unet.load_state_dict(state)
            if mode == "exact":
                unet.set_default_attn_processor()
    return rows


def agreement(arch: str = "sd1", device: str = "cuda", n: int = 2, latent: int | None = None,
              autocast: bool | None = None, inner_lr: float = 1e-5) -> dict:
    """Cosine between the ``fd`` meta-gradient (bf16 autocast on a GPU, SDPA attention) and the ``exact`` one
    (float32, classic attention with a double backward) for the same random UNet, tasks and merge.

    ``latent`` (default: the architecture's) shrinks the latents, not the network: an exact float32 step at SD 1.x
    shapes needs about twice the bf16 figure in :data:`STEP_GIB`, beyond one card at 64x64 for N = 2."""
    from diffusers.models.attention_processor import AttnProcessor

    dev = torch.device(device)
    autocast = dev.type == "cuda" if autocast is None else autocast
    torch.manual_seed(0)
    unet, text = build_unet(arch)
    if latent:
        unet.register_to_config(sample_size=latent)
    unet = unet.to(dev)

    def meta(mode, amp=False):
        core, tasks = mima_step(unet, text, n, mode, inner_lr)  # the merge's projector in float32
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            grads, _ = core.meta_gradient(tasks)
        return torch.cat([grads[k].double().flatten() for k in core.upper])

    unet.set_attn_processor(AttnProcessor())
    exact = meta("exact")
    unet.set_default_attn_processor()
    fd = meta("fd", autocast)
    first = meta("first-order")
    cos = float(fd @ exact / (fd.norm() * exact.norm()))
    return {"arch": arch, "name": "agreement", "n": n, "latent": unet.config.sample_size,
            "fd": "bf16" if autocast else "fp32", "exact": "fp32", "cosine_fd_exact": round(cos, 6),
            "cosine_first_order_exact": round(float(first @ exact / (first.norm() * exact.norm())), 6)}


MODEL_COMPONENTS = ("params", "optimizer", "copies", "kv copies", "gradients", "parameter-shaped", "activations",
                    "other", "peak")


def memory(arch: str = "sd1", ns=(1, 2, 3), modes=("exact", "fd", "first-order"), latent: int = 8,
           inner_lr: float = 1e-5, emit=lambda row: None, checkpointing: bool = False, adam: str = "auto",
           autocast: bool = False) -> list[dict]:
    """Bytes held by one mima step (meta-gradient, then AdamW on ``S^u``) by component (:mod:`engine.memory`), for
    each mode and N: float32 on the CPU, random weights, ``latent`` x ``latent`` latents. One row per step, bytes:
    ``params`` and ``kv`` (held before the step), ``peak`` (parameters + the most the step's tensors held at once),
    each component's own maximum during the step, and ``at_peak`` (the components at the peak). The switches are the
    profile's ``[immunize]`` ones: ``gradient_checkpointing``, ``adam`` and ``autocast = "bfloat16"``."""
    from diffusers.models.attention_processor import AttnProcessor

    from .immunize.core import ADAM_IMPLEMENTATIONS
    from .memory import COMPONENTS, MemoryTracker, storage_bytes

    torch.manual_seed(0)
    unet, text = build_unet(arch)
    unet.register_to_config(sample_size=latent)
    params = dict(unet.named_parameters())
    _, _, upper, kv = _step_sets(unet)
    held = {"params": storage_bytes(params.values()), "kv": storage_bytes(params[k] for k in kv)}
    rows = []
    for mode in modes:
        if mode == "exact":
            unet.set_attn_processor(AttnProcessor())
        for n in ns:
            core, tasks = mima_step(unet, text, n, mode, inner_lr, checkpointing=checkpointing and mode != "exact",
                                    autocast=torch.bfloat16 if autocast else None)
            opt = torch.optim.AdamW([params[k] for k in upper], lr=1e-6, maximize=True, **ADAM_IMPLEMENTATIONS[adam])
            with MemoryTracker(params.items(), kv) as mem:
                upper_step(core, tasks, opt, tracker=mem)
            row = {"name": "memory", "arch": arch, "mode": mode, "n": n, "latent": latent, "dtype": "fp32",
                   "autocast": "bf16" if autocast else "off", "checkpointing": core.checkpointing,
                   "adam": adam, **held,
                   "peak": held["params"] + mem.peak, **{k: mem.most[k] for k in COMPONENTS},
                   "at_peak": mem.at_peak}
            rows.append(row)
            emit(row)
            del core, tasks, opt, mem
        unet.set_default_attn_processor()
    return rows


def memory_model(rows: list[dict], latent: int = 64, ns=(3, 10)) -> list[dict]:
    """For each mode measured at two N or more: every component's ``(constant, per concept)`` bytes, the least-squares
    line through the :func:`memory` rows, and the predicted peak GiB at ``latent`` x ``latent`` latents under bf16
    autocast for each of ``ns``. The prediction is an upper bound: the sum of each component's own maximum; fp32
    parameters, optimiser state and parameter-shaped tensors (copies and gradients) as measured; a bf16 cast of every
    weight held at once (autocast saves the casts for backward; the fp32 rows have none); saved activations and other
    temporaries (forward and backward intermediates) times the latent area ratio and halved for bf16, all of them,
    also those that do not grow with the latents (the text's keys and values). Area, not its square, holds where
    attention does not store its score matrix (SDPA's flash and memory-efficient kernels); ``exact`` runs the classic
    processor, whose scores grow with the square of the area, so it is not predicted; nor are rows measured under
    autocast (their saved bf16 casts of the weights do not grow with the latents, their activations do). Rows are
    fitted per mode and switches (``checkpointing``, ``adam``, ``autocast``)."""
    import numpy as np

    def key(r):
        return r["mode"], r["checkpointing"], r["adam"], r["autocast"]

    out = []
    for mode, checkpointing, adam, autocast in dict.fromkeys(key(r) for r in rows):
        rs = [r for r in rows if key(r) == (mode, checkpointing, adam, autocast)]
        ns_m = [r["n"] for r in rs]
        if len(set(ns_m)) < 2:
            continue
        fit = {}
        for k in MODEL_COMPONENTS:
            slope, const = np.polyfit(ns_m, [r[k] for r in rs], 1)
            fit[k] = (float(const), float(slope))
        area = (latent / rs[0]["latent"]) ** 2

        def at(k, n):
            return fit[k][0] + fit[k][1] * n

        def predict(n):
            held = at("params", n) + at("optimizer", n) + at("parameter-shaped", n)
            return (held + 0.5 * rs[0]["params"] + 0.5 * area * (at("activations", n) + at("other", n))) / 2**30

        out.append({"name": "memory-model", "arch": rs[0]["arch"], "mode": mode, "checkpointing": checkpointing,
                    "adam": adam, "measured_autocast": autocast, "measured_n": ns_m,
                    "measured_latent": rs[0]["latent"], "kv": rs[0]["kv"],
                    "constant": {k: round(c) for k, (c, _) in fit.items()},
                    "per_concept": {k: round(p) for k, (_, p) in fit.items()},
                    "latent": latent, "autocast": "bf16",
                    "predicted_gib": {n: None if mode == "exact" or autocast != "off" else round(predict(n), 1)
                                      for n in ns}})
    return out


def main(argv=None) -> int:
    from .immunize.core import ADAM_IMPLEMENTATIONS

    ap = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=("sd1", "sd2", "testbed"), default="sd1")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, nargs="+", default=[2, 3, 10])
    ap.add_argument("--modes", nargs="+", default=["exact", "fd", "first-order"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--agreement", action="store_true",
                    help="only the cosine of fd (bf16) and exact (fp32) meta-gradients at the first --n")
    ap.add_argument("--memory", action="store_true",
                    help="bytes held by component (float32 on the CPU) for each --n and mode, then the fitted model")
    ap.add_argument("--checkpointing", action="store_true",
                    help="mima's fd and first-order steps with block-wise gradient checkpointing ([immunize] "
                         "gradient_checkpointing)")
    ap.add_argument("--adam", choices=tuple(ADAM_IMPLEMENTATIONS), default="auto",
                    help="--memory: the upper AdamW's implementation ([immunize] adam)")
    ap.add_argument("--autocast", action="store_true",
                    help="--memory: the passes under bf16 autocast ([immunize] autocast = \"bfloat16\")")
    ap.add_argument("--latent", type=int, default=None,
                    help="latent size of the --agreement check and of --memory (default 8)")
    args = ap.parse_args(argv)

    def emit(row):
        sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()

    if args.agreement:
        emit(agreement(args.arch, args.device, args.n[0], args.latent))
    elif args.memory:
        for row in memory_model(memory(args.arch, args.n, args.modes, args.latent or 8, emit=emit,
                                       checkpointing=args.checkpointing, adam=args.adam, autocast=args.autocast)):
            emit(row)
    else:
        run(args.arch, args.device, args.n, args.modes, args.repeats, args.warmup, emit=emit,
            checkpointing=args.checkpointing)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
