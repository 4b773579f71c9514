"""Bytes held by the tensors a step creates, by component, on any device (the CPU has no allocator statistics).

    with MemoryTracker(unet.named_parameters()) as mem:
        step()
    mem.peak, mem.at_peak["copies"], mem.most["activations"]

Imports only torch. Every storage an operation creates inside the ``with`` block is counted from its creation until
it is freed (a weak reference to the storage), so ``peak`` is the most bytes the block's own tensors held at once;
what existed before (parameters, an optimiser's state) is not counted and :func:`storage_bytes` sizes it. Each new
storage gets one component when it is created:

- ``gradients``: parameter-shaped and made by autograd's backward pass, or from gradients only (sums, differences);
- ``copies``: parameter-shaped and made from a parameter or a copy outside backward (adapted weights, merged or
  averaged weights, the perturbed weights of a finite difference, autocast's casts of a weight); a stack of copies
  counts too. ``kv copies`` is the part shaped like the named k/v weights (included in ``copies``);
  ``parameter-shaped`` is ``copies`` and ``gradients`` together;
- ``activations``: any other storage once autograd saves it for backward (``saved_tensors_hooks``);
- ``optimizer``: anything made while :attr:`phase` is ``"optimizer"``;
- ``other``: the rest (temporaries of the forward and backward passes, losses).

A storage keeps the component it was created with: a tensor written in place over another (the lean step's adapted
weights over their inner gradients) counts where the storage was first counted. Shapes decide what is
parameter-shaped, so an activation that happens to have a weight's shape would count as one. A tensor built from
Python data (``torch.tensor(0.0)``, an optimiser's step counter) is made without an operation and is not counted.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_STACKS = {torch.ops.aten.stack, torch.ops.aten.cat}
COMPONENTS = ("copies", "kv copies", "gradients", "parameter-shaped", "activations", "optimizer", "other")


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a storage shared by views counts once)."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()
    return sum(seen.values())


def optimizer_state(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors of an optimiser's state (AdamW: ``exp_avg``, ``exp_avg_sq``, ``step``)."""
    return [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class MemoryTracker(TorchDispatchMode):
    """Counts, by component, the storages created while it is active (see the module docstring). ``params``: the
    model's ``(name, parameter)`` pairs; ``kv``: the names whose shapes make ``kv copies``."""

    def __init__(self, params: Iterable[tuple[str, torch.Tensor]], kv: Iterable[str] = ()):
        super().__init__()
        params = dict(params)
        kv = set(kv)
        self.shapes = {tuple(p.shape) for p in params.values()}
        self.kv_shapes = {tuple(p.shape) for k, p in params.items() if k in kv}
        self.param_storages = {p.untyped_storage()._cdata for p in params.values()}
        self.live: dict[int, list] = {}  # storage -> [bytes, component]
        self.held = dict.fromkeys(COMPONENTS, 0)
        self.most = dict.fromkeys(COMPONENTS, 0)  # each component's own maximum over the block
        self.at_peak = dict.fromkeys(COMPONENTS, 0)
        self.total = self.peak = 0
        self.phase = "step"
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def __enter__(self):
        self._hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._hooks.__exit__(*exc)

    # ------------------------------------------------------------------------------------------ accounting

    def _move(self, key: int, component: str, sign: int) -> None:
        size = self.live[key][0]
        names = [component] + ["kv copies"] * self.live[key][2]
        names += ["parameter-shaped"] * (component in ("copies", "gradients"))
        for name in names:
            self.held[name] += sign * size
            self.most[name] = max(self.most[name], self.held[name])

    def _free(self, key: int) -> None:
        self._move(key, self.live[key][1], -1)
        self.total -= self.live.pop(key)[0]

    def _kind(self, func, t: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[str, bool]:
        if self.phase == "optimizer":
            return "optimizer", False
        shape = tuple(t.shape)
        stacked = func.overloadpacket in _STACKS and tuple(shape[1:]) in self.shapes
        if shape not in self.shapes and not stacked:
            return "other", False
        kinds = {self.live[k][1] if k in self.live else ("param" if k in self.param_storages else None)
                 for k in (x.untyped_storage()._cdata for x in inputs)}
        kv = shape in self.kv_shapes or (stacked and tuple(shape[1:]) in self.kv_shapes)
        if torch._C._current_autograd_node() is not None and not stacked:
            return "gradients", False
        if kinds & {"param", "copies"}:
            return "copies", kv
        if "gradients" in kinds and not stacked:
            return "gradients", False
        return "other", False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = _tensors((args, kwargs))
        aliases = {x.untyped_storage()._cdata for x in inputs}
        for t in _tensors(out):
            s = t.untyped_storage()
            key = s._cdata
            if key in self.live and self.live[key][1] == "other" and tuple(t.shape) in self.shapes \
                    and torch._C._current_autograd_node() is not None:
                self._recount(key, "gradients")  # a gradient reshaped to its parameter (a bias's sum over a batch)
            if key in self.live or key in aliases or s.nbytes() == 0:  # views, in-place results, seen storages
                continue
            component, kv = self._kind(func, t, inputs)
            self.live[key] = [s.nbytes(), component, kv]
            self.total += s.nbytes()
            self._move(key, component, 1)
            weakref.finalize(s, self._free, key)
            if self.total > self.peak:
                self.peak, self.at_peak = self.total, dict(self.held)
        return out

    def _recount(self, key: int, component: str) -> None:
        self._move(key, self.live[key][1], -1)
        self.live[key][1] = component
        self._move(key, component, 1)
        if self.total == self.peak:
            self.at_peak = dict(self.held)

    def _pack(self, t: torch.Tensor):
        key = t.untyped_storage()._cdata
        if key in self.live and self.live[key][1] == "other":
            self._recount(key, "activations")
        return t.detach()  # the tensor itself would tie an output to its own node in a cycle
