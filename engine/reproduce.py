"""``reproduce``: the whole experiment of a profile — erase, immunize every group with each method, attack, evaluate.

Work whose finished run already exists (same profile contents, group, method and parent) is skipped, so an
interrupted or sharded reproduction resumes, also across days and machines that share the runs directory.
``--shard i/n`` takes every n-th group starting at the i-th (1-based).

The work of a group is a small graph of tasks (:func:`plan_tasks`): erase; immunize with each method; attack the
unimmunized model once (the twin every method and the control compare with; cached, so done once); attack each
immunized model; the control re-attack. ``jobs > 1`` runs ready tasks in that many worker processes, each with
``cpu_count // jobs`` torch threads: on a CPU the testbed's small batches are bound by per-operation overhead,
not arithmetic, so one thread runs them nearly as fast as two (the testbed demo on 2 cores: 9.5 min with 2 workers,
15.6 min in one process). With several workers the unimmunized attack is split into one slice of concepts per
worker, then assembled into one run from the attack cache. Every task reads its inputs from the runs directory
and writes its own runs, so the results are those of the serial order; only float rounding may differ with the
thread count, which is why a worker's thread count is fixed for the whole reproduction (the control's MSGR 0
compares two attacks run with the same count).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .profile import Profile

QUICK_METHODS = ("mima", "jt", "cp")
FULL_METHODS = ("mima", "jt", "cp", "alternating", "imma")


@dataclass
class ReproducePlan:
    groups: list[str]
    methods: list[str]
    attacks: list[str]
    control: bool = True


@dataclass(frozen=True)
class Task:
    """One unit of a reproduction: ``kind`` is erase, immunize, twin, attack or control."""

    kind: str
    group: str | None
    method: str | None = None
    deps: tuple[str, ...] = ()
    part: tuple[int, int] | None = None
    """``(i, n)`` for a twin task: the i-th of n interleaved slices of the concepts (1-based)."""

    @property
    def key(self) -> str:
        part = f"{self.part[0]}/{self.part[1]}" if self.part else None
        return " ".join(str(x) for x in (self.kind, self.group, self.method, part) if x is not None)

    def describe(self) -> str:
        g = f"[{self.group}]"
        return {"erase": f"{g} erase (UCE)", "immunize": f"{g} immunize with {self.method}",
                "twin": f"{g} attack the unimmunized model (the twin every method is compared with)"
                        + (f", concepts {self.part[0]}/{self.part[1]}" if self.part else ""),
                "attack": f"{g} attack the {self.method}-immunized model",
                "control": f"{g} control: attack the unimmunized model again (the 'none' row; MSGR 0 if "
                           "deterministic)"}[self.kind]


@dataclass
class ReproduceLog:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    immunize_runs: list[Path] = field(default_factory=list)


def parse_shard(shard: str | None) -> tuple[int, int]:
    if not shard:
        return 1, 1
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ValueError(f"--shard {shard!r}: expected i/n, e.g. 1/3") from None
    if not 1 <= i <= n:
        raise ValueError(f"--shard {shard!r}: i must be between 1 and n")
    return i, n


def plan(profile: Profile, methods: Sequence[str] | None = None, quick: bool = False,
         shard: str | None = None, groups: Sequence[str] | None = None, control: bool = True) -> ReproducePlan:
    """``groups``: only these (each checked against the profile); ``control``: also the control re-attack."""
    if groups:
        for g in groups:
            profile.group(g)  # a ProfileError naming the known groups
    chosen = list(groups or profile.groups) or [None]
    if quick:
        chosen = chosen[:1]
    i, n = parse_shard(shard)
    chosen = chosen[i - 1 :: n]
    return ReproducePlan(groups=chosen, methods=list(methods or (QUICK_METHODS if quick else FULL_METHODS)),
                         attacks=list(profile.attack.methods), control=control)


def _same_profile(run_dir: Path, profile: Profile) -> bool:
    from .runs import RunReader

    try:
        return RunReader(run_dir).profile().model_dump() == profile.model_dump()
    except Exception:
        return False


def _finished(runs_dir: Path, kind: str, profile: Profile, /, **fields) -> Path | None:
    """The newest finished run of ``kind`` whose status matches ``fields`` and whose profile equals ``profile``."""
    from .runs import newest

    found = newest(runs_dir, kind, where=lambda st: _same_profile(runs_dir / st.id, profile), **fields)
    return runs_dir / found.id if found is not None else None


def _attacked(runs_dir: Path, imm_run: Path, attack: str, control: bool = False) -> bool:
    """A finished ``attack`` of the immunization run ``imm_run`` (its control re-run with ``control``) exists."""
    from .runs import children

    def same_side(st) -> bool:
        return st.attack.control == control and st.attack.immunized != control

    return bool(children(runs_dir, imm_run.name, "immunize_run", kind="attack", state="finished", method=attack,
                         where=same_side))


def plan_tasks(profile: Profile, p: ReproducePlan, runs_dir: str | Path, profile_name: str | None = None,
               twin_parts: int = 1) -> tuple[list[Task], list[str]]:
    """The tasks still to run, in priority order (each after its dependencies), and the keys of finished ones.
    ``twin_parts > 1`` splits the unimmunized attack into that many tasks over interleaved slices of the concepts
    (parallel workers run them at once); the ``twin`` task then assembles one run from their cached concepts."""
    runs_dir = Path(runs_dir)
    tasks: list[Task] = []
    skipped: list[str] = []

    def add(task: Task, finished: bool) -> None:
        if finished:
            skipped.append(task.key)
        else:
            tasks.append(task)

    def needs(*keys: str) -> tuple[str, ...]:  # dependencies on finished work are met already
        pending = {t.key for t in tasks}
        return tuple(k for k in keys if k in pending)

    for group in p.groups:
        erase_key = f"erase {group}"
        if profile.erase.method == "uce":
            add(Task("erase", group), _finished(runs_dir, "erase", profile, group=group, profile=profile_name)
                is not None)
        imms = {m: _finished(runs_dir, "immunize", profile, group=group, method=m, profile=profile_name)
                for m in p.methods}
        for m in p.methods:
            add(Task("immunize", group, m, needs(erase_key)), imms[m] is not None)
        if not p.methods:
            continue
        first = p.methods[0]
        attacks = [m for m in p.methods
                   if imms[m] is None or not all(_attacked(runs_dir, imms[m], a) for a in p.attacks)]
        control = p.control and (
            imms[first] is None or not all(_attacked(runs_dir, imms[first], a, control=True) for a in p.attacks))
        twin_key = f"twin {group}"
        if attacks or control:
            parts = [Task("twin", group, None, needs(f"immunize {group} {first}"), (i, twin_parts))
                     for i in range(1, twin_parts + 1)] if twin_parts > 1 else []
            tasks.extend(parts)
            # the whole unimmunized run (assembled from the parts' cached concepts), which every attack compares with
            tasks.append(Task("twin", group, None, needs(f"immunize {group} {first}", *(t.key for t in parts))))
        for m in p.methods:
            add(Task("attack", group, m, needs(f"immunize {group} {m}", twin_key)), m not in attacks)
        if control:
            tasks.append(Task("control", group, None, needs(f"immunize {group} {first}", twin_key)))
        elif p.control:
            skipped.append(f"control {group}")
    return tasks, skipped


@dataclass
class _Context:
    """What every task needs besides itself (picklable: it travels to the worker processes)."""

    profile: Profile
    runs_dir: Path
    profile_name: str | None
    methods: list[str]
    attacks: list[str]
    device: str | None


def run_task(task: Task, ctx: _Context, progress=None) -> None:
    """Run one task; its inputs (the erased model, the immunization run) are the finished runs in the runs dir."""
    from .attacks.pairs import attack
    from .erase import erase
    from .immunize.runner import immunize

    kw = dict(profile=ctx.profile, profile_name=ctx.profile_name, device=ctx.device, progress=progress)

    def imm_run(method: str) -> Path:
        run = _finished(ctx.runs_dir, "immunize", ctx.profile, group=task.group, method=method,
                        profile=ctx.profile_name)
        if run is None:
            raise RuntimeError(f"{task.key}: no finished immunization with {method} of group {task.group}")
        return run

    if task.kind == "erase":
        erase(runs_dir=ctx.runs_dir, group=task.group, **kw)
    elif task.kind == "immunize":
        parent = None
        if ctx.profile.erase.method == "uce":
            parent = _finished(ctx.runs_dir, "erase", ctx.profile, group=task.group, profile=ctx.profile_name)
        immunize(runs_dir=ctx.runs_dir, group=task.group, method=task.method,
                 parent=str(parent) if parent else None, **kw)
    elif task.kind == "twin":
        attack(ctx.runs_dir, run=imm_run(ctx.methods[0]).name, methods=ctx.attacks, twin_only=True, part=task.part,
               live_eval=False, **kw)
    elif task.kind == "attack":
        run = imm_run(task.method)
        todo = [a for a in ctx.attacks if not _attacked(ctx.runs_dir, run, a)]
        attack(ctx.runs_dir, run=run.name, methods=todo, **kw)
    elif task.kind == "control":
        run = imm_run(ctx.methods[0])
        todo = [a for a in ctx.attacks if not _attacked(ctx.runs_dir, run, a, control=True)]
        attack(ctx.runs_dir, run=run.name, methods=todo, control=True, **kw)
    else:
        raise ValueError(f"unknown task kind {task.kind!r}")


def default_jobs(device: str | None, profile: Profile) -> int:
    """Worker processes for ``jobs="auto"``: one per CPU core on a CPU (at most 4), one on an accelerator."""
    from .models import pick_device

    if pick_device(device or profile.model.device).type != "cpu":
        return 1
    return max(1, min(4, os.cpu_count() or 1))


# the worker processes' state, set by _init_worker
_progress_queue = None


def _init_worker(threads: int, queue, worker_init) -> None:
    import torch

    global _progress_queue
    torch.set_num_threads(threads)
    _progress_queue = queue
    if worker_init is not None:
        worker_init()


def _worker_progress(label: str):
    def send(stage: str, step: int, total: int, info: dict | None = None) -> None:
        _progress_queue.put((f"{label}: {stage}", step, total, info or {}))
    return send


def _timed_run(task: Task, ctx: _Context, progress=None) -> float:
    """:func:`run_task`; returns its seconds."""
    t0 = time.monotonic()
    run_task(task, ctx, progress)
    return time.monotonic() - t0


def _run_in_worker(task: Task, ctx: _Context) -> float:
    return _timed_run(task, ctx, _worker_progress(task.method or task.kind) if _progress_queue is not None else None)


def _schedule(tasks: list[Task], start: Callable[[Task], object], wait: Callable[[], tuple[Task, float]],
              jobs: int, say: Callable[[str], None], log: ReproduceLog) -> None:
    """Start ready tasks (all dependencies done) in list order, at most ``jobs`` at a time, until all are done.
    A dependency that no task provides is never done: the tasks that wait for it are an error once nothing runs."""
    from graphlib import CycleError, TopologicalSorter

    by_key = {t.key: t for t in tasks}
    order = {t.key: i for i, t in enumerate(tasks)}
    graph = TopologicalSorter({t.key: t.deps for t in tasks})
    try:
        graph.prepare()
    except CycleError as e:
        raise RuntimeError(f"tasks with unmet dependencies: a cycle {' -> '.join(e.args[1])}") from None
    ready: list[str] = []
    started: set[str] = set()
    running = 0
    while graph.is_active():
        ready = sorted([*ready, *(k for k in graph.get_ready() if k in by_key)], key=order.__getitem__)
        while ready and running < jobs:
            t = by_key[ready.pop(0)]
            say(t.describe())
            start(t)
            started.add(t.key)
            running += 1
        if not running:
            waiting = [t.key for t in tasks if t.key not in started]
            raise RuntimeError(f"tasks with unmet dependencies: {', '.join(waiting)}")
        t, seconds = wait()
        running -= 1
        graph.done(t.key)
        log.done.append(t.key)
        if jobs > 1:
            say(f"  done: {t.key} ({seconds / 60:.1f} min)")


def reproduce(profile: Profile, *, runs_dir: str | Path, profile_name: str | None = None,
              methods: Sequence[str] | None = None, quick: bool = False, shard: str | None = None,
              device: str | None = None, jobs: int | str = 1, progress=None, status=None,
              worker_init: Callable[[], None] | None = None, groups: Sequence[str] | None = None,
              control: bool = True) -> ReproduceLog:
    """Run the plan, skipping finished work. ``status(message)`` reports each task as it starts (the CLI prints
    it). ``jobs``: worker processes (``"auto"``: :func:`default_jobs`); 1 runs every task in this process.
    ``worker_init``: a module-level function each worker process calls first (e.g. to silence loading bars). Every
    image set of the profile is checked first (:func:`engine.image_sets.check_image_sets`)."""
    from .image_sets import check_image_sets, profile_image_sets

    runs_dir = Path(runs_dir)
    p = plan(profile, methods, quick, shard, groups, control)
    check_image_sets(profile_image_sets(profile), path=profile_name)
    say = status or (lambda msg: None)
    n = max(1, default_jobs(device, profile) if jobs == "auto" else int(jobs))
    tasks, skipped = plan_tasks(profile, p, runs_dir, profile_name, twin_parts=n)
    log = ReproduceLog(skipped=skipped)
    ctx = _Context(profile, runs_dir, profile_name, p.methods, p.attacks, device)
    n = min(n, len(tasks) or 1)
    if n == 1:
        pending: list[tuple[Task, float]] = []

        def start(t: Task) -> None:
            pending.append((t, _timed_run(t, ctx, progress)))

        _schedule(tasks, start, pending.pop, 1, say, log)
    else:
        _run_parallel(tasks, ctx, n, progress, say, log, worker_init)
    for group in p.groups:
        for m in p.methods:
            run = _finished(runs_dir, "immunize", profile, group=group, method=m, profile=profile_name)
            if run is not None:
                log.immunize_runs.append(run)
    return log


def _run_parallel(tasks: list[Task], ctx: _Context, jobs: int, progress, say, log: ReproduceLog,
                  worker_init=None) -> None:
    import multiprocessing as mp
    import threading
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
    from concurrent.futures import wait as wait_futures

    spawn = mp.get_context("spawn")
    manager = spawn.Manager() if progress is not None else None
    queue = manager.Queue() if manager is not None else None
    threads = max(1, (os.cpu_count() or 1) // jobs)
    stop = threading.Event()

    def forward() -> None:  # worker progress -> the caller's callback, in this process
        import queue as queue_mod

        while not stop.is_set():
            try:
                progress(*queue.get(timeout=0.2))
            except queue_mod.Empty:
                continue

    pump = threading.Thread(target=forward, daemon=True) if queue is not None else None
    if pump:
        pump.start()
    futures: dict = {}
    initargs = (threads, queue, worker_init)
    with ProcessPoolExecutor(jobs, mp_context=spawn, initializer=_init_worker, initargs=initargs) as pool:
        def start(t: Task) -> None:
            futures[pool.submit(_run_in_worker, t, ctx)] = t

        def wait() -> tuple[Task, float]:
            finished, _ = wait_futures(list(futures), return_when=FIRST_COMPLETED)
            f = next(iter(finished))
            t = futures.pop(f)
            return t, f.result()  # a task's exception stops the reproduction (finished runs stay)

        try:
            _schedule(tasks, start, wait, jobs, say, log)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            stop.set()
            if pump is not None:
                pump.join()
            if manager is not None:
                manager.shutdown()
