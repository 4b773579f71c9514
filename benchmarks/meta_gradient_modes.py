"""How far the first-order and finite-difference meta-gradients are from the exact one, on a real model.

    python benchmarks/meta_gradient_modes.py [--profile testbed] [--method mima] [--lr 1e-5 1e-4 1e-3] [--steps 3]

Prepares the profile's first group exactly as ``mima immunize`` does (its images, prior images, merge projector,
parameter sets; the model is ``[model] base``, not an erased one), then for each inner learning rate and each of
the first ``--steps`` outer steps' task draws computes the meta-gradient of ``S^u`` in four ways on the same
data, timesteps and noise. Prints one JSON line per (lr, step): the cosine and relative distance to ``exact`` of
``first-order``, ``fd`` (central differences) and ``fd_forward`` (``fd_scheme = "forward"``), and the relative
size of the second-order term ``|exact - first-order| / |exact|``.
Attention runs on diffusers' ``AttnProcessor`` (SDPA kernels have no double backward). On the testbed the numbers
are testbed numbers.
"""

from __future__ import annotations

import argparse
import json

import torch


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[k].detach().double().flatten() for k in sorted(grads)])


def compare(exact: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    cos = float(torch.nn.functional.cosine_similarity(exact, other, dim=0))
    rel = float((other - exact).norm() / exact.norm())
    return {"cosine": round(cos, 6), "rel_dist": float(f"{rel:.3e}")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="testbed")
    ap.add_argument("--method", default="mima")
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from diffusers.models.attention_processor import AttnProcessor

    from engine.immunize import get_method
    from engine.immunize.runner import make_tasks, prepare
    from engine.models import load_pipeline, pick_dtype
    from engine.profile import load_profile

    profile = load_profile(args.profile)
    grp = profile.group(next(iter(profile.groups))) if profile.groups else None
    targets = list(grp.targets) if grp else list(profile.concepts)
    others = list(grp.others) if grp else []
    pipe = load_pipeline(profile.model.base, torch.device(args.device), pick_dtype(profile.model.dtype))
    pipe.unet.set_attn_processor(AttnProcessor())
    setup = prepare(pipe, profile, get_method(args.method), targets, others, lambda: pipe, None)
    core = setup.bilevel
    s = profile.immunize
    for lr in args.lr:
        for step in range(1, args.steps + 1):
            tasks = make_tasks(setup.spec, setup.concepts, s.batch, profile.model.seed, step)
            grads = {}
            for name, mode, scheme in (("exact", "exact", "central"), ("fd", "fd", "central"),
                                       ("fd_forward", "fd", "forward"), ("first-order", "first-order", "central")):
                core.inner_lr, core.gradient, core.fd_scheme = lr, mode, scheme
                grads[name] = _flat(core.meta_gradient(tasks)[0])
            ex, fo = grads["exact"], grads["first-order"]
            print(json.dumps({
                "profile": args.profile, "method": args.method, "inner_lr": lr, "step": step,
                "n_params_upper": int(ex.numel()), "first_order": compare(ex, fo), "fd": compare(ex, grads["fd"]),
                "fd_forward": compare(ex, grads["fd_forward"]),
                "second_order_share": float(f"{float((ex - fo).norm() / ex.norm()):.3e}"),
            }), flush=True)


if __name__ == "__main__":
    main()
