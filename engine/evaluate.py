"""MSGR and MRSGR of attack pairs: the metric events ``mima attack`` logs live and ``mima evaluate`` recomputes.

An *attack pair* is two attack runs with the same attack, concepts, data, seeds and settings: one on the immunized
model (x^T = x^I) and its twin on the model immunization started from (x^A). Both keep their evaluation images as
arrays, ``<run>/eval/<concept>/step-<k>.npz`` (``images`` uint8 ``[n, H, W, 3]``, ``seeds``, ``prompt``,
``concept``), so every number here can be recomputed from the run directories alone.

Metric events (kind ``metric``, ``step`` = the attack step; tags always hold ``metric``, ``attack``, ``group`` and
``step``; :func:`pair_events` and :class:`PairEvaluator` make them):

``sim/<metric>/<concept>``
    tags ``concept``, ``role`` (``target`` | ``other``) and ``pair``, which sets were compared:
    similarity metrics: ``r-A`` = M(x^r_n, x^A_n) and ``r-T`` = M(x^r_n, x^T_n) (targets), ``I-A`` = M(x^I_n, x^A_n)
    (targets and others); ``judge-acc``: ``A`` = acc(x^A_n), ``T`` = acc(x^T_n) (targets and others: the others'
    are the learnability of the immunized model), ``I-A`` = label agreement.
``msgr/<metric>``
    MSGR over the targets (PAPER.md, Eq. 10-11); ``null`` when undefined, with a ``note`` field saying why.
``mrsgr/<metric>``
    MRSGR, targets vs others; fields ``target_mean``, ``other_mean`` (and ``note``).
``success/<metric>``
    accuracy metrics only: the mean of acc(x^A_n) over the targets, i.e. how well the attack works on the
    unimmunized twin. An MSGR only means something when this is high.

An ``evaluate`` run (``mima evaluate``) logs the same events with two more tags, ``attack_run`` (the attack run on
the immunized model) and ``twin_run``. Randomly initialised backbones are refused (:func:`engine.metrics.require_trained`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

EVAL_DIR = "eval"


class EvaluationError(RuntimeError):
    """An evaluation that cannot be done (one-line message)."""


# ------------------------------------------------------------------------------------------ eval images


def concept_dir(concept: str) -> str:
    """A folder name for a concept name (``Van Gogh`` -> ``Van_Gogh``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", concept).strip("_") or "concept"


def eval_path(run_dir: str | Path, concept: str, step: int) -> Path:
    return Path(run_dir) / EVAL_DIR / concept_dir(concept) / f"step-{int(step):06d}.npz"


def save_eval_images(run_dir: str | Path, concept: str, step: int, images: np.ndarray, seeds: Sequence[int],
                     prompt: str) -> Path:
    """Write one evaluation step's images (atomically: a reader never sees half a file)."""
    import os

    path = eval_path(run_dir, concept, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, images=np.asarray(images, dtype=np.uint8), seeds=np.asarray(list(seeds), dtype=np.int64),
             prompt=np.array(prompt), concept=np.array(concept), step=np.array(int(step)))
    os.replace(tmp, path)
    return path


@dataclass
class EvalImages:
    images: np.ndarray
    seeds: list[int]
    prompt: str


def load_eval_images(run_dir: str | Path, concept: str, step: int) -> EvalImages | None:
    """The evaluation images of ``concept`` at ``step`` in a run, or None when there are none."""
    path = eval_path(run_dir, concept, step)
    if not path.exists():
        return None
    with np.load(path) as d:
        return EvalImages(d["images"], [int(s) for s in d["seeds"]], str(d["prompt"]))


def eval_steps(run_dir: str | Path, concept: str) -> list[int]:
    """Attack steps with evaluation images of ``concept`` in a run, ascending."""
    folder = Path(run_dir) / EVAL_DIR / concept_dir(concept)
    steps = []
    for p in folder.glob("step-*.npz") if folder.is_dir() else ():
        try:
            steps.append(int(p.stem.split("-", 1)[1]))
        except ValueError:
            continue
    return sorted(steps)


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


# ------------------------------------------------------------------------------------------ evaluate runs


@dataclass
class Pair:
    """An attack pair read from the runs directory."""

    run: Path
    """The attack run on the immunized model (or the control re-run)."""
    twin: Path
    status: dict[str, Any]
    targets: list[str]
    others: list[str]

    @property
    def id(self) -> str:
        return self.run.name

    @property
    def attack(self) -> str:
        return str(self.status.get("method"))

    @property
    def group(self) -> str | None:
        return self.status.get("group")


def is_compared_run(status: Mapping[str, Any]) -> bool:
    """An attack run that is the x^T side of a pair (on an immunized model, or a control re-run)."""
    extra = status.get("extra") or {}
    return status.get("kind") == "attack" and bool(extra.get("immunized") or extra.get("control"))


def pair_of(runs_dir: str | Path, run_dir: str | Path) -> Pair:
    """The :class:`Pair` whose x^T side is ``run_dir``."""
    from engine.runs import RunNotFound, find_run, read_status

    run_dir = Path(run_dir)
    st = read_status(run_dir)
    if not is_compared_run(st):
        raise EvaluationError(f"{run_dir.name} is not an attack run on an immunized model (kind {st.get('kind')!r})")
    if not st.get("twin"):
        raise EvaluationError(f"{run_dir.name} has no twin (the attack on the unimmunized model)")
    try:
        twin = find_run(runs_dir, st["twin"])
    except RunNotFound as e:
        raise EvaluationError(f"{run_dir.name}: its twin is missing: {e}") from None
    extra = st.get("extra") or {}
    return Pair(run_dir, twin, st, list(extra.get("targets") or []), list(extra.get("others") or []))


def resolve_pairs(runs_dir: str | Path, refs: Sequence[str]) -> list[Pair]:
    """The pairs that run references name: an attack run (either side), an immunization run (its attacks), an
    evaluate run (the pairs it evaluated). Raises :class:`EvaluationError` for anything else."""
    from engine.runs import RunNotFound, find_run, list_runs, read_status

    runs = list_runs(runs_dir)
    out: dict[str, Pair] = {}
    for ref in refs:
        try:
            run_dir = find_run(runs_dir, ref)
        except RunNotFound as e:
            raise EvaluationError(str(e)) from None
        st = read_status(run_dir)
        kind, extra = st.get("kind"), st.get("extra") or {}
        if is_compared_run(st):
            ids = [run_dir.name]
        elif kind == "attack":  # the unimmunized side: every run compared with it
            ids = [r["id"] for r in runs if is_compared_run(r) and r.get("twin") == run_dir.name]
        elif kind == "immunize":
            ids = [r["id"] for r in runs if is_compared_run(r) and (r.get("extra") or {}).get("immunize_run") == run_dir.name]
        elif kind == "evaluate":
            ids = list(extra.get("attack_runs") or [])
        else:
            raise EvaluationError(f"{run_dir.name} is a {kind!r} run; expected an attack, immunization or evaluate run")
        if not ids:
            raise EvaluationError(f"{run_dir.name}: no attack pairs found (run `mima attack` first)")
        for i in ids:
            if i not in out:
                try:
                    out[i] = pair_of(runs_dir, find_run(runs_dir, i))
                except RunNotFound as e:
                    raise EvaluationError(f"{run_dir.name}: {e}") from None
    return list(out.values())


def load_references(profile: Any, concepts: Sequence[str], size: int, runs_dir: str | Path,
                    device: str | None = None) -> dict[str, np.ndarray]:
    """``images.reference`` of each concept at ``size`` px (generated sets are made by ``[model] base``, cached)."""
    from engine.data import load_image_set

    cache: dict[str, Any] = {}

    def base_pipe():
        if "p" not in cache:
            from engine.models import load_pipeline, pick_device, pick_dtype

            cache["p"] = load_pipeline(profile.model.base, pick_device(device or profile.model.device),
                                       pick_dtype(profile.model.dtype))
        return cache["p"]

    out = {}
    for name in concepts:
        c = profile.concept(name)
        out[name] = load_image_set(c.images.reference, prompt=c.prompt, size=size, concept=c.name, pipe_fn=base_pipe,
                                   model_key=profile.model.base, steps=profile.model.sample_steps,
                                   guidance=profile.model.guidance, cache_dir=Path(runs_dir) / ".cache")
    return out


def evaluate(runs_dir: str | Path, refs: Sequence[str], *, metrics: Sequence[str] | None = None,
             steps: Sequence[int] | None = None, overrides: Sequence[str] = (), device: str | None = None,
             backends: Mapping[str, Any] | None = None, progress=None) -> Path:
    """Recompute the metric events of finished attack pairs into a new ``evaluate`` run; returns its directory.

    ``refs``: run references (see :func:`resolve_pairs`). ``metrics``: backends to use (default: each pair's
    ``[eval] metrics``). ``steps``: attack steps (default: every step both twins have images of). ``overrides``:
    ``--set`` style changes of the pairs' saved profiles (e.g. ``eval.judge_weights=...``). ``backends``: already
    built backends (tests). The run: kind ``evaluate``, ``parent`` = the first attack run, ``extra.attack_runs`` /
    ``extra.twin_runs`` = the pairs, ``extra.metrics``.
    """
    from engine.metrics import get_backends
    from engine.profile import load_profile
    from engine.runs import RunWriter

    pairs = resolve_pairs(runs_dir, refs)
    profiles = {p.id: load_profile(p.run / "profile.toml", overrides) for p in pairs}
    first = profiles[pairs[0].id]
    names = list(metrics) if metrics else list(first.eval.metrics)
    built = dict(backends) if backends is not None else get_backends(first.eval, device or "cpu", metrics=names)
    check_backends(built)
    groups = sorted({str(p.group) for p in pairs})
    method = ",".join(built)
    with RunWriter(runs_dir, "evaluate", method=method, profile=first, profile_name=pairs[0].status.get("profile"),
                   group=groups[0] if len(groups) == 1 else None, parent=pairs[0].id, twin=pairs[0].twin.name,
                   concepts=sorted({c for p in pairs for c in p.targets + p.others}), phase="eval",
                   extra={"attack_runs": [p.id for p in pairs], "twin_runs": [p.twin.name for p in pairs],
                          "metrics": list(built), "groups": groups}) as run:
        todo = []
        for p in pairs:
            concepts = p.targets + p.others
            common = set.intersection(*[set(eval_steps(p.run, c)) & set(eval_steps(p.twin, c)) for c in concepts])
            chosen = sorted(common if steps is None else common & set(steps))
            if not chosen:
                run.log_status(f"{p.id}: no evaluation step that both twins have"
                               + (f" among {list(steps)}" if steps else ""))
            todo.append((p, chosen))
        total = sum(len(s) * len(p.targets + p.others) for p, s in todo) or 1
        done = 0
        for p, chosen in todo:
            profile = profiles[p.id]
            need_refs = any(b.kind == "similarity" for b in built.values())
            refs_images = None
            if need_refs and chosen:
                sample = load_eval_images(p.run, p.targets[0], chosen[0])
                refs_images = load_references(profile, p.targets, sample.images.shape[1], runs_dir, device)
            tags = {"attack": p.attack, "group": p.group, "attack_run": p.id, "twin_run": p.twin.name,
                    "immunize_method": (p.status.get("extra") or {}).get("immunize_method")}
            ev = PairEvaluator(built, p.targets, p.others, refs_images, pair_images_reader(p.run, p.twin),
                               lambda e: log_event(run, e), tags)
            for step in chosen:
                for c in p.targets + p.others:
                    ev.add(c, step)
                    done += 1
                    run.progress(done, total)
                    if progress:
                        progress("evaluate", done, total, {"run": p.id[-12:], "step": step})
            for note in ev.notes:
                run.log_status(f"{p.id}: {note}")
        run.progress(total, total)
    return run.dir


# ------------------------------------------------------------------------------------------ utility


def evaluate_utility(runs_dir: str | Path, ref: str, *, profile: Any = None, group: str | None = None,
                     parent: str | None = None, overrides: Sequence[str] = (), device: str | None = None,
                     backends: Mapping[str, Any] | None = None, progress=None) -> Path:
    """Measure the utility of a model without attack (:mod:`engine.metrics.utility`) into a new ``evaluate`` run;
    returns its directory.

    ``ref``: an erase or immunization run (its saved profile, targets, others and parent are used; ``overrides``
    change the saved profile, e.g. ``utility.images=16``), or a pipeline folder / hub id / ``testbed`` measured with
    ``profile`` (targets: ``group``'s, none without; parent: ``parent`` or the profile's base). The run: kind
    ``evaluate``, method ``utility``, ``extra.utility_of`` = ``ref``, ``extra.model_run`` = the run measured (None
    for a folder); its utility events are tagged ``model_run`` too, and the report prefers them to the run's own.
    """
    from engine.metrics.utility import measure_run_utility
    from engine.models import ModelNotAvailable, load_pipeline, model_hash, pick_device, pick_dtype, resolve_model
    from engine.profile import load_profile
    from engine.runs import RunNotFound, RunWriter, find_run, read_status

    runs_dir = Path(runs_dir)
    run_dir = None
    try:
        run_dir = find_run(runs_dir, ref)
    except RunNotFound:
        pass
    if run_dir is not None:
        st = read_status(run_dir)
        kind, extra = st.get("kind"), st.get("extra") or {}
        if kind not in ("erase", "immunize"):
            raise EvaluationError(f"{run_dir.name} is a {kind!r} run; utility is measured on an erase or immunization "
                                  f"run, or on a pipeline folder")
        if st.get("state") != "finished":
            raise EvaluationError(f"{run_dir.name} did not finish (state {st.get('state')}); it has no model to measure")
        profile = load_profile(run_dir / "profile.toml", overrides)
        group = st.get("group")
        targets = list(st.get("concepts") or [])
        if kind == "immunize":
            others = list(extra.get("others") or [])
            parent_ref = parent or extra.get("parent_model") or profile.model.base
        else:  # the erased concepts and what the erase kept, as the erase run measured them
            from engine.erase import erase_others

            others = erase_others(profile, group, targets)
            parent_ref = parent or profile.model.base
        model_ref, profile_name, model_run = str(run_dir), st.get("profile"), run_dir.name
    else:
        if profile is None:
            raise EvaluationError(f"{ref}: not a run of {runs_dir}; measuring a pipeline folder needs a profile")
        try:
            resolve_model(ref)
        except (ModelNotAvailable, FileNotFoundError) as e:
            raise EvaluationError(str(e)) from None
        grp = profile.group(group) if group else None
        targets = grp.target_names if grp else []
        others = grp.other_names if grp else profile.concept_names
        parent_ref, model_ref, profile_name, model_run = parent or profile.model.base, ref, None, None
    dev = pick_device(device or profile.model.device)
    dtype = pick_dtype(profile.model.dtype)
    cache: dict[str, Any] = {}

    def pipe(which: str, where: str):
        def fn():
            if which not in cache:
                cache[which] = load_pipeline(where, dev, dtype)
            return cache[which]
        return fn

    model_fn, parent_fn = pipe("model", model_ref), pipe("parent", parent_ref)
    base_fn = pipe("base", profile.model.base)
    with RunWriter(runs_dir, "evaluate", method="utility", profile=profile, profile_name=profile_name, group=group,
                   parent=model_run, concepts=targets + others, phase="utility",
                   extra={"utility_of": str(ref), "model_run": model_run, "parent_model": str(parent_ref)}) as run:
        measure_run_utility(run, profile, targets, others, model=(model_fn, model_hash(model_fn())),
                            parent=(parent_fn, model_hash(parent_fn())), base=(base_fn, None),
                            cache_dir=runs_dir / ".cache", device=str(dev), backends=backends, progress=progress,
                            model_run=model_run)
    return run.dir
