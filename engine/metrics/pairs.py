"""MSGR and MRSGR of attack pairs: the metric events ``mima attack`` logs live and ``mima evaluate`` recomputes.

An *attack pair* is two attack runs with the same attack, concepts, data, seeds and settings: one on the immunized
model (x^T = x^I) and its twin on the model immunization started from (x^A). Both keep their evaluation images as
arrays (:mod:`engine.runs.images`), so every number here can be recomputed from the run directories alone.

Metric events (kind ``metric``, ``step`` = the attack step; tags always hold ``metric``, ``attack``, ``group`` and
``step``; :func:`concept_events`, :func:`msgr_events`, :func:`mrsgr_events` and :class:`PairEvaluator` make them):

``sim/<metric>/<concept>``
    tags ``concept``, ``role`` (``target`` | ``other``) and ``pair``, which sets were compared:
    similarity metrics: ``r-A`` = M(x^r_n, x^A_n) and ``r-T`` = M(x^r_n, x^T_n) (targets), ``I-A`` = M(x^I_n, x^A_n)
    (targets and others); ``judge-acc``: ``A`` = acc(x^A_n), ``T`` = acc(x^T_n) (targets and others: the others'
    are the learnability of the immunized model), ``I-A`` = label agreement.
``msgr/<metric>``
    MSGR over the targets (docs/method.md, Eq. 10-11); ``null`` when undefined, with a ``note`` field saying why.
``mrsgr/<metric>``
    MRSGR, targets vs others; fields ``target_mean``, ``other_mean`` (and ``note``).
``success/<metric>``
    accuracy metrics only: the mean of acc(x^A_n) over the targets, i.e. how well the attack works on the
    unimmunized twin. An MSGR only means something when this is high.

An ``evaluate`` run (``mima evaluate``, :mod:`engine.metrics.evaluate`) logs the same events with two more tags, ``attack_run`` (the attack run on
the immunized model) and ``twin_run``. Randomly initialised backbones are refused (:func:`engine.metrics.require_trained`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import EvaluationError
from engine.runs.images import load_eval_images

__all__ = ["EvaluationError", "MetricEvent", "ImagesAt", "PairEvaluator", "check_backends", "concept_events",
           "msgr_events", "mrsgr_events", "log_event", "pair_images_reader"]


# ------------------------------------------------------------------------------------------- events


@dataclass
class MetricEvent:
    """One metric event to log: ``logger.log("metric", name, value, step=step, tags=tags, **fields)``."""

    name: str
    value: float | None
    step: int
    tags: dict[str, Any]
    fields: dict[str, Any] = field(default_factory=dict)


def _clean(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def check_backends(backends: Mapping[str, Any]) -> None:
    """Refuse randomly initialised backbones (their numbers mean nothing)."""
    from engine.metrics import require_trained

    for backend in backends.values():
        require_trained(backend)


def concept_events(backend: Any, concept: str, role: str, step: int, x_a: np.ndarray, x_t: np.ndarray,
                   reference: np.ndarray | None, tags: Mapping[str, Any]) -> list[MetricEvent]:
    """``sim/<metric>/<concept>`` events of one concept at one step (see the module docstring)."""
    name = f"sim/{backend.name}/{concept}"
    base = dict(tags, metric=backend.name, concept=concept, role=role, step=step)
    out = []
    if backend.kind == "accuracy":  # for the others too: how well they are learnt, immunized or not
        out.append(MetricEvent(name, backend.accuracy(x_a, concept), step, dict(base, pair="A")))
        out.append(MetricEvent(name, backend.accuracy(x_t, concept), step, dict(base, pair="T")))
        out.append(MetricEvent(name, backend.agreement(x_t, x_a, concept), step, dict(base, pair="I-A")))
    else:
        if role == "target":
            if reference is None:
                raise EvaluationError(f"no reference images of '{concept}' for metric {backend.name}")
            out.append(MetricEvent(name, backend.mean_similarity(reference, x_a), step, dict(base, pair="r-A")))
            out.append(MetricEvent(name, backend.mean_similarity(reference, x_t), step, dict(base, pair="r-T")))
        out.append(MetricEvent(name, backend.mean_similarity(x_t, x_a), step, dict(base, pair="I-A")))
    for e in out:
        e.value = _clean(e.value)
    return out


def msgr_events(backend: Any, targets: Sequence[str], step: int, attacked: Mapping[str, np.ndarray],
                immunized: Mapping[str, np.ndarray], references: Mapping[str, np.ndarray] | None,
                tags: Mapping[str, Any]) -> list[MetricEvent]:
    """``msgr/<metric>`` (and ``success/<metric>`` for an accuracy metric) over ``targets`` at ``step``."""
    from engine.metrics.gaps import msgr_images

    base = dict(tags, metric=backend.name, step=step)
    m = msgr_images(backend, references, attacked, immunized, list(targets), step=step)
    fields = {"terms": {t.concept: _clean(t.gap) for t in m.terms}}
    if m.note:
        fields["note"] = m.note
    out = [MetricEvent(f"msgr/{backend.name}", _clean(m.value), step, base, fields)]
    if backend.kind == "accuracy":
        success = sum(t.attacked for t in m.terms) / len(m.terms) if m.terms else None
        out.append(MetricEvent(f"success/{backend.name}", _clean(success), step, dict(base)))
    return out


def mrsgr_events(backend: Any, targets: Sequence[str], others: Sequence[str], step: int,
                 attacked: Mapping[str, np.ndarray], immunized: Mapping[str, np.ndarray],
                 tags: Mapping[str, Any]) -> list[MetricEvent]:
    """``mrsgr/<metric>`` of targets vs others at ``step`` (undefined, with a note, without other concepts)."""
    from engine.metrics.gaps import mrsgr_images

    base = dict(tags, metric=backend.name, step=step)
    if not others:
        return [MetricEvent(f"mrsgr/{backend.name}", None, step, base,
                            {"note": "undefined: no other concepts were attacked"})]
    r = mrsgr_images(backend, attacked, immunized, list(targets), list(others), step=step)
    fields = {"target_mean": _clean(r.target_mean), "other_mean": _clean(r.other_mean)}
    if r.note:
        fields["note"] = r.note
    return [MetricEvent(f"mrsgr/{backend.name}", _clean(r.value), step, base, fields)]


ImagesAt = Callable[[str, int], "tuple[np.ndarray, np.ndarray] | None"]
"""``(concept, step) -> (x^A, x^T)`` or None when either is missing."""


class PairEvaluator:
    """Metric events of one attack pair as its evaluation images land.

    ``add(concept, step)`` logs the concept's ``sim/...`` events once both twins have images of that step; when every
    target has them it logs ``msgr/...`` (+ ``success/...``), when every target and other concept has them
    ``mrsgr/...``. Images are read through ``images_at`` (from the run directories), so nothing large stays in
    memory. A metric that fails for a concept (e.g. a judge with no head for it) is dropped with one ``notes`` line.
    """

    def __init__(self, backends: Mapping[str, Any], targets: Sequence[str], others: Sequence[str],
                 references: Mapping[str, np.ndarray] | None, images_at: ImagesAt, log: Callable[[MetricEvent], None],
                 tags: Mapping[str, Any]):
        check_backends(backends)
        self.backends = dict(backends)
        self.targets, self.others = list(targets), list(others)
        self.references = references or {}
        self.images_at = images_at
        self.log = log
        self.tags = dict(tags)
        self.done: dict[int, set[str]] = {}
        self.summarised: set[tuple[str, int]] = set()
        self.broken: dict[str, str] = {}
        self.notes: list[str] = []

    def _drop(self, name: str, error: Exception) -> None:
        if name not in self.broken:
            self.broken[name] = str(error)
            self.notes.append(f"metric {name} left out: {' '.join(str(error).split())}")

    def _backends(self):
        return [(n, b) for n, b in self.backends.items() if n not in self.broken]

    def add(self, concept: str, step: int) -> bool:
        """Evaluate ``concept`` at ``step``; False when the twin has no images of that step (yet)."""
        pair = self.images_at(concept, step)
        if pair is None:
            return False
        x_a, x_t = pair
        role = "target" if concept in self.targets else "other"
        for name, backend in self._backends():
            try:
                events = concept_events(backend, concept, role, step, x_a, x_t, self.references.get(concept), self.tags)
            except (KeyError, ValueError, EvaluationError) as e:
                self._drop(name, e)
                continue
            for e in events:
                self.log(e)
        self.done.setdefault(step, set()).add(concept)
        self._summaries(step)
        return True

    def _sets(self, concepts: Iterable[str], step: int):
        attacked, immunized = {}, {}
        for c in concepts:
            x_a, x_t = self.images_at(c, step)
            attacked[c], immunized[c] = x_a, x_t
        return attacked, immunized

    def _summaries(self, step: int) -> None:
        done = self.done.get(step, set())
        if ("msgr", step) not in self.summarised and set(self.targets) <= done:
            self.summarised.add(("msgr", step))
            attacked, immunized = self._sets(self.targets, step)
            for name, backend in self._backends():
                try:
                    events = msgr_events(backend, self.targets, step, attacked, immunized, self.references, self.tags)
                except (KeyError, ValueError) as e:
                    self._drop(name, e)
                    continue
                for e in events:
                    self.log(e)
        if ("mrsgr", step) not in self.summarised and set(self.targets) | set(self.others) <= done:
            self.summarised.add(("mrsgr", step))
            attacked, immunized = self._sets(self.targets + self.others, step)
            for name, backend in self._backends():
                try:
                    events = mrsgr_events(backend, self.targets, self.others, step, attacked, immunized, self.tags)
                except (KeyError, ValueError) as e:
                    self._drop(name, e)
                    continue
                for e in events:
                    self.log(e)


def log_event(writer: Any, event: MetricEvent) -> None:
    """Log a :class:`MetricEvent` with a :class:`~engine.runs.RunWriter` (extra fields included)."""
    writer.log("metric", event.name, event.value, step=event.step, tags=event.tags, **event.fields)


def pair_images_reader(immunized_dir: str | Path, twin_dir: str | Path) -> ImagesAt:
    """``images_at`` for two run directories: (x^A from the twin, x^T from the immunized run), checking that both
    were generated from the same prompt with the same seeds."""

    def images_at(concept: str, step: int):
        t = load_eval_images(immunized_dir, concept, step)
        a = load_eval_images(twin_dir, concept, step)
        if t is None or a is None:
            return None
        if t.seeds != a.seeds or t.prompt != a.prompt:
            raise EvaluationError(f"'{concept}' step {step}: the twins' evaluation images differ in seeds or prompt "
                                  f"({a.seeds} '{a.prompt}' vs {t.seeds} '{t.prompt}'); they cannot be compared")
        return a.images, t.images

    return images_at


