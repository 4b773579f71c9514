"""Typed ``status.json``: a run's state and its links to other runs, read the same way by every reader.

``status.json``::

    id, state (running|finished|failed|interrupted), progress (0..1), started, updated (unix times),
    error (message or null), kind (erase|immunize|attack|evaluate|...), method, profile, group,
    concepts (list), parent (run id this run started from), twin (run id of the matching run, e.g. the
    attack on the unimmunized model), base_model_hash, pid, extra (free table)

:class:`RunStatus` reads it; the free ``extra`` table has a typed view per kind of run:

* :class:`AttackLinks` (``attack`` runs): the attack pair — what was attacked, on which model, which immunization
  run it belongs to, the cache keys of the unimmunized attack (written by :mod:`engine.attacks.pairs`);
* :class:`ModelLinks` (``erase`` and ``immunize`` runs): the model the run started from and the concepts it kept;
* :class:`EvaluateLinks` (``evaluate`` runs): the pairs evaluated, or the run whose utility was measured;
* :class:`UtilitySummary` (``extra.utility`` of any run that measured its utility, :mod:`engine.metrics.utility`).

Every field has a default and unknown keys are kept, so status files written by older versions (without the
newer keys) and by newer ones load alike; a value that is null where a list or table belongs reads as empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

__all__ = [
    "EVENT_KINDS", "RUN_STATES", "STATUS_FIELDS", "PROFILE_FILE", "EVENTS_FILE", "STATUS_FILE",
    "RunStatus", "AttackLinks", "ModelLinks", "EvaluateLinks", "UtilitySummary",
]

EVENT_KINDS = ("scalar", "image", "metric", "status", "progress")
RUN_STATES = ("running", "finished", "failed", "interrupted")
STATUS_FIELDS = (
    "id", "state", "progress", "started", "updated", "error", "kind", "method", "profile", "group", "concepts",
    "parent", "twin", "base_model_hash", "pid", "extra",
)
PROFILE_FILE = "profile.toml"
EVENTS_FILE = "events.jsonl"
STATUS_FILE = "status.json"


class _Lenient(BaseModel):
    """Unknown keys kept; a null where a field has a non-null default reads as that default."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items()
                    if not (v is None and k in cls.model_fields and cls.model_fields[k].default is not None)}
        return data

    def to_dict(self) -> dict[str, Any]:
        """The table as written: the keys that were given (defaults not added), unknown keys included."""
        return self.model_dump(exclude_unset=True)


class AttackLinks(_Lenient):
    """``extra`` of an attack run (see :mod:`engine.attacks.pairs`).

    The pair: the run on the immunized model (``immunized``) or the control re-run (``control``) is the compared
    side (x^T); its ``twin`` is the unimmunized run (x^A), whose ``twins`` lists every run compared with it.
    """

    attack: str | None = None
    concepts: list[str] = []
    targets: list[str] = []
    others: list[str] = []
    immunized: bool = False
    control: bool = False
    immunize_run: str | None = None
    immunize_runs: list[str] = []
    immunize_method: str | None = None
    model: str | None = None
    """The model reference attacked (a run directory, a folder or a hub id)."""
    settings: dict[str, Any] = {}
    seed: int | None = None
    eval_seeds: list[int] = []
    eval_prompts: dict[str, str] = {}
    cache_keys: dict[str, str] = {}
    """concept -> cache key of its attack (the unimmunized run and the control)."""
    done: list[str] = []
    """Concepts whose attack finished."""
    reused: dict[str, str] = {}
    """Concepts copied from cached runs: concept -> source run id."""
    group_size: int | None = None
    data: dict[str, Any] = {}
    twins: list[str] = []

    @property
    def compared(self) -> bool:
        """The x^T side of a pair: an attack on an immunized model, or a control re-run."""
        return self.immunized or self.control

    @property
    def method(self) -> str:
        """The immunization method compared (``none`` for the control re-run)."""
        return "none" if self.control else str(self.immunize_method or "?")


class ModelLinks(_Lenient):
    """``extra`` of an erase or immunization run: where its model came from."""

    base: str | None = None
    """``[model] base`` of the run."""
    parent_model: str | None = None
    """The model the immunization started from (an erase run directory or the base)."""
    others: list[str] | None = None
    """The group's other concepts, as the immunization run saw them (None when it did not say)."""
    target: str | None = None


class EvaluateLinks(_Lenient):
    """``extra`` of an evaluate run: the pairs it evaluated, or (method ``utility``) the model it measured."""

    attack_runs: list[str] = []
    twin_runs: list[str] = []
    metrics: list[str] = []
    groups: list[str] = []
    utility_of: str | None = None
    model_run: str | None = None
    parent_model: str | None = None


class UtilitySummary(_Lenient):
    """``extra.utility``: the newest utility measurement of the run (:mod:`engine.metrics.utility`)."""

    primary: str | None = None
    threshold: float | None = None
    share: float | None = None
    collapsed: bool = False
    roles: dict[str, Any] = {}


class RunStatus(_Lenient):
    """A run's ``status.json`` (see the module docstring); ``dir`` is where it was read from."""

    id: str
    state: str = "unknown"
    """running, finished, failed or interrupted (``unknown``: no readable status.json)."""
    progress: float = 0.0
    started: float | None = None
    updated: float | None = None
    """Unix times of the start and of the last write."""
    error: str | None = None
    kind: str | None = None
    """erase, immunize, attack, evaluate, ..."""
    method: str | None = None
    """The immunization method, the attack, or an evaluate run's metrics."""
    profile: str | None = None
    """The profile name or path the run was started with."""
    group: str | None = None
    concepts: list[str] = []
    parent: str | None = None
    """The run this run started from (an erase run, the immunization run an attack attacked, ...)."""
    twin: str | None = None
    """The matching run: the unimmunized attack of a pair (on the unimmunized side: the newest run compared)."""
    base_model_hash: str | None = None
    pid: int | None = None
    extra: dict[str, Any] = {}
    """The free table, typed by :attr:`attack`, :attr:`source`, :attr:`evaluation` and :attr:`utility`."""
    dir: Path | None = None
    """Where the status was read from (not written in status.json)."""

    @classmethod
    def of(cls, status: RunStatus | dict[str, Any]) -> RunStatus:
        """The typed status of a ``status.json`` table; one whose values have the wrong types reads as a damaged
        file (state ``unknown``, ``error`` saying why), as :func:`~engine.runs.read_status` reads an unreadable one."""
        if isinstance(status, RunStatus):
            return status
        try:
            return cls.model_validate(status)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            return cls(id=str(status.get("id", "?")), dir=status.get("dir"),
                       error=f"status.json: {where}: {first['msg']}")

    @property
    def finished(self) -> bool:
        return self.state == "finished"

    @property
    def attack(self) -> AttackLinks | None:
        """The attack pair's links (attack runs only)."""
        return AttackLinks.model_validate(self.extra) if self.kind == "attack" else None

    @property
    def source(self) -> ModelLinks:
        """Where the run's model came from (erase and immunization runs)."""
        return ModelLinks.model_validate(self.extra)

    @property
    def evaluation(self) -> EvaluateLinks | None:
        """What an evaluate run evaluated (evaluate runs only)."""
        return EvaluateLinks.model_validate(self.extra) if self.kind == "evaluate" else None

    @property
    def utility(self) -> UtilitySummary | None:
        """``extra.utility`` (None when the run never measured its utility)."""
        summary = self.extra.get("utility")
        return UtilitySummary.model_validate(summary) if isinstance(summary, dict) else None

    @property
    def compared(self) -> bool:
        """The x^T side of an attack pair (see :attr:`AttackLinks.compared`)."""
        links = self.attack
        return links is not None and links.compared

    def link(self, name: str) -> str | None:
        """The run id this run names as ``name``: ``parent``, ``twin``, ``immunize_run`` (an attack's immunization
        run) or ``model_run`` (the run an evaluate run measured)."""
        if name in ("parent", "twin"):
            return getattr(self, name)
        if name == "immunize_run":
            links = self.attack
            return links.immunize_run if links else None
        if name == "model_run":
            links = self.evaluation
            return links.model_run if links else None
        raise ValueError(f"unknown link {name!r}; expected parent, twin, immunize_run or model_run")
