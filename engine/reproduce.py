"""``reproduce``: the whole experiment of a profile — erase, immunize every group with each method, attack, evaluate.

Work whose finished run already exists (same profile contents, group, method and parent) is skipped, so an
interrupted or sharded reproduction resumes, also across days and machines that share the runs directory.
``--shard i/n`` takes every n-th group starting at the i-th (1-based).
"""

from __future__ import annotations

from collections.abc import Sequence
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
         shard: str | None = None) -> ReproducePlan:
    groups = list(profile.groups) or [None]
    if quick:
        groups = groups[:1]
    i, n = parse_shard(shard)
    groups = groups[i - 1 :: n]
    return ReproducePlan(groups=groups, methods=list(methods or (QUICK_METHODS if quick else FULL_METHODS)),
                         attacks=list(profile.attack.methods))


def _same_profile(run_dir: Path, profile: Profile) -> bool:
    from .runs import RunReader

    try:
        return RunReader(run_dir).profile().model_dump() == profile.model_dump()
    except Exception:
        return False


def _finished(runs_dir: Path, kind: str, profile: Profile, /, **fields) -> Path | None:
    """The newest finished run of ``kind`` whose status matches ``fields`` and whose profile equals ``profile``."""
    from .runs import list_runs

    for st in reversed(list_runs(runs_dir)):
        if st.get("kind") != kind or st.get("state") != "finished":
            continue
        if all(st.get(k) == v for k, v in fields.items()) and _same_profile(runs_dir / st["id"], profile):
            return runs_dir / st["id"]
    return None


def _attacked(runs_dir: Path, imm_run: Path, attack: str, control: bool = False) -> bool:
    from .runs import list_runs

    for st in list_runs(runs_dir):
        extra = st.get("extra") or {}
        if (st.get("kind") == "attack" and st.get("state") == "finished" and st.get("method") == attack
                and extra.get("immunize_run") == imm_run.name and bool(extra.get("control")) == control
                and bool(extra.get("immunized")) != control):
            return True
    return False


def reproduce(profile: Profile, *, runs_dir: str | Path, profile_name: str | None = None,
              methods: Sequence[str] | None = None, quick: bool = False, shard: str | None = None,
              device: str | None = None, progress=None, status=None) -> ReproduceLog:
    """Run the plan, skipping finished work. ``status(message)`` reports each step (the CLI prints it)."""
    from .attack_runs import attack
    from .erase import erase
    from .immunize.runner import immunize

    runs_dir = Path(runs_dir)
    p = plan(profile, methods, quick, shard)
    log = ReproduceLog()
    say = status or (lambda msg: None)
    for group in p.groups:
        parent = None
        if profile.erase.method == "uce":
            parent = _finished(runs_dir, "erase", profile, group=group, profile=profile_name)
            if parent is None:
                say(f"[{group}] erase (UCE)")
                parent = erase(profile, runs_dir=runs_dir, group=group, profile_name=profile_name, device=device,
                               progress=progress)
                log.done.append(f"erase {group}")
            else:
                log.skipped.append(f"erase {group}")
        first_imm = None
        for method in p.methods:
            key = f"immunize {group} {method}"
            imm = _finished(runs_dir, "immunize", profile, group=group, method=method, profile=profile_name)
            if imm is None:
                say(f"[{group}] immunize with {method}")
                imm = immunize(profile, runs_dir=runs_dir, group=group, method=method, profile_name=profile_name,
                               parent=str(parent) if parent else None, device=device, progress=progress)
                log.done.append(key)
            else:
                log.skipped.append(key)
            first_imm = first_imm or imm
            log.immunize_runs.append(imm)
            todo = [a for a in p.attacks if not _attacked(runs_dir, imm, a)]
            if todo:
                say(f"[{group}] attack {', '.join(todo)} on {method} and its unimmunized twin")
                attack(runs_dir, run=imm.name, methods=todo, profile=profile, profile_name=profile_name,
                       device=device, progress=progress)
                log.done.append(f"attack {group} {method}")
            else:
                log.skipped.append(f"attack {group} {method}")
        if p.control and first_imm is not None:
            todo = [a for a in p.attacks if not _attacked(runs_dir, first_imm, a, control=True)]
            if todo:
                say(f"[{group}] control: attack the unimmunized model again (the 'none' row; MSGR 0 if deterministic)")
                attack(runs_dir, run=first_imm.name, methods=todo, profile=profile, profile_name=profile_name,
                       control=True, device=device, progress=progress)
                log.done.append(f"control {group}")
    return log
