"""``mima evaluate``: recompute the metric events of attack pairs, or measure a model's utility, into a new run.

    from engine.metrics.evaluate import evaluate, evaluate_utility
    run = evaluate("runs", ["<immunization run>"])         # every pair of its attacks, again, with today's metrics
    run = evaluate_utility("runs", "<erase or immunization run>")

The events are those of :mod:`engine.metrics.pairs` (tagged ``attack_run`` and ``twin_run``) and of
:mod:`engine.metrics.utility` (tagged ``model_run``); the report prefers them to the ones the measured runs logged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.errors import EvaluationError
from engine.runs.images import eval_steps, load_eval_images
from engine.runs.status import EvaluateLinks

from .pairs import PairEvaluator, check_backends, log_event, pair_images_reader

__all__ = ["EvaluationError", "evaluate", "evaluate_utility"]


def evaluate(runs_dir: str | Path, refs: Sequence[str], *, metrics: Sequence[str] | None = None,
             steps: Sequence[int] | None = None, overrides: Sequence[str] = (), device: str | None = None,
             backends: Mapping[str, Any] | None = None, progress=None) -> Path:
    """Recompute the metric events of finished attack pairs into a new ``evaluate`` run; returns its directory.

    ``refs``: run references (see :func:`engine.runs.pairs`). ``metrics``: backends to use (default: each pair's
    ``[eval] metrics``). ``steps``: attack steps (default: every step both twins have images of). ``overrides``:
    ``--set`` style changes of the pairs' saved profiles (e.g. ``eval.judge_weights=...``). ``backends``: already
    built backends (tests). The run: kind ``evaluate``, ``parent`` = the first attack run, ``extra.attack_runs`` /
    ``extra.twin_runs`` = the pairs, ``extra.metrics``.
    """
    from engine.image_sets import load_references
    from engine.metrics import get_backends
    from engine.profile import load_profile
    from engine.runs import RunWriter, pairs as find_pairs

    pairs = find_pairs(runs_dir, refs)
    profiles = {p.id: load_profile(p.run / "profile.toml", overrides) for p in pairs}
    first = profiles[pairs[0].id]
    names = list(metrics) if metrics else list(first.eval.metrics)
    built = dict(backends) if backends is not None else get_backends(first.eval, device or "cpu", metrics=names)
    check_backends(built)
    groups = sorted({str(p.group) for p in pairs})
    method = ",".join(built)
    with RunWriter(runs_dir, "evaluate", method=method, profile=first, profile_name=pairs[0].status.profile,
                   group=groups[0] if len(groups) == 1 else None, parent=pairs[0].id, twin=pairs[0].twin.name,
                   concepts=sorted({c for p in pairs for c in p.targets + p.others}), phase="eval",
                   extra=EvaluateLinks(attack_runs=[p.id for p in pairs], twin_runs=[p.twin.name for p in pairs],
                                       metrics=list(built), groups=groups).to_dict()) as run:
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
                    "immunize_method": p.links.immunize_method}
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
    from engine.runs import RunNotFound, RunWriter, find_run, load_status

    runs_dir = Path(runs_dir)
    run_dir = None
    try:
        run_dir = find_run(runs_dir, ref)
    except RunNotFound:
        pass
    if run_dir is not None:
        st = load_status(run_dir)
        kind = st.kind
        if kind not in ("erase", "immunize"):
            raise EvaluationError(f"{run_dir.name} is a {kind!r} run; utility is measured on an erase or immunization "
                                  f"run, or on a pipeline folder")
        if st.state != "finished":
            raise EvaluationError(f"{run_dir.name} did not finish (state {st.state}); it has no model to measure")
        profile = load_profile(run_dir / "profile.toml", overrides)
        group = st.group
        targets = list(st.concepts)
        if kind == "immunize":
            others = list(st.source.others or [])
            parent_ref = parent or st.source.parent_model or profile.model.base
        else:  # the erased concepts and what the erase kept, as the erase run measured them
            from engine.erase import erase_others

            others = erase_others(profile, group, targets)
            parent_ref = parent or profile.model.base
        model_ref, profile_name, model_run = str(run_dir), st.profile, run_dir.name
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
                   extra=EvaluateLinks(utility_of=str(ref), model_run=model_run,
                                       parent_model=str(parent_ref)).to_dict()) as run:
        measure_run_utility(run, profile, targets, others, model=(model_fn, model_hash(model_fn())),
                            parent=(parent_fn, model_hash(parent_fn())), base=(base_fn, None),
                            cache_dir=runs_dir / ".cache", device=str(dev), backends=backends, progress=progress,
                            model_run=model_run)
    return run.dir
