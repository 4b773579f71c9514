"""What ``mima attack`` attacks: the immunization run, its twin model, the concepts and the attack settings.

    from engine.attacks.plan import plan_attack
    plan = plan_attack("runs", methods=["lora"])       # the newest finished immunization run
    plan.targets, plan.others, plan.twin_model          # what :func:`engine.attacks.pairs.run_attacks` will attack

Nothing loads or trains here: a plan is resolved from the runs directory and the profile alone, so that bad input
(an unknown attack, a run that is not a finished immunization run, a missing twin) is refused before any work.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from engine.errors import UsageError
from engine.profile import AttackSettings, Profile, ProfileError
from engine.runs import RunStatus

PERSONALIZATION = ("dreambooth", "dreambooth-lora", "textual-inversion", "custom-diffusion")
"""The personalization attacks (the paper's Table 3 averages over them); ``lora`` is the re-learning attack."""
MAX_OTHERS = 2
"""Other (non-target) concepts attacked beside the targets, for MRSGR."""

__all__ = ["AttackUsageError", "AttackFailure", "AttackPlan", "PERSONALIZATION", "MAX_OTHERS", "parse_methods",
           "find_immunize_run", "plan_attack"]


class AttackUsageError(ValueError, UsageError):
    """Bad input: an unknown attack, a run that is not a finished immunization run, missing images, a profile
    that cannot drive the attack (the CLI exits 2)."""


class AttackFailure(RuntimeError):
    """An attack that failed while running (the CLI exits 1)."""


@dataclass
class AttackPlan:
    """What :func:`engine.attacks.pairs.run_attacks` does: resolved by :func:`plan_attack` before anything trains."""

    profile: Profile
    profile_name: str | None
    immunize_run: Path
    immunize_status: RunStatus
    group: str | None
    targets: list[str]
    others: list[str]
    methods: list[str]
    settings: dict[str, AttackSettings]
    model: str
    """The immunized model (the immunization run directory)."""
    twin_model: str
    """The model the immunization started from (an erase run directory or ``[model] base``)."""
    twin_parent: str | None
    """The run id of :attr:`twin_model` (None for a base model)."""
    twin_hash: str | None
    """Content hash of :attr:`twin_model` when the immunization run recorded it."""
    control: bool = False
    twin_only: bool = False
    """Attack only the unimmunized model (or find it in the cache); ``mima reproduce`` runs this first, so that
    the attacks of every method and the control, in parallel workers, reuse one unimmunized run."""

    @property
    def concepts(self) -> list[str]:
        return self.targets + self.others

    @property
    def immunize_method(self) -> str:
        return "none" if self.control else str(self.immunize_status.method)

    @property
    def group_size(self) -> int:
        if self.group and self.group in self.profile.groups:
            return len(self.profile.groups[self.group])
        return len(self.targets)


def _attack_names() -> list[str]:
    from . import ATTACKS

    return list(ATTACKS)


def parse_methods(methods: Sequence[str] | None, profile: Profile) -> list[str]:
    """Attack names from ``methods`` (``all`` = every attack; comma lists allowed), default ``[attack] methods``."""
    known = _attack_names()
    if not methods:
        return list(profile.attack.methods)
    out: list[str] = []
    for item in methods:
        for name in (n.strip() for n in str(item).split(",")):
            if not name:
                continue
            if name == "all":
                chosen = known
            elif name in known:
                chosen = [name]
            else:
                close = difflib.get_close_matches(name, known + ["all"], n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"choose from {', '.join(known)} or all"
                raise AttackUsageError(f"unknown attack '{name}'; {hint}")
            out += [m for m in chosen if m not in out]
    if not out:
        raise AttackUsageError("no attack method given")
    return out


def find_immunize_run(runs_dir: str | Path, run: str | None = None, *, profile_name: str | None = None,
                      group: str | None = None) -> Path:
    """The immunization run ``run`` names, or the newest finished one (of ``profile_name`` / ``group`` if given)."""
    from engine.runs import RunNotFound, find_run, load_status, newest

    if run is not None:
        try:
            path = find_run(runs_dir, run)
        except RunNotFound as e:
            raise AttackUsageError(str(e)) from None
        st = load_status(path)
        if st.kind != "immunize":
            raise AttackUsageError(f"{path.name} is not an immunization run (kind {st.kind!r}); "
                                   "attack an immunization run (see `mima runs list`)")
        if st.state != "finished":
            raise AttackUsageError(f"immunization run {path.name} is {st.state}, not finished; "
                                   "resume it with `mima immunize --resume`")
        if group is not None and st.group != group:
            raise AttackUsageError(f"immunization run {path.name} is of group {st.group!r}, not {group!r}")
        return path
    wanted = {k: v for k, v in (("group", group), ("profile", profile_name)) if v is not None}
    found = newest(runs_dir, "immunize", **wanted)
    if found is not None:
        return Path(found.dir)
    which = " ".join(p for p in (f"of profile {profile_name}" if profile_name else "",
                                 f"of group {group}" if group else "") if p)
    raise AttackUsageError(f"no finished immunization run {which + ' ' if which else ''}in {runs_dir}; "
                           "run `mima immunize` first or pass --run".replace("  ", " "))


def plan_attack(runs_dir: str | Path, *, run: str | None = None, profile: Profile | None = None,
                profile_name: str | None = None, overrides: Sequence[str] = (), group: str | None = None,
                methods: Sequence[str] | None = None, steps: int | None = None, control: bool = False,
                twin_only: bool = False, part: tuple[int, int] | None = None) -> AttackPlan:
    """Resolve what to attack (see :mod:`engine.attacks.pairs`).

    ``profile``: the profile whose ``[attack]``, ``[eval]`` and concepts apply (default: the immunization run's saved
    ``profile.toml`` with ``overrides``). ``profile_name`` / ``group`` also select the newest immunization run when
    ``run`` is None. ``steps`` overrides the attack steps of every method. ``part = (i, n)`` (with ``twin_only``)
    attacks the i-th of n interleaved slices of the concepts (1-based; it may be empty): parts of the unimmunized
    attack that parallel workers run at once and a later attack assembles from the cache.
    """
    from engine.profile import load_profile
    from engine.runs import find_run, load_status

    runs_dir = Path(runs_dir)
    imm = find_immunize_run(runs_dir, run, profile_name=profile_name if profile is not None else None, group=group)
    st = load_status(imm)
    if profile is None:
        profile = load_profile(imm / "profile.toml", overrides)
        profile_name = st.profile
    source = st.source
    try:
        targets = [profile.concept(n).name for n in st.concepts]
        names = source.others
        if names is None and st.group in profile.groups:
            names = profile.group(st.group).other_names
        others = [n for n in (names or []) if n in profile.concept_names and n not in targets][:MAX_OTHERS]
    except ProfileError as e:
        raise AttackUsageError(f"immunization run {imm.name}: {e}") from None
    if not targets:
        raise AttackUsageError(f"immunization run {imm.name} names no target concepts")
    if part is not None:
        if not twin_only:
            raise ValueError("part: a slice of the concepts is attacked only with twin_only")
        i, n = part
        keep = set((targets + others)[i - 1 :: n])
        targets, others = [c for c in targets if c in keep], [c for c in others if c in keep]
    chosen = parse_methods(methods, profile)
    settings = {}
    for m in chosen:
        s = profile.attack.settings(m)
        settings[m] = replace(s, steps=int(steps)) if steps is not None else s
    twin_parent = st.parent
    if twin_parent:
        try:
            twin_model = str(find_run(runs_dir, twin_parent))
        except Exception:
            raise AttackUsageError(f"immunization run {imm.name} started from run {twin_parent}, which is missing "
                                   f"from {runs_dir}; its twin cannot be attacked") from None
    else:
        twin_model = str(source.parent_model or source.base or profile.model.base)
    return AttackPlan(profile=profile, profile_name=profile_name, immunize_run=imm, immunize_status=st,
                      group=st.group, targets=targets, others=others, methods=chosen, settings=settings,
                      model=str(imm), twin_model=twin_model, twin_parent=twin_parent,
                      twin_hash=st.base_model_hash, control=control, twin_only=twin_only)
