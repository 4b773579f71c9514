"""Questions asked of a runs directory: the newest run that matches, the runs that link to one, the attack pairs.

    from engine.runs import Runs, newest, children, pairs
    newest("runs", "immunize", group="g2")                       # the newest finished immunization of group g2
    children("runs", imm_id, link="immunize_run", kind="attack")  # every attack of an immunization run
    pairs("runs")                                                 # every finished attack pair
    runs = Runs.scan("runs"); runs.newest(...); runs.children(...) # several questions of one scan

Statuses come from :func:`~engine.runs.list_runs` (oldest first: ids sort by start time), typed
(:class:`~engine.runs.RunStatus`). Filters: ``kind``; ``state`` (default ``"finished"``; a tuple of states, or None
for any); keyword fields of the status that must be equal (``group="g2"``, ``profile=None`` matches a status
without a profile); and ``where``, a function of the status, called only on runs that pass the other filters,
newest first in :meth:`Runs.newest` (so an expensive test runs as few times as it can).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EvaluationError
from .reader import RunNotFound, find_run, list_runs, load_status
from .status import AttackLinks, RunStatus

__all__ = ["Runs", "Pair", "newest", "select", "children", "pairs", "pair_of", "ANY_STATE", "CACHE_STATES"]

ANY_STATE = None
CACHE_STATES = ("finished", "interrupted", "failed")
"""States of an unimmunized attack run whose finished concepts serve as a cache."""

Where = Callable[[RunStatus], bool]


class Runs(Sequence[RunStatus]):
    """Typed statuses of runs, oldest first, and the queries on them (see the module docstring)."""

    def __init__(self, statuses: Iterable[RunStatus | Mapping[str, Any]], runs_dir: str | os.PathLike | None = None):
        self.runs_dir = Path(runs_dir) if runs_dir is not None else None
        self._all = [RunStatus.of(dict(s) if not isinstance(s, RunStatus) else s) for s in statuses]
        self._by_id = {s.id: s for s in self._all}

    @classmethod
    def scan(cls, runs_dir: str | os.PathLike) -> Runs:
        """The runs under ``runs_dir`` now."""
        return cls(list_runs(runs_dir), runs_dir)

    def __len__(self) -> int:
        return len(self._all)

    def __getitem__(self, i):
        return self._all[i]

    def __iter__(self) -> Iterator[RunStatus]:
        return iter(self._all)

    def get(self, run_id: str) -> RunStatus | None:
        return self._by_id.get(run_id)

    def dir_of(self, ref: str, runs_dir: str | os.PathLike) -> Path | None:
        """The directory of the run ``ref`` names (an id of these runs, else as :func:`~engine.runs.find_run`
        resolves it), or None when there is none."""
        s = self._by_id.get(ref)
        if s is not None and s.dir is not None:
            return Path(s.dir)
        try:
            return find_run(runs_dir, ref)
        except RunNotFound:
            return None

    def _match(self, s: RunStatus, kind: str | None, state: str | Sequence[str] | None, fields: Mapping[str, Any]) -> bool:
        if kind is not None and s.kind != kind:
            return False
        if state is not None and (s.state != state if isinstance(state, str) else s.state not in state):
            return False
        return all(getattr(s, k, None) == v for k, v in fields.items())

    def select(self, kind: str | None = None, *, state: str | Sequence[str] | None = "finished",
               where: Where | None = None, **fields: Any) -> list[RunStatus]:
        """Every run that matches, oldest first."""
        return [s for s in self._all if self._match(s, kind, state, fields) and (where is None or where(s))]

    def newest(self, kind: str | None = None, *, state: str | Sequence[str] | None = "finished",
               where: Where | None = None, **fields: Any) -> RunStatus | None:
        """The newest run that matches, or None."""
        for s in reversed(self._all):
            if self._match(s, kind, state, fields) and (where is None or where(s)):
                return s
        return None

    def children(self, run_id: str, link: str = "parent", *, kind: str | None = None,
                 state: str | Sequence[str] | None = None, where: Where | None = None, **fields: Any) -> list[RunStatus]:
        """The runs whose ``link`` (:meth:`RunStatus.link`: parent, twin, immunize_run, model_run) is ``run_id``,
        oldest first; any state unless ``state`` says."""
        return self.select(kind, state=state, where=lambda s: s.link(link) == run_id and (where is None or where(s)),
                           **fields)

    def pairs(self) -> list[RunStatus]:
        """The x^T sides of every finished attack pair (:attr:`RunStatus.compared`), oldest first."""
        return self.select("attack", where=lambda s: s.compared)


def select(runs_dir: str | os.PathLike, kind: str | None = None, **filters: Any) -> list[RunStatus]:
    """:meth:`Runs.select` of the runs under ``runs_dir`` now."""
    return Runs.scan(runs_dir).select(kind, **filters)


def newest(runs_dir: str | os.PathLike, kind: str | None = None, **filters: Any) -> RunStatus | None:
    """:meth:`Runs.newest` of the runs under ``runs_dir`` now."""
    return Runs.scan(runs_dir).newest(kind, **filters)


def children(runs_dir: str | os.PathLike, run_id: str, link: str = "parent", **filters: Any) -> list[RunStatus]:
    """:meth:`Runs.children` of the runs under ``runs_dir`` now."""
    return Runs.scan(runs_dir).children(run_id, link, **filters)


# ---------------------------------------------------------------------------------------------- pairs


@dataclass
class Pair:
    """An attack pair read from the runs directory: the x^T run (on the immunized model, or the control re-run)
    and its twin x^A (on the unimmunized model)."""

    run: Path
    twin: Path
    status: RunStatus
    """The x^T run's status."""

    @property
    def links(self) -> AttackLinks:
        return self.status.attack or AttackLinks()

    @property
    def targets(self) -> list[str]:
        return list(self.links.targets)

    @property
    def others(self) -> list[str]:
        return list(self.links.others)

    @property
    def id(self) -> str:
        return self.run.name

    @property
    def attack(self) -> str:
        return str(self.status.method)

    @property
    def group(self) -> str | None:
        return self.status.group


def pair_of(runs_dir: str | os.PathLike, run_dir: str | os.PathLike) -> Pair:
    """The :class:`Pair` whose x^T side is ``run_dir``; :class:`~engine.errors.EvaluationError` if it is none."""
    run_dir = Path(run_dir)
    st = load_status(run_dir)
    if not st.compared:
        raise EvaluationError(f"{run_dir.name} is not an attack run on an immunized model (kind {st.kind!r})")
    if not st.twin:
        raise EvaluationError(f"{run_dir.name} has no twin (the attack on the unimmunized model)")
    try:
        twin = find_run(runs_dir, st.twin)
    except RunNotFound as e:
        raise EvaluationError(f"{run_dir.name}: its twin is missing: {e}") from None
    return Pair(run_dir, twin, st)


def pairs(runs_dir: str | os.PathLike, refs: Sequence[str] | None = None) -> list[Pair]:
    """Attack pairs. ``refs`` None: every finished pair under ``runs_dir`` whose twin exists, oldest first. Else the
    pairs the references name: an attack run (either side), an immunization run (its attacks), an evaluate run (the
    pairs it evaluated), in the order named; :class:`~engine.errors.EvaluationError` for anything else."""
    runs = Runs.scan(runs_dir)
    if not refs:
        out = []
        for st in runs.pairs():
            twin = runs.dir_of(st.twin, runs_dir) if st.twin else None
            if twin is not None:
                out.append(Pair(Path(st.dir or Path(runs_dir) / st.id), twin, st))
        return out
    found: dict[str, Pair] = {}
    for ref in refs:
        try:
            run_dir = find_run(runs_dir, ref)
        except RunNotFound as e:
            raise EvaluationError(str(e)) from None
        st = load_status(run_dir)
        if st.compared:
            ids = [run_dir.name]
        elif st.kind == "attack":  # the unimmunized side: every run compared with it
            ids = [r.id for r in runs.children(run_dir.name, "twin", where=lambda r: r.compared)]
        elif st.kind == "immunize":
            ids = [r.id for r in runs.children(run_dir.name, "immunize_run", where=lambda r: r.compared)]
        elif st.kind == "evaluate":
            ids = list(st.evaluation.attack_runs)
        else:
            raise EvaluationError(f"{run_dir.name} is a {st.kind!r} run; expected an attack, immunization or evaluate run")
        if not ids:
            raise EvaluationError(f"{run_dir.name}: no attack pairs found (run `mima attack` first)")
        for i in ids:
            if i not in found:
                try:
                    found[i] = pair_of(runs_dir, find_run(runs_dir, i))
                except RunNotFound as e:
                    raise EvaluationError(f"{run_dir.name}: {e}") from None
    return list(found.values())
