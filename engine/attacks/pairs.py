"""Attack an immunization run *and its twin* — the model that immunization started from — as MSGR needs them.

    from engine.attacks.pairs import attack
    pairs = attack("runs", methods=["lora"])            # the newest finished immunization run
    pairs[0].run, pairs[0].twin, pairs[0].msgr          # the two attack runs and MSGR per step and metric

For every attack method, two attack runs with the same data (``images.attack``, never ``images.immunize``),
prompts (the attacker's token), seeds and settings:

* the **unimmunized** run attacks the model the immunization started from (``status.extra.parent_model``: the
  UCE-erased model or ``[model] base``): ``parent`` = that model's run id (the erase run, or None for a base model);
* the **immunized** run attacks ``<immunize run>/model``: ``parent`` = the immunization run id, ``twin`` = the
  unimmunized run id.

Both are ``kind = "attack"``, ``method`` = the attack, ``concepts`` = the concepts attacked: every target of the
immunization run, then up to two of the group's other concepts (MRSGR needs them). ``extra`` is an
:class:`~engine.runs.AttackLinks`: ``attack``, ``concepts``, ``targets``, ``others``, ``immunized`` (bool),
``immunize_run``, ``immunize_method``, ``model`` (the model reference), ``settings``, ``seed``, ``eval_seeds``,
``cache_keys``, ``done`` (concepts whose attack finished) and ``group_size``.

**The unimmunized attack is cached** (:mod:`engine.attacks.cache`). A finished unimmunized attack run that holds
every concept with the same keys is *reused* — e.g. mima, jt and cp immunizations of one group from the same erased
model share one unimmunized attack run. Its ``twin`` then points at the newest run compared with it and
``extra.twins`` lists them all. Concepts found in other runs are copied into a new run (``extra.reused``: concept ->
source run); the rest are attacked.

**Control (the ``none`` row).** There is no "immunization with method none". ``control=True`` attacks the
unimmunized model a second time, never from the cache, with the same data and seeds, and compares that re-run
(x^T, ``extra.control = true``, ``extra.immunize_method = "none"``) with the unimmunized attack (x^A). MSGR is then 0
exactly when the attack is deterministic; anything else is the noise floor of the pipeline (e.g. non-deterministic
GPU kernels) against which the other rows should be read.

Every evaluation step's images are kept as arrays (:mod:`engine.runs.images`) and as PNG image events
``eval/<concept>`` (one per seed). While the immunized model is attacked, the metrics of ``[eval] metrics`` are
computed as soon as both twins have images of a step, and logged into the immunized run: ``sim/<metric>/<concept>``,
``msgr/<metric>``, ``success/<metric>``, ``mrsgr/<metric>`` (see :mod:`engine.metrics.pairs`). Missing metric weights
turn live evaluation off with a note; ``mima evaluate`` can add the numbers later.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.metrics.pairs import PairEvaluator, log_event, pair_images_reader
from engine.profile import AttackSettings, Profile
from engine.runs import AttackLinks, RunStatus, copy_eval_images, eval_steps, save_eval_images, weights_dir

from .cache import find_cached
from .jobs import Jobs, Models
from .plan import AttackFailure, AttackPlan, AttackUsageError, plan_attack

__all__ = ["PairResult", "run_attacks", "attack"]


@dataclass
class PairResult:
    """One attack method's pair of runs."""

    attack: str
    run: Path | None
    """The attack run on the immunized model (or the control re-run); None with ``twin_only``."""
    twin: Path
    """The attack run on the unimmunized model."""
    twin_reused: bool
    reused: dict[str, str] = field(default_factory=dict)
    """Concepts copied from cached runs: concept -> source run id."""
    msgr: dict[int, dict[str, float | None]] = field(default_factory=dict)
    """Attack step -> metric -> MSGR, as logged live."""
    notes: list[str] = field(default_factory=list)


class _Tracker:
    """The logger handed to one concept's attack: forwards to the run, turns per-concept progress into run progress
    and calls the CLI's ``progress(stage, step, total, info)``."""

    def __init__(self, writer, stage: str, concept: str, offset: int, total: int, progress) -> None:
        self.writer, self.stage, self.concept = writer, stage, concept
        self.offset, self.total, self.callback = offset, total, progress
        self.loss: float | None = None

    def log_scalar(self, name: str, value: float, step: int | None = None, **tags: Any) -> None:
        self.writer.log_scalar(name, value, step, **tags)
        if name.startswith("loss/"):
            self.loss = float(value)

    def log_metric(self, name: str, value: Any, step: int | None = None, **tags: Any) -> None:
        self.writer.log_metric(name, value, step, **tags)

    def log_image(self, name: str, step: int | None, image: Any, **tags: Any):
        return self.writer.log_image(name, step, image, **tags)

    def log_status(self, message: str) -> None:
        self.writer.log_status(message)

    def progress(self, step: int, total: int) -> None:
        done = self.offset + step
        self.writer.progress(done, self.total)
        if self.callback:
            info = {"concept": self.concept}
            if self.loss is not None:
                info["loss"] = self.loss
            self.callback(self.stage, done, self.total, info)


# ------------------------------------------------------------------------------------------ attacking


class _ConceptAttacks:
    """Attack the concepts of one model into one run, copying those a cached run already holds."""

    def __init__(self, jobs: Jobs, models: Models, save_weights: bool, progress) -> None:
        self.jobs, self.models, self.save_weights, self.progress = jobs, models, save_weights, progress

    def run(self, writer, method: str, settings: AttackSettings, model_ref: str, stage: str, concepts: Sequence[str],
            on_step: Callable[[str, int], None] | None = None, skip: Mapping[str, Path] | None = None) -> str | None:
        """Attack ``concepts`` of ``model_ref`` into ``writer``'s run (copying those in ``skip`` from cached runs);
        returns the hash of the model (None when every concept was copied)."""
        from engine.models import model_hash

        from . import run_attack

        skip = skip or {}
        total = settings.steps * len(concepts)
        done: list[str] = []
        reused: dict[str, str] = {}
        mhash = None
        for i, name in enumerate(concepts):
            if name in skip:
                self.copy(writer, skip[name], name)
                reused[name] = skip[name].name
                done.append(name)
                writer.set_status(extra=AttackLinks(done=list(done), reused=dict(reused)).to_dict())
                writer.progress(settings.steps * (i + 1), total)
                if on_step:
                    for step in eval_steps(writer.dir, name):
                        on_step(name, step)
                continue
            pipe = self.models.load(model_ref)  # attacks change the pipeline in place: a fresh one per attack
            if mhash is None:
                mhash = model_hash(pipe)
            job = self.jobs.job(pipe, settings, self.jobs.data[name], model_ref)
            tracker = _Tracker(writer, stage, name, settings.steps * i, total, self.progress)

            def on_eval(step: int, images: np.ndarray, _job=job, _name=name) -> None:
                save_eval_images(writer.dir, _name, step, images, _job.eval_seeds, _job.eval_text)
                if on_step:
                    on_step(_name, step)

            out = weights_dir(writer.dir, name) if self.save_weights else None
            try:
                run_attack(job, tracker, on_eval=on_eval, out=out)
            except (KeyboardInterrupt, AttackUsageError):
                raise
            except Exception as e:
                raise AttackFailure(f"{method} on '{name}' ({Path(model_ref).name}): {type(e).__name__}: {e}") from e
            done.append(name)
            writer.set_status(extra=AttackLinks(done=list(done)).to_dict())
            del pipe
        return mhash

    def copy(self, writer, source: Path, concept: str) -> None:
        """Copy a concept's evaluation images from a cached run (arrays + PNG events), and its weights when saved."""
        from PIL import Image

        if self.save_weights and weights_dir(source, concept).is_dir():
            shutil.copytree(weights_dir(source, concept), weights_dir(writer.dir, concept), dirs_exist_ok=True)
        for step in eval_steps(source, concept):
            ev = copy_eval_images(source, writer.dir, concept, step)
            for seed, im in zip(ev.seeds, ev.images):
                writer.log_image(f"eval/{concept}", step, Image.fromarray(im), concept=concept,
                                 attack=writer.status.get("method"), seed=seed, reused_from=source.name)
        writer.log_status(f"{concept}: reused the attack of run {source.name} (same cache key)")


class _PairRunner:
    """One attack method's pair: the unimmunized run (found in the cache when it can be), then the compared run
    (the immunized model, or the control re-run) with live evaluation."""

    def __init__(self, plan: AttackPlan, runs_dir: Path, jobs: Jobs, attacks: _ConceptAttacks, twin_hash: str,
                 backends: Mapping[str, Any] | None, references: Mapping[str, np.ndarray] | None,
                 save_weights: bool) -> None:
        self.plan, self.runs_dir, self.jobs, self.attacks = plan, runs_dir, jobs, attacks
        self.twin_hash, self.backends, self.references = twin_hash, backends, references
        self.save_weights = save_weights

    def _common(self, method: str) -> dict[str, Any]:
        plan = self.plan
        return dict(method=method, profile=plan.profile, profile_name=plan.profile_name, group=plan.group,
                    concepts=plan.concepts, phase=f"attack/{method}")

    def run(self, method: str) -> PairResult:
        plan = self.plan
        settings = plan.settings[method]
        keys = self.jobs.keys(self.twin_hash, settings)
        twin_dir, twin_reused, reused, notes = self._twin(method, settings, keys)
        if plan.twin_only:
            return PairResult(method, None, twin_dir, twin_reused, reused, notes=notes)
        result = PairResult(method, Path(), twin_dir, twin_reused, reused, notes=notes)
        self._compared(method, settings, keys, result)
        return result

    def _twin(self, method: str, settings: AttackSettings, keys: dict[str, str]):
        """The unimmunized run: ``(its directory, reused whole from the cache, concepts copied, notes)``."""
        from engine.runs import RunWriter

        plan = self.plan
        whole, parts = find_cached(self.runs_dir, keys, need_weights=self.save_weights)
        notes = []
        if self.save_weights and whole is None:
            unweighted, _ = find_cached(self.runs_dir, keys)
            if unweighted is not None:
                notes.append(f"{method}: the cached unimmunized attack {unweighted.name} kept no weights, so the "
                             "unimmunized model was attacked again to save them (--save-weights)")
        if whole is not None:
            return whole, True, {}, notes
        links = self.jobs.links(method, settings, immunized=False, control=False, model=plan.twin_model, keys=keys)
        with RunWriter(self.runs_dir, "attack", parent=plan.twin_parent, base_model_hash=self.twin_hash,
                       extra=links.to_dict(), **self._common(method)) as tw:
            tw.log_status(f"{method} on the unimmunized model {Path(plan.twin_model).name} "
                          f"({', '.join(plan.concepts)}), shared by every immunization that started from it")
            self.attacks.run(tw, method, settings, plan.twin_model, f"{method} x^A", plan.concepts, skip=parts)
            reused = dict(RunStatus.of(tw.status).attack.reused)
        return tw.dir, False, reused, notes

    def _compared(self, method: str, settings: AttackSettings, keys: dict[str, str], result: PairResult) -> None:
        """The run compared with the twin, evaluated live against it; fills ``result``."""
        from engine.runs import RunWriter

        plan, twin_dir = self.plan, result.twin
        if plan.control:
            run_parent, model_ref, model_hash_ = plan.twin_parent, plan.twin_model, self.twin_hash
        else:
            run_parent, model_ref, model_hash_ = plan.immunize_run.name, plan.model, None
        links = self.jobs.links(method, settings, immunized=not plan.control, control=plan.control, model=model_ref,
                                keys=keys if plan.control else None)
        with RunWriter(self.runs_dir, "attack", parent=run_parent, twin=twin_dir.name, base_model_hash=model_hash_,
                       extra=links.to_dict(), **self._common(method)) as run:
            result.run = run.dir
            self._link(twin_dir, run.id)
            run.log_status(f"{method} on the {'unimmunized model again (control)' if plan.control else 'immunized model'} "
                           f"{Path(model_ref).name}; twin {twin_dir.name}"
                           + (" (reused from the cache)" if result.twin_reused else ""))
            evaluator = None
            if self.backends:
                tags = {"attack": method, "group": plan.group}

                def log(e, _run=run):
                    log_event(_run, e)
                    if e.name.startswith("msgr/"):
                        result.msgr.setdefault(e.step, {})[e.name.split("/", 1)[1]] = e.value

                evaluator = PairEvaluator(self.backends, plan.targets, plan.others, self.references,
                                          pair_images_reader(run.dir, twin_dir), log, tags)
            stage = f"{method} {'control' if plan.control else 'x^T'}"
            mhash = self.attacks.run(run, method, settings, model_ref, stage, plan.concepts,
                                     on_step=evaluator.add if evaluator else None)
            if mhash and not plan.control:
                run.set_status(base_model_hash=mhash)
            if evaluator:
                for note in evaluator.notes:
                    run.log_status(note)
                    result.notes.append(note)
            missing = [c for c in plan.concepts if set(eval_steps(run.dir, c)) - set(eval_steps(twin_dir, c))]
            if missing:
                note = f"twin {twin_dir.name} lacks evaluation steps of {', '.join(missing)}"
                run.log_status(note)
                result.notes.append(note)

    def _link(self, twin_dir: Path, run_id: str) -> None:
        """Point the unimmunized run's ``twin`` at ``run_id`` (the newest run compared with it; ``extra.twins`` keeps
        them all)."""
        from engine.runs import load_status, update_status

        links = load_status(twin_dir).attack or AttackLinks()
        twins = [t for t in links.twins if t != run_id] + [run_id]
        imm = [r for r in links.immunize_runs if r != self.plan.immunize_run.name]
        imm.append(self.plan.immunize_run.name)
        update_status(twin_dir, twin=run_id, extra=AttackLinks(twins=twins, immunize_runs=imm).to_dict())


# ---------------------------------------------------------------------------------------------- entry


def _live_backends(plan: AttackPlan, models: Models, runs_dir: Path, backends: Mapping[str, Any] | None, size: int):
    """``(backends, references, notes)`` for live evaluation: ``[eval] metrics`` unless ``backends`` are given, the
    targets' reference images; no backends and a note when the metric weights are missing."""
    from engine.image_sets import ImageSetError, load_references
    from engine.metrics import MetricWeightsMissing, get_backends, require_trained

    p = plan.profile
    if backends is None:
        try:
            backends = get_backends(p.eval, models.device)
        except MetricWeightsMissing as e:
            return None, None, [f"live evaluation off: {e} (run `mima evaluate` once the weights exist)"]
    for b in backends.values():
        try:
            require_trained(b)
        except ValueError as e:
            raise AttackUsageError(str(e)) from None
    references = None
    if any(b.kind == "similarity" for b in backends.values()):
        try:
            references = load_references(p, plan.targets, size, runs_dir, str(models.device))
        except (ImageSetError, OSError) as e:
            raise AttackUsageError(f"images.reference: {e}") from None
    return backends, references, []


def run_attacks(plan: AttackPlan, *, runs_dir: str | Path, device: str | None = None, progress=None,
                backends: Mapping[str, Any] | None = None, live_eval: bool = True,
                save_weights: bool = False) -> list[PairResult]:
    """Run :func:`~engine.attacks.plan.plan_attack`'s plan: per method, the unimmunized attack (or its cached run)
    then the immunized one, with live evaluation. ``backends``: metric backends to use instead of ``[eval] metrics``
    (tests). ``save_weights``: keep each attack's output (LoRA, embeddings, UNet) under
    ``<run>/checkpoints/<concept>/``, the unimmunized attack's too: the cache then serves only attacks that kept their
    weights (a note says when a cached one without them was attacked again).
    ``progress(stage, step, total, info)`` is called as steps finish. Ctrl-C keeps every finished concept (the run
    is marked interrupted; ``extra.done`` lists what finished; a later call reuses it from the cache)."""
    from engine.image_sets import check_image_sets, profile_image_sets
    from engine.models import model_hash

    from .common import resolution

    runs_dir = Path(runs_dir)
    models = Models(plan.profile, device)
    if not plan.concepts:  # an empty slice (``part``): nothing to attack
        return []
    prior = any(s.prior_preservation for s in plan.settings.values())
    sets = profile_image_sets(plan.profile, plan.concepts, ("attack",), regularization=prior)
    if live_eval:
        sets += profile_image_sets(plan.profile, plan.targets, ("reference",), regularization=False)
    check_image_sets(sets, path=plan.profile_name)  # before any model loads or run is written
    probe = models.load(plan.twin_model)
    size = resolution(probe)
    twin_hash = plan.twin_hash or model_hash(probe)
    del probe
    jobs = Jobs(plan, models, runs_dir, size)
    notes: list[str] = []
    references = None
    if live_eval:
        backends, references, notes = _live_backends(plan, models, runs_dir, backends, size)
    runner = _PairRunner(plan, runs_dir, jobs, _ConceptAttacks(jobs, models, save_weights, progress), twin_hash,
                         backends, references, save_weights)
    results = []
    for m in plan.methods:
        r = runner.run(m)
        r.notes = notes + r.notes
        results.append(r)
    return results


def attack(runs_dir: str | Path, *, run: str | None = None, methods: Sequence[str] | None = None,
           group: str | None = None, steps: int | None = None, profile: Profile | None = None,
           profile_name: str | None = None, overrides: Sequence[str] = (), control: bool = False,
           twin_only: bool = False, part: tuple[int, int] | None = None, device: str | None = None,
           progress=None,
           backends: Mapping[str, Any] | None = None, live_eval: bool = True,
           save_weights: bool = False) -> list[PairResult]:
    """:func:`~engine.attacks.plan.plan_attack` then :func:`run_attacks`."""
    plan = plan_attack(runs_dir, run=run, profile=profile, profile_name=profile_name, overrides=overrides,
                       group=group, methods=methods, steps=steps, control=control, twin_only=twin_only, part=part)
    return run_attacks(plan, runs_dir=runs_dir, device=device, progress=progress, backends=backends,
                       live_eval=live_eval, save_weights=save_weights)
