"""Concepts split across processes: ``accelerate launch -m mima_cli immunize ...`` on GPUs, ``torchrun
--nproc_per_node 2 -m mima_cli immunize ...`` on CPUs (any ``torch.distributed`` launch). Accelerate's ``PartialState`` holds the process group and its collectives move the
messages.

Process ``r`` of ``W`` adapts the tasks ``r, r + W, ...`` of every outer step (:meth:`Split.mine`); every process
draws all tasks' batches (they are seeded), so no data moves. One outer step then exchanges:

1. the adapted ``S^l`` copies, each broadcast by its owner, so that every process computes the same merge;
2. the gradients of its share of the upper objective ``J_r`` (its own tasks' upper batches) with respect to ``S^u``
   and to every adapted copy, summed over processes: ``dJ/dtheta'_n`` for every task ``n``;
3. each process's back-propagation through its own inner steps (``exact``: through the inner step's graph; ``fd``:
   the identity plus the finite-difference Hessian-vector product; ``first-order``: the identity), summed.

All processes then hold the same meta-gradient and take the same optimiser step, so their weights stay equal;
process 0 alone writes the run. Communication per step: ``N |S^l|`` broadcast and ``(N + 1) |S^l|`` summed
(``|S^l|`` the lower set's size: small for ``xattn-kv``, the whole UNet for ``unet``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Split:
    """This process's rank among ``world`` processes of an initialised ``torch.distributed`` group."""

    rank: int
    world: int

    def mine(self, n: int) -> list[int]:
        """Indices of the tasks this process adapts."""
        return list(range(self.rank, n, self.world))

    def owner(self, i: int) -> int:
        return i % self.world

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast_(self, tensors: list[torch.Tensor], src: int) -> None:
        """Overwrite ``tensors`` with process ``src``'s values (one flat message)."""
        from accelerate.utils import broadcast

        flat = torch.cat([t.reshape(-1) for t in tensors])
        _unflatten_into(broadcast(flat, from_process=src), tensors)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Replace ``tensors`` by their sums over the processes (one flat message per dtype)."""
        from accelerate.utils import reduce

        for dtype in {t.dtype for t in tensors}:
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in group])
            _unflatten_into(reduce(flat, reduction="sum"), group)

    def gather(self, obj):
        """Every process's ``obj``, in rank order."""
        from accelerate.utils import gather_object

        return gather_object([obj])

    def barrier(self) -> None:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    i = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[i : i + t.numel()].view_as(t))
            i += t.numel()


def launched_world() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def current_split(cpu: bool) -> Split | None:
    """The split of this process when it runs under a multi-process launch (``accelerate launch`` on GPUs,
    ``torchrun`` or ``python -m torch.distributed.run`` anywhere), initialising the process group through accelerate
    (NCCL on GPUs; gloo where ``cpu``) if the launcher has not; ``None`` in a single process."""
    if launched_world() <= 1:
        return None
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    return Split(state.process_index, state.num_processes)


def process_device(device: torch.device) -> torch.device:
    """This process's device under a launch: its own GPU (``LOCAL_RANK``) where ``device`` is a GPU."""
    if launched_world() > 1 and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def end_launch(sync: bool = True) -> None:
    """Leave the process group of a multi-process launch (a no-op in a single process). Call once, as the process
    ends: a gloo group left to the interpreter's exit can abort a process that finished its work (SIGABRT,
    "terminate called without an active exception") and so fail the whole launch. ``sync``: first wait for the
    other processes (not on an error path, where they may never arrive)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if sync:
            dist.barrier()  # no process tears down while another still talks to it
        dist.destroy_process_group()


@contextmanager
def leaving_launch():
    """Leave the launch's process group (:func:`end_launch`) when the block ends: once every process has arrived if
    it ran through, at once if it raised (the others may never arrive). Wrap the whole of a command in it."""
    try:
        yield
    except BaseException:
        end_launch(sync=False)
        raise
    end_launch()


def is_main_process() -> bool:
    """False in the processes other than the first of a multi-process launch (they print nothing)."""
    return int(os.environ.get("RANK", "0") or 0) == 0
