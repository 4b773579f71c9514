"""Concepts split across two processes (gloo on CPU) give the single-process meta-gradient (float64, tiny UNet)."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_immunize_core import ALPHA, W_PRIOR, problem, scheduler

from engine.editing import merge_projector
from engine.immunize.core import BiLevel, make_merge_fn
from engine.immunize.distributed import Split, current_split

MODES = ("exact", "fd", "first-order", "alternating")


def _meta(mode: str, n: int, split: Split | None):
    torch.set_num_threads(1)
    unet, lower, upper, kv, rows, reg, tasks = problem(n)
    proj = merge_projector(rows, reg, ridge=0.01)
    core = BiLevel(unet, scheduler(), lower, upper, ALPHA, W_PRIOR, "first-order" if mode == "alternating" else mode,
                   1e-4, make_merge_fn(proj, kv), fd_scheme="forward" if mode == "fd" else "central")
    fn = core.alternating_gradient if mode == "alternating" else core.meta_gradient
    grads, stats = fn(tasks, split)
    return torch.cat([grads[k].flatten() for k in upper]), stats


def _worker(rank: int, world: int, port: int, n: int, out: str) -> None:
    # a launcher's environment: the split comes from accelerate's state, as in a launched run
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    split = current_split(cpu=True)
    assert split == Split(rank, world)
    try:
        results = {m: _meta(m, n, split) for m in MODES}
        torch.save({m: (g, vars(s)) for m, (g, s) in results.items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("n", [3, 1])
def test_two_processes_equal_one(tmp_path, n):
    """Three concepts on two processes (2 + 1 tasks), and one concept (the second process adapts none): every
    gradient mode and the alternating scheme give the one-process gradient and statistics on both processes."""
    out = str(tmp_path / "grads")
    mp.spawn(_worker, args=(2, _free_port(), n, out), nprocs=2, join=True)
    parts = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    for mode in MODES:
        ref, ref_stats = _meta(mode, n, None)
        for part in parts:
            g, st = part[mode]
            # float64; exact adds each task's part through every inner graph in another order on one process than
            # on two (5e-9 at ALPHA = 3, where the second-order part is 93% of the gradient); the others 1e-13
            assert float((g - ref).norm() / ref.norm()) < (1e-8 if mode == "exact" else 1e-10), mode
            assert st["inner_loss"] == pytest.approx(ref_stats.inner_loss, rel=1e-12), mode
            assert st["outer_loss"] == pytest.approx(ref_stats.outer_loss, rel=1e-12), mode
            assert st["prior_loss"] == pytest.approx(ref_stats.prior_loss, rel=1e-12), mode
        torch.testing.assert_close(parts[0][mode][0], parts[1][mode][0], rtol=0, atol=0)


def test_accelerate_two_processes_equals_one(tmp_path, tiny_profile):
    """`accelerate launch --multi_gpu --num_processes 2 -m mima_cli immunize` on a CPU (accelerate starts the two
    processes through torch.distributed.run; gloo) writes one run whose immunized weights equal the one-process run's."""
    import json
    import subprocess
    import sys

    from typer.testing import CliRunner

    from engine.models import load_pipeline
    from engine.runs import list_runs
    from mima_cli.app import app

    one, two = tmp_path / "one", tmp_path / "two"
    res = CliRunner().invoke(app, ["--runs-dir", str(one), "immunize", "-p", str(tiny_profile), "-g", "g2"])
    assert res.exit_code == 0, res.output
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(_free_port())]
    proc = subprocess.run([*launch, "-m", "mima_cli", "--runs-dir", str(two), "immunize", "-p", str(tiny_profile),
                           "-g", "g2"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("immunized model:") == 1  # the first process alone prints
    runs = {kind: [r for r in list_runs(two) if r.get("kind") == kind] for kind in ("erase", "immunize")}
    assert len(runs["erase"]) == 1 and len(runs["immunize"]) == 1
    (run,) = runs["immunize"]
    assert json.loads((two / run["id"] / "status.json").read_text())["extra"]["processes"] == 2
    (ref,) = [r for r in list_runs(one) if r.get("kind") == "immunize"]
    a, b, parent = (load_pipeline(d).unet.state_dict() for d in (one / ref["id"], two / run["id"], two / runs["erase"][0]["id"]))
    # float32 sums in another order, amplified by the finite differences (step eps ~1e-3): equal to ~1e-5 of the update
    da = torch.cat([(a[k] - parent[k]).flatten() for k in a])
    db = torch.cat([(b[k] - parent[k]).flatten() for k in a])
    assert da.norm() > 0
    assert float((db - da).norm() / da.norm()) < 1e-3


def _end_worker(rank: int, world: int, port: int, raises: bool) -> None:
    from engine.immunize.distributed import end_launch, leaving_launch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    with pytest.raises(KeyError) if raises else contextlib.nullcontext():
        with leaving_launch():
            if raises:
                raise KeyError("the command failed")  # passes through, the group is left without a barrier
    assert not dist.is_initialized()
    end_launch()  # a second call (or a single process) does nothing


@pytest.mark.parametrize("raises", [False, True])
def test_leaving_launch_leaves_the_process_group(raises):
    """The CLI leaves the gloo group before the interpreter exits (a group left to exit can abort a finished process
    and fail the launch); when the command raised, without waiting for processes that may never arrive."""
    mp.spawn(_end_worker, args=(2, _free_port(), raises), nprocs=2, join=True)
