"""The bi-level step shared by MIMA, JT, CP and IMMA (Algorithm 1 of MIMA; docs/method.md "The bi-level loop").

One outer step, for tasks ``n = 1..N`` (a task is a concept; JT has one task made of all concepts' data)::

    g_n     = grad_{S^l} L(x_n^l; theta)                    L = instance loss + w * prior loss (minimised)
    theta'_n[S^l] = theta[S^l] - alpha * g_n
    theta'  = Merge(theta'_1..theta'_N)     k/v: closed form (anchor W0 = theta's or the pretrained k/v);
                                            other S^l: mean; rest: theta.  (No merge for one task.)
    J       = sum_n [ instance loss(x_n^u; theta') - w * prior loss(x_n^u; theta') ]      (maximised)
    grad_{S^u} J, through the merge and the inner step, by one of three gradient modes:

- ``exact``: autograd through the inner gradient (``create_graph``; needs attention with a double backward);
- ``fd``: the first-order graph plus ``-alpha * H_n u_n`` for every task, ``u_n = dJ/dtheta'_n`` (what flows back
  from the merge into the adapted copy) and ``H_n u_n`` by central differences of first-order gradients,
  ``[grad_{S^u} L_n(theta + eps u_n) - grad_{S^u} L_n(theta - eps u_n)] / 2 eps``, same data, timesteps and noise in
  every pass, perturbation in float32 or wider. ``fd_scheme = "forward"`` takes
  ``[grad_{S^u} L_n(theta + eps u_n) - grad_{S^u} L_n(theta)] / eps`` instead, the second gradient coming free with
  the inner step's backward pass: one extra pass per task instead of two, error O(eps) instead of O(eps^2);
- ``first-order``: the inner gradients are constants.

Parameters are passed to the UNet functionally (``torch.func.functional_call``), so the module's own parameters stay
the leaves that the upper optimiser updates.

One module of a little over 500 lines on purpose: the lean, the sharded and the alternating gradients are three
schedules of the same inner step, merge and upper objective, tested against one another, and read best side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from ..diffusion import noise_loss
from .distributed import Split

GRADIENT_MODES = ("exact", "fd", "first-order")
FD_SCHEMES = ("central", "forward")
ADAM_IMPLEMENTATIONS = {"auto": {}, "foreach": {"foreach": True}, "fused": {"fused": True},
                        "for-loop": {"foreach": False}}
"""``[immunize] adam``: the ``torch.optim.AdamW`` keywords of each implementation (the upper level's optimiser)."""


@dataclass
class Batch:
    """One forward pass: instance samples first, then prior samples."""

    latents: torch.Tensor
    context: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    n_instance: int

    @staticmethod
    def cat(batches: Sequence[Batch]) -> Batch:
        """Concatenate batches, keeping instance samples before prior samples."""
        parts = []
        for key in ("latents", "context", "noise", "timesteps"):
            inst = [getattr(b, key)[: b.n_instance] for b in batches]
            prior = [getattr(b, key)[b.n_instance :] for b in batches]
            parts.append(torch.cat(inst + prior))
        return Batch(*parts, n_instance=sum(b.n_instance for b in batches))


@dataclass
class Task:
    """A lower-level task: its inner batch and upper batch (independent draws)."""

    name: str
    lower: Batch
    upper: Batch
    more_lower: Sequence[Batch] = ()  # the batches of inner steps 2..K (``first-order`` only)


def global_norm(grads: dict[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors of ``grads`` together."""
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads.values())))


@dataclass
class StepStats:
    inner_loss: dict[str, float] = field(default_factory=dict)
    outer_loss: float = 0.0
    prior_loss: float = 0.0
    merge_residual: float = 0.0
    grad_norm: float = 0.0
    preserve_loss: float = 0.0


@dataclass
class Preserve:
    """The preservation term of the upper level: ``weight * mean ||eps(x_t, c; model) - eps(x_t, c; parent)||^2`` on
    a batch of prompts that must keep working, subtracted from the ascended objective; evaluated at the merged
    theta' (``at = "merged"``) or at theta' and theta (``"both"``). ``parent``: the ``S^u`` parameters the
    immunization started from (the only ones the outer loop changes), so the parent's predictions cost one forward
    pass and no second model."""

    weight: float
    parent: dict[str, torch.Tensor]
    at: str = "both"


@dataclass
class Subspace:
    """The upper level's k/v updates kept to the directions ``Q`` ``[c, r]`` of the text embeddings that carry the
    targets (:func:`engine.editing.discriminative_basis`): each gradient becomes ``g Q Q^T`` and, after each
    optimiser step, ``W = W0 + (W - W0) Q Q^T`` (the optimiser's per-element scaling leaves the plane otherwise), so
    ``W c = W0 c`` for every embedding ``c`` orthogonal to ``Q``. ``parent``: those k/v weights at the start."""

    basis: torch.Tensor
    parent: dict[str, torch.Tensor]

    def _plane(self, x: torch.Tensor) -> torch.Tensor:
        q = self.basis.to(x.device, torch.float32)
        return ((x.float() @ q) @ q.T).to(x.dtype)

    def project(self, grads: dict[str, torch.Tensor]) -> None:
        for k in self.parent:
            if k in grads:
                grads[k] = self._plane(grads[k])

    @torch.no_grad()
    def restore(self, params: dict[str, torch.Tensor]) -> None:
        for k, w0 in self.parent.items():
            w = params[k]
            w.copy_(w0.to(w.device, w.dtype) + self._plane(w - w0.to(w.device, w.dtype)))


def ascended(loss: torch.Tensor, how: str = "loss", cap: float = 1.0) -> torch.Tensor:
    """The instance loss the upper level maximises: as is, its log, or capped at ``cap`` (no gradient above it)."""
    if how == "loss":
        return loss
    if how == "log":
        return torch.log(loss.clamp_min(1e-8))
    if how == "capped":
        return loss.clamp(max=cap)
    raise ValueError(f"unknown ascent {how!r}; expected loss, log or capped")


def checkpoint_with_overrides(module, *args):
    """diffusers' block-wise gradient checkpointing hook (``enable_gradient_checkpointing``) that recomputes each
    ResNet or transformer block in the backward pass with the tensors standing in for its parameters when it ran:
    inside ``functional_call``, the overrides (the adapted, merged or perturbed weights), not the module's own. They
    are inputs of the checkpoint, so their gradients flow. diffusers' default hook would recompute with the module's
    own weights once ``functional_call`` has put them back."""
    names, values = zip(*module.named_parameters())

    def run(*inputs):
        return functional_call(module, dict(zip(names, inputs[len(args):])), inputs[: len(args)])

    return checkpoint(run, *args, *values, use_reentrant=False)


class BiLevel:
    """The meta-gradient of one outer step for a UNet, parameter sets and a merge.

    ``merge_fn(anchor: dict, adapted: list[dict]) -> dict`` combines the adapted ``S^l`` copies (None: one task, no
    merge). ``anchor`` holds theta's k/v (``merge.anchor = current``) or the pretrained ones.
    """

    def __init__(self, unet, scheduler, lower: list[str], upper: list[str], inner_lr: float, prior_weight: float,
                 gradient: str = "fd", fd_eps: float = 1e-3,
                 merge_fn: Callable[[dict, list[dict]], tuple[dict, float]] | None = None,
                 anchor: dict[str, torch.Tensor] | None = None, fd_scheme: str = "central",
                 preserve: Preserve | None = None, ascent: str = "loss", ascent_cap: float = 1.0,
                 checkpointing: bool = False, autocast: torch.dtype | None = None):
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"unknown gradient mode {gradient!r}; expected one of {', '.join(GRADIENT_MODES)}")
        if fd_scheme not in FD_SCHEMES:
            raise ValueError(f"unknown finite-difference scheme {fd_scheme!r}; expected one of {', '.join(FD_SCHEMES)}")
        self.unet, self.scheduler = unet, scheduler
        self.params = dict(unet.named_parameters())
        self.lower, self.upper = list(lower), list(upper)
        self.inner_lr, self.prior_weight = inner_lr, prior_weight
        self.gradient, self.fd_eps, self.fd_scheme = gradient, fd_eps, fd_scheme
        self.merge_fn, self.anchor = merge_fn, anchor
        self.preserve, self.ascent, self.ascent_cap = preserve, ascent, ascent_cap
        if checkpointing and gradient == "exact":
            raise ValueError("gradient checkpointing needs the fd or first-order gradient (exact differentiates the "
                             "backward pass)")
        self.checkpointing = checkpointing
        if checkpointing:  # the UNet's own switch, set both ways: one UNet may serve several steps in turn
            unet.enable_gradient_checkpointing(checkpoint_with_overrides)
        elif getattr(unet, "is_gradient_checkpointing", False):
            unet.disable_gradient_checkpointing()
        self.autocast = autocast
        ascended(torch.ones(()), ascent, ascent_cap)  # an unknown ascent fails here, not at the first step

    # -------------------------------------------------------------------------------------------- losses

    def losses(self, overrides: dict[str, torch.Tensor], batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(instance loss, prior loss) of ``batch`` with ``overrides`` replacing module parameters."""

        def fn(x, t, c):
            return self._unet(overrides, x, t, c)

        per = noise_loss(fn, self.scheduler, batch.latents, batch.context, batch.noise, batch.timesteps, "none")
        k = batch.n_instance
        inst = per[:k].mean()
        prior = per[k:].mean() if per.shape[0] > k else per.new_zeros(())
        return inst, prior

    def _unet(self, overrides: dict, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction with ``overrides`` in place of its parameters (block-wise gradient
        checkpointing, when on, is the UNet's own: :func:`checkpoint_with_overrides`). With ``autocast`` (a dtype)
        the call runs under :func:`torch.autocast`: the weights and their gradients stay in their own (fp32) dtype,
        the matmuls and convolutions run in ``autocast``; the losses, merge and update do not."""
        with torch.autocast(x.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            return functional_call(self.unet, overrides, (x, t), {"encoder_hidden_states": c}, strict=False).sample

    def _call(self, overrides: dict, batch: Batch) -> torch.Tensor:
        xt = self.scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
        return self._unet(overrides, xt, batch.timesteps, batch.context)

    def preserve_loss(self, overrides: dict, keep: Batch) -> torch.Tensor:
        """Mean squared distance of the predictions on ``keep`` to the parent's (see :class:`Preserve`)."""
        with torch.no_grad():
            target = self._call(self.preserve.parent, keep).float()
        return ((self._call(overrides, keep).float() - target) ** 2).mean()

    def inner_objective(self, overrides, batch) -> torch.Tensor:
        inst, prior = self.losses(overrides, batch)
        return inst + self.prior_weight * prior

    # -------------------------------------------------------------------------------------------- step

    def _adapt(self, task: Task, create_graph: bool, with_upper: bool = False):
        """``(theta'_n on S^l, inner loss, grad_{S^u} L_n(theta) or None)``; the last only if ``with_upper``."""
        extra = [k for k in self.upper if k not in self.lower] if with_upper else []
        theta_l = [self.params[k] for k in self.lower + extra]
        loss = self.inner_objective({}, task.lower)
        grads = torch.autograd.grad(loss, theta_l, create_graph=create_graph, materialize_grads=with_upper)
        grads = dict(zip(self.lower + extra, grads if create_graph else _own(grads)))
        lower = set(self.lower)
        g_upper = {k: grads[k].clone() if k in lower else grads[k] for k in self.upper} if with_upper else None
        if create_graph:
            adapted = {k: self.params[k] - self.inner_lr * grads[k] for k in self.lower}
        else:  # in the gradient's storage: -(alpha g) + theta is theta - alpha g to the bit
            adapted = {k: grads[k].mul_(-self.inner_lr).add_(self.params[k].detach()) for k in self.lower}
        if task.more_lower:
            if create_graph or self.gradient != "first-order":
                raise ValueError("several inner steps need gradient = 'first-order' (nothing is carried back "
                                 "through steps 2..K)")
            adapted = self._more_inner_steps(adapted, task.more_lower)
        return adapted, float(loss.detach()), g_upper

    def _more_inner_steps(self, adapted: dict[str, torch.Tensor], batches: Sequence[Batch]) -> dict:
        """Inner SGD steps 2..K from ``adapted``, one batch each, without a graph (first-order)."""
        for batch in batches:
            at = {k: v.detach().requires_grad_(True) for k, v in adapted.items()}
            grads = torch.autograd.grad(self.inner_objective(at, batch), list(at.values()), materialize_grads=True)
            adapted = {k: (v - self.inner_lr * g).detach() for (k, v), g in zip(at.items(), grads)}
        return adapted

    def _merge(self, adapted: list[dict]) -> tuple[dict, float]:
        if self.merge_fn is None:
            if len(adapted) == 1:
                return adapted[0], 0.0
            return {k: torch.stack([a[k] for a in adapted]).mean(0) for k in adapted[0]}, 0.0
        anchor = self.anchor if self.anchor is not None else {k: self.params[k] for k in self.lower}
        return self.merge_fn(anchor, adapted)

    def _upper_gradient(self, merged: dict, tasks: Sequence[Task], wrt: list[torch.Tensor],
                        keep: Batch | None = None, stats: StepStats | None = None, retain: bool = False
                        ) -> tuple[list[torch.Tensor], float, float]:
        """``dJ/d wrt`` with ``J = sum_n A(L_n(merged))`` (each task's instance loss, through :func:`ascended`,
        minus ``prior_weight`` times its prior loss, on its upper batch) minus the preservation term on ``keep``
        (when set), and the summed instance and prior losses. One task's forward pass at a time, the merge's graph
        kept between them: the activations of one task are held, not N (at SD v1.4 shapes on an H200 one concept's
        batch holds ~16 GiB of them, benchmarks/README.md). The sum is accumulated in place, in ``.grad`` (each pass's gradient
        of a tensor is freed once added; ``wrt``'s own ``.grad`` are put back after). ``retain``: keep the graph
        upstream of ``merged`` (the merge's) for a backward pass after this one."""
        outer, prior_sum = 0.0, 0.0
        keep = keep if self.preserve is not None and self.preserve.weight > 0 else None
        held = [t.grad if t.is_leaf else None for t in wrt]  # the sum goes into .grad (added in place), then back
        for t in wrt:
            t.grad = None
        try:
            for i, task in enumerate(tasks):
                inst, prior = self.losses(merged, task.upper)
                torch.autograd.backward(ascended(inst, self.ascent, self.ascent_cap) - self.prior_weight * prior,
                                        inputs=wrt, retain_graph=retain or i < len(tasks) - 1 or keep is not None)
                outer += float(inst.detach())
                prior_sum += float(prior.detach())
                del inst, prior  # this task's graph goes before the next task's forward pass
            if keep is not None:
                points = [merged] + ([{}] if self.preserve.at == "both" and merged else [])
                total = 0.0
                for j, at in enumerate(points):
                    loss = self.preserve_loss(at, keep)
                    torch.autograd.backward(-self.preserve.weight * loss, inputs=wrt,
                                            retain_graph=retain or j < len(points) - 1)
                    total += float(loss.detach())
                if stats is not None:
                    stats.preserve_loss = total / len(points)
            grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in wrt]
        finally:
            for t, g in zip(wrt, held):
                t.grad = g
        return grads, outer, prior_sum

    def meta_gradient(self, tasks: Sequence[Task], split: Split | None = None, keep: Batch | None = None
                      ) -> tuple[dict[str, torch.Tensor], StepStats]:
        """``{name: dJ/dtheta}`` for the ``S^u`` parameters, and the step's statistics. With ``split``, this process
        adapts only its share of the tasks and the processes combine their parts (:mod:`.distributed`). ``keep``:
        the preservation term's batch of this step (with :class:`Preserve` set)."""
        if split is not None and split.world > 1:
            return self._split_meta_gradient(tasks, split, keep)
        if self.gradient != "exact":
            return self._lean_meta_gradient(tasks, keep)
        stats = StepStats()
        upper = [self.params[k] for k in self.upper]
        adapted = []
        for task in tasks:
            a, stats.inner_loss[task.name], _ = self._adapt(task, create_graph=True)
            adapted.append(a)
        merged, stats.merge_residual = self._merge(adapted)
        grads, stats.outer_loss, stats.prior_loss = self._upper_gradient(merged, tasks, upper, keep, stats)
        out = dict(zip(self.upper, grads))
        stats.grad_norm = global_norm(out)
        return out, stats

    def _kv_names(self) -> set[str]:
        """The ``S^l`` parameters merged in closed form; every other one is the mean of the adapted copies."""
        return set(getattr(self.merge_fn, "kv_names", ())) & set(self.lower)

    def _lean_meta_gradient(self, tasks: Sequence[Task], keep: Batch | None = None
                            ) -> tuple[dict[str, torch.Tensor], StepStats]:
        """``fd`` and ``first-order`` without a graph through the inner steps, holding one running sum for the
        averaged ``S^l`` parameters instead of N adapted copies (their gradient is the same for every task,
        ``dJ/dmean / N``) and N copies of the k/v weights only. The upper passes take the gradient at the merged k/v
        (one per layer, whatever N) and one backward pass through the merge alone hands it to the N copies, so what
        grows with N is the copies and their gradients: 2 |k/v| per concept (``fd_scheme = "forward"`` also keeps
        each task's ``grad_{S^u} L_n(theta)``). The inner gradients become the adapted weights in place, the
        averaged weights are freed before the Hessian-vector products: the peak, parameters included, is about
        3 |S^l| + 2N |k/v| + one task's activations (with ``S^l`` the whole UNet; benchmarks/README.md)."""
        stats = StepStats()
        n = len(tasks)
        kv = self._kv_names()
        forward = self.gradient == "fd" and self.fd_scheme == "forward"
        sums: dict[str, torch.Tensor] = {}
        copies, at_theta = [], []
        for task in tasks:
            a, stats.inner_loss[task.name], g_upper = self._adapt(task, create_graph=False, with_upper=forward)
            copies.append({k: a[k].detach().requires_grad_(True) for k in self.lower if k in kv})
            for k in self.lower:
                if k not in kv:  # a[k] is a fresh tensor (theta - alpha g), never a parameter's storage
                    if k in sums:
                        sums[k].add_(a[k].detach())
                    else:
                        sums[k] = a[k].detach()
            del a
            at_theta.append(g_upper)
        mean = {k: v.div_(n).requires_grad_(True) for k, v in sums.items()}
        del sums
        merged, stats.merge_residual = dict(mean), 0.0
        merged_kv = {}
        if kv:
            anchor = self.anchor if self.anchor is not None else {k: self.params[k] for k in kv}
            merged_kv, stats.merge_residual = self.merge_fn.merge_kv(anchor, copies)
            merged.update(merged_kv)
        upper = [self.params[k] for k in self.upper]
        grads, stats.outer_loss, stats.prior_loss = self._upper_gradient(
            merged, tasks, upper + list(mean.values()) + list(merged_kv.values()), keep, stats, retain=bool(kv))
        out = dict(zip(self.upper, grads))
        shared = {k: g.div_(n) for k, g in zip(mean, grads[len(upper): len(upper) + len(mean)])}  # dJ/dtheta'_n
        at_merged = grads[len(upper) + len(mean):]
        del merged, mean, grads
        flat = [v for c in copies for v in c.values()]
        through = torch.autograd.grad(list(merged_kv.values()), flat, at_merged, materialize_grads=True) if kv else []
        names = [list(c) for c in copies]
        del merged_kv, at_merged, copies, flat  # the copies' gradients are all the Hessian-vector products need
        i = 0
        for task, c, g0 in zip(tasks, names, at_theta):
            u = dict(shared)
            u.update(zip(c, through[i: i + len(c)]))
            i += len(c)
            for k, g in self._through_inner_step(task, u, g0).items():
                out[k] = out[k] + g
        stats.grad_norm = global_norm(out)
        return out, stats

    def alternating_gradient(self, tasks: Sequence[Task], split: Split | None = None, keep: Batch | None = None
                             ) -> tuple[dict[str, torch.Tensor], StepStats]:
        """The released MIMA code's scheme (a labelled reproduction, for comparison only): the inner steps and the
        merge are written into the model without gradient, then the first-order gradient of ``J`` is taken at the
        resulting weights. Not Algorithm 1: nothing flows through the merge and inner updates accumulate."""
        stats = StepStats()
        split = split if split is not None and split.world > 1 else None
        mine = split.mine(len(tasks)) if split else range(len(tasks))
        adapted = {}
        for i in mine:
            a, stats.inner_loss[tasks[i].name], _ = self._adapt(tasks[i], create_graph=False)
            adapted[i] = {k: v.detach() for k, v in a.items()}
        copies = self._exchange(adapted, len(tasks), split) if split else [adapted[i] for i in mine]
        with torch.no_grad():
            merged, stats.merge_residual = self._merge(copies)
            for k, v in merged.items():
                self.params[k].copy_(v)
        upper = [self.params[k] for k in self.upper]
        own = [tasks[i] for i in mine]
        if own:
            grads, stats.outer_loss, stats.prior_loss = self._upper_gradient(
                {}, own, upper, keep if split is None or split.main else None, stats)
        else:
            grads = [torch.zeros_like(p) for p in upper]
        if split:
            split.sum_(grads)
            self._combine_stats(stats, split)
        out = dict(zip(self.upper, grads))
        stats.grad_norm = global_norm(out)
        return out, stats

    # ------------------------------------------------------------------------------- tasks split across processes

    def _exchange(self, adapted: dict[int, dict], n: int, split: Split) -> list[dict[str, torch.Tensor]]:
        """Every task's adapted ``S^l`` copy on every process (detached), each broadcast by its owner."""
        copies = []
        for i in range(n):
            names = self.lower
            own = adapted.get(i)
            buf = ([own[k].detach().clone() for k in names] if own is not None
                   else [torch.empty_like(self.params[k]) for k in names])
            split.broadcast_(buf, split.owner(i))
            copies.append(dict(zip(names, buf)))
        return copies

    def _combine_stats(self, stats: StepStats, split: Split) -> None:
        """Inner losses of every task, outer and prior losses summed over the processes."""
        merged = {}
        for part in split.gather(stats.inner_loss):
            merged.update(part)
        stats.inner_loss = merged
        device = next(iter(self.params.values())).device  # NCCL sums tensors on the GPU only
        losses = [torch.tensor([stats.outer_loss, stats.prior_loss], dtype=torch.float64, device=device)]
        split.sum_(losses)
        stats.outer_loss, stats.prior_loss = (float(v) for v in losses[0])

    def _split_meta_gradient(self, tasks: Sequence[Task], split: Split, keep: Batch | None = None
                             ) -> tuple[dict[str, torch.Tensor], StepStats]:
        """:meth:`meta_gradient` with this process adapting ``split.mine`` (see :mod:`.distributed`)."""
        stats = StepStats()
        n, mine = len(tasks), split.mine(len(tasks))
        exact = self.gradient == "exact"
        forward = self.gradient == "fd" and self.fd_scheme == "forward"
        adapted, at_theta = {}, {}
        for i in mine:
            adapted[i], stats.inner_loss[tasks[i].name], at_theta[i] = self._adapt(
                tasks[i], create_graph=exact, with_upper=forward)
        copies = [{k: v.requires_grad_(True) for k, v in c.items()} for c in self._exchange(adapted, n, split)]
        merged, stats.merge_residual = self._merge(copies)
        upper = [self.params[k] for k in self.upper]
        flat = [v for c in copies for v in c.values()]
        own = [tasks[i] for i in mine]
        if own:  # the preservation term once, on the first process
            grads, stats.outer_loss, stats.prior_loss = self._upper_gradient(
                merged, own, upper + flat, keep if split.main else None, stats)
        else:
            grads = [torch.zeros_like(v) for v in upper + flat]
        split.sum_(grads)  # dJ/dtheta on the direct path, and dJ/dtheta'_n for every task n
        out = dict(zip(self.upper, grads[: len(upper)]))
        us = [dict(zip(self.lower, grads[len(upper) + i * len(self.lower): len(upper) + (i + 1) * len(self.lower)]))
              for i in range(n)]
        back = {k: torch.zeros_like(self.params[k]) for k in self.upper}
        for i in mine:
            u = us[i]
            if exact:  # through theta'_i = theta - alpha grad L_i(theta), created with a graph
                names = list(adapted[i])
                parts = torch.autograd.grad([adapted[i][k] for k in names], upper, [u[k] for k in names],
                                            materialize_grads=True)
                for k, g in zip(self.upper, parts):
                    back[k] += g
                continue
            for k, g in self._through_inner_step(tasks[i], u, at_theta[i]).items():
                back[k] += g
        parts = [back[k] for k in self.upper]
        split.sum_(parts)
        out = {k: out[k] + g for k, g in zip(self.upper, parts)}
        self._combine_stats(stats, split)
        stats.grad_norm = global_norm(out)
        return out, stats

    def _through_inner_step(self, task: Task, u: dict[str, torch.Tensor], at_theta: dict | None) -> dict:
        """``u`` (dJ/dtheta'_n on ``S^l``) carried back through ``theta'_n = theta - alpha g_n`` onto ``S^u``
        without a graph: the identity on ``S^l``, and for ``fd`` minus ``alpha`` times the Hessian-vector product."""
        upper_set = set(self.upper)
        out = {k: u[k] for k in u if k in upper_set}
        if self.gradient == "fd" and self.inner_lr:
            for k, h in self._hvp(task, u, at_theta).items():
                out[k] = out[k] - self.inner_lr * h if k in out else -self.inner_lr * h
        return out

    def _hvp(self, task: Task, u: dict[str, torch.Tensor], at_theta: dict | None = None) -> dict[str, torch.Tensor]:
        """``H[S^u, S^l] u`` by central differences of ``grad_{S^u} L_n`` along ``u`` (on ``S^l``), or by forward
        differences from ``at_theta`` (``grad_{S^u} L_n(theta)``) when it is given."""
        norm_u = torch.sqrt(sum((v.double() ** 2).sum() for v in u.values()))
        if float(norm_u) == 0.0:
            return {k: torch.zeros_like(self.params[k]) for k in self.upper}
        norm_theta = torch.sqrt(sum((self.params[k].detach().double() ** 2).sum() for k in self.lower))
        eps = float(self.fd_eps * max(float(norm_theta), 1.0) / float(norm_u))
        sides = []
        for sign in (1.0,) if at_theta is not None else (1.0, -1.0):
            over = {}
            for k in set(self.lower) | set(self.upper):
                p = self.params[k].detach()
                wide = torch.promote_types(p.dtype, torch.float32)
                if k in u:
                    p = (p.to(wide) + sign * eps * u[k].to(wide)).to(p.dtype)
                over[k] = p.requires_grad_(k in self.upper)
            loss = self.inner_objective(over, task.lower)
            sides.append(torch.autograd.grad(loss, [over[k] for k in self.upper], materialize_grads=True))
        if at_theta is not None:
            return {k: (gp - at_theta[k]) / eps for k, gp in zip(self.upper, sides[0])}
        return {k: (gp - gm) / (2 * eps) for k, gp, gm in zip(self.upper, *sides)}


def _own(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors``, each with its own storage (a clone where autograd handed one tensor to several inputs, e.g. the
    two sides of a sum), so that each can be updated in place."""
    seen, out = set(), []
    for t in tensors:
        if t is None:
            out.append(t)
            continue
        key = t.untyped_storage().data_ptr()
        out.append(t.clone() if key in seen else t)
        seen.add(key)
    return out


class Merge:
    """The merge layer on ``S^l``: k/v weights in closed form (``projector``), every other parameter the mean of the
    adapted copies. ``merge(anchor, adapted) -> (merged, constraint residual)``."""

    def __init__(self, projector, kv_names: set[str]):
        self.projector, self.kv_names = projector, set(kv_names)

    def merge_kv(self, anchor: dict, copies: list[dict]) -> tuple[dict, float]:
        """The closed-form merge of the k/v weights the copies hold."""
        out, resid = {}, 0.0
        for k in copies[0]:
            w = [c[k] for c in copies]
            out[k] = self.projector.apply(anchor[k], w)
            resid = max(resid, self.projector.residual(out[k].detach(), [x.detach() for x in w]))
        return out, resid

    def __call__(self, anchor: dict, adapted: list[dict]) -> tuple[dict, float]:
        kv = [{k: a[k] for k in a if k in self.kv_names} for a in adapted]
        out, resid = self.merge_kv(anchor, kv) if kv[0] else ({}, 0.0)
        for k in adapted[0]:
            if k not in self.kv_names:
                out[k] = torch.stack([a[k] for a in adapted]).mean(0)
        return out, resid


def make_merge_fn(projector, kv_names: set[str]) -> Merge:
    """k/v weights: closed form; other lower-level parameters: mean of the adapted copies."""
    return Merge(projector, kv_names)
