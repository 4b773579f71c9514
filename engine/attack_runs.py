"""Attack an immunization run *and its twin* — the model that immunization started from — as MSGR needs them.

    from engine.attack_runs import attack
    pairs = attack("runs", methods=["lora"])            # the newest finished immunization run
    pairs[0].run, pairs[0].twin, pairs[0].msgr          # the two attack runs and MSGR per step and metric

For every attack method, two attack runs with the same data (``images.attack``, never ``images.immunize``),
prompts (the attacker's token), seeds and settings:

* the **unimmunized** run attacks the model the immunization started from (``status.extra.parent_model``: the
  UCE-erased model or ``[model] base``): ``parent`` = that model's run id (the erase run, or None for a base model);
* the **immunized** run attacks ``<immunize run>/model``: ``parent`` = the immunization run id, ``twin`` = the
  unimmunized run id.

Both are ``kind = "attack"``, ``method`` = the attack, ``concepts`` = the concepts attacked: every target of the
immunization run, then up to two of the group's other concepts (MRSGR needs them). ``extra`` holds ``attack``,
``concepts``, ``targets``, ``others``, ``immunized`` (bool), ``immunize_run``, ``immunize_method``, ``model`` (the
model reference), ``settings``, ``seed``, ``eval_seeds``, ``cache_keys``, ``done`` (concepts whose attack
finished) and ``group_size``.

**The unimmunized attack is cached.** Its key per concept is a hash of (model hash, attack, concept, settings, seed,
evaluation seeds and prompt, the training images' pixels, sampler, dtype and device type). A finished unimmunized
attack run that holds every concept with the same keys is *reused* — e.g. mima, jt and cp immunizations of one
group from the same erased model share one unimmunized attack run. Its ``twin`` then points at the newest run
compared with it and ``extra.twins`` lists them all. Concepts found in other runs are copied into a new run
(``extra.reused``: concept -> source run); the rest are attacked.

**Control (the ``none`` row).** There is no "immunization with method none". ``control=True`` attacks the
unimmunized model a second time, never from the cache, with the same data and seeds, and compares that re-run
(x^T, ``extra.control = true``, ``extra.immunize_method = "none"``) with the unimmunized attack (x^A). MSGR is then 0
exactly when the attack is deterministic; anything else is the noise floor of the pipeline (e.g. non-deterministic
GPU kernels) against which the other rows should be read.

Every evaluation step's images are kept as arrays (``<run>/eval/<concept>/step-<k>.npz``, see
:mod:`engine.evaluate`) and as PNG image events ``eval/<concept>`` (one per seed). While the immunized model is
attacked, the metrics of ``[eval] metrics`` are computed as soon as both twins have images of a step, and logged into
the immunized run: ``sim/<metric>/<concept>``, ``msgr/<metric>``, ``success/<metric>``, ``mrsgr/<metric>`` (see
:mod:`engine.evaluate`). Missing metric weights turn live evaluation off with a note; ``mima evaluate`` can add
the numbers later.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError
from .evaluate import (
    PairEvaluator,
    concept_dir,
    eval_path,
    eval_steps,
    load_eval_images,
    load_references,
    log_event,
    pair_images_reader,
    save_eval_images,
)
from .profile import AttackSettings, Concept, Profile, ProfileError

PERSONALIZATION = ("dreambooth", "dreambooth-lora", "textual-inversion", "custom-diffusion")
"""The personalization attacks (the paper's Table 3 averages over them); ``lora`` is the re-learning attack."""
MAX_OTHERS = 2
"""Other (non-target) concepts attacked beside the targets, for MRSGR."""

__all__ = [
    "AttackUsageError", "AttackFailure", "AttackPlan", "PairResult", "PERSONALIZATION", "MAX_OTHERS",
    "find_immunize_run", "plan_attack", "run_attacks", "attack", "cache_key", "find_cached",
]


class AttackUsageError(ValueError, UsageError):
    """Bad input: an unknown attack, a run that is not a finished immunization run, missing images, a profile
    that cannot drive the attack (the CLI exits 2)."""


class AttackFailure(RuntimeError):
    """An attack that failed while running (the CLI exits 1)."""


# ---------------------------------------------------------------------------------------------- plan


@dataclass
class AttackPlan:
    """What :func:`run_attacks` does: resolved by :func:`plan_attack` before anything trains."""

    profile: Profile
    profile_name: str | None
    immunize_run: Path
    immunize_status: dict[str, Any]
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
        return "none" if self.control else str(self.immunize_status.get("method"))

    @property
    def group_size(self) -> int:
        if self.group and self.group in self.profile.groups:
            return len(self.profile.groups[self.group])
        return len(self.targets)


def _attack_names() -> list[str]:
    from .attacks import ATTACKS

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
    from .runs import RunNotFound, find_run, list_runs, read_status

    if run is not None:
        try:
            path = find_run(runs_dir, run)
        except RunNotFound as e:
            raise AttackUsageError(str(e)) from None
        st = read_status(path)
        if st.get("kind") != "immunize":
            raise AttackUsageError(f"{path.name} is not an immunization run (kind {st.get('kind')!r}); "
                                   "attack an immunization run (see `mima runs list`)")
        if st.get("state") != "finished":
            raise AttackUsageError(f"immunization run {path.name} is {st.get('state')}, not finished; "
                                   "resume it with `mima immunize --resume`")
        if group is not None and st.get("group") != group:
            raise AttackUsageError(f"immunization run {path.name} is of group {st.get('group')!r}, not {group!r}")
        return path
    for st in reversed(list_runs(runs_dir)):
        if st.get("kind") != "immunize" or st.get("state") != "finished":
            continue
        if group is not None and st.get("group") != group:
            continue
        if profile_name is not None and st.get("profile") != profile_name:
            continue
        return Path(st["dir"])
    which = " ".join(p for p in (f"of profile {profile_name}" if profile_name else "",
                                 f"of group {group}" if group else "") if p)
    raise AttackUsageError(f"no finished immunization run {which + ' ' if which else ''}in {runs_dir}; "
                           "run `mima immunize` first or pass --run".replace("  ", " "))


def plan_attack(runs_dir: str | Path, *, run: str | None = None, profile: Profile | None = None,
                profile_name: str | None = None, overrides: Sequence[str] = (), group: str | None = None,
                methods: Sequence[str] | None = None, steps: int | None = None, control: bool = False,
                twin_only: bool = False, part: tuple[int, int] | None = None) -> AttackPlan:
    """Resolve what to attack (see the module docstring).

    ``profile``: the profile whose ``[attack]``, ``[eval]`` and concepts apply (default: the immunization run's saved
    ``profile.toml`` with ``overrides``). ``profile_name`` / ``group`` also select the newest immunization run when
    ``run`` is None. ``steps`` overrides the attack steps of every method. ``part = (i, n)`` (with ``twin_only``)
    attacks the i-th of n interleaved slices of the concepts (1-based; it may be empty): parts of the unimmunized
    attack that parallel workers run at once and a later attack assembles from the cache.
    """
    from .profile import load_profile
    from .runs import find_run, read_status

    runs_dir = Path(runs_dir)
    imm = find_immunize_run(runs_dir, run, profile_name=profile_name if profile is not None else None, group=group)
    st = read_status(imm)
    if profile is None:
        profile = load_profile(imm / "profile.toml", overrides)
        profile_name = st.get("profile")
    extra = st.get("extra") or {}
    try:
        targets = [profile.concept(n).name for n in st.get("concepts") or []]
        names = extra.get("others")
        if names is None and st.get("group") in profile.groups:
            names = profile.group(st["group"]).other_names
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
    twin_parent = st.get("parent")
    if twin_parent:
        try:
            twin_model = str(find_run(runs_dir, twin_parent))
        except Exception:
            raise AttackUsageError(f"immunization run {imm.name} started from run {twin_parent}, which is missing "
                                   f"from {runs_dir}; its twin cannot be attacked") from None
    else:
        twin_model = str(extra.get("parent_model") or extra.get("base") or profile.model.base)
    return AttackPlan(profile=profile, profile_name=profile_name, immunize_run=imm, immunize_status=st,
                      group=st.get("group"), targets=targets, others=others, methods=chosen, settings=settings,
                      model=str(imm), twin_model=twin_model, twin_parent=twin_parent,
                      twin_hash=st.get("base_model_hash"), control=control, twin_only=twin_only)


# --------------------------------------------------------------------------------------------- cache


def _digest(images: np.ndarray | None) -> str | None:
    if images is None:
        return None
    h = hashlib.sha256(repr(images.shape).encode())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()[:20]


def cache_key(model_hash: str, settings: AttackSettings, concept: str, *, seed: int, eval_seeds: Sequence[int],
              prompt: str, eval_prompt: str, images: np.ndarray, class_images: np.ndarray | None = None,
              sample_steps: int, guidance: float, dtype: str, device: str) -> str:
    """The cache key of one concept's attack on one model (see the module docstring)."""
    payload = {"model": model_hash, "settings": asdict(settings), "concept": concept, "seed": int(seed),
               "eval_seeds": [int(s) for s in eval_seeds], "prompt": prompt, "eval_prompt": eval_prompt,
               "images": _digest(images), "class_images": _digest(class_images), "sample_steps": int(sample_steps),
               "guidance": float(guidance), "dtype": dtype, "device": device}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _cache_source(st: Mapping[str, Any]) -> bool:
    extra = st.get("extra") or {}
    return (st.get("kind") == "attack" and extra.get("immunized") is False and not extra.get("control")
            and st.get("state") in ("finished", "interrupted", "failed"))


def weights_dir(run_dir: str | Path, concept: str) -> Path:
    """Where an attack run keeps a concept's attack output (``--save-weights``): ``<run>/checkpoints/<concept>/``."""
    return Path(run_dir) / "checkpoints" / concept_dir(concept)


def find_cached(runs_dir: str | Path, keys: Mapping[str, str],
                need_weights: bool = False) -> tuple[Path | None, dict[str, Path]]:
    """``(whole, parts)``: a finished unimmunized attack run holding every concept of ``keys`` ({concept: key})
    with the same keys (newest first), and for each concept some run that holds it (its attack finished).
    ``need_weights``: only concepts whose attack output was saved (:func:`weights_dir`) count."""
    from .runs import list_runs

    whole, parts = None, {}
    for st in reversed(list_runs(runs_dir)):
        if not _cache_source(st):
            continue
        extra = st.get("extra") or {}
        have, done = extra.get("cache_keys") or {}, set(extra.get("done") or [])
        run_dir = Path(st["dir"])
        hits = {c for c, k in keys.items()
                if c in done and have.get(c) == k and eval_steps(run_dir, c)
                and (not need_weights or weights_dir(run_dir, c).is_dir())}
        if whole is None and st.get("state") == "finished" and hits == set(keys):
            whole = run_dir
        for c in hits:
            parts.setdefault(c, run_dir)
    return whole, parts


# ---------------------------------------------------------------------------------------------- run


@dataclass
class ConceptData:
    concept: Concept
    images: np.ndarray
    class_images: np.ndarray | None


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


class _Runner:
    """State shared by the attacks of one :func:`run_attacks` call."""

    def __init__(self, plan: AttackPlan, runs_dir: Path, device: str | None, progress, save_weights: bool) -> None:
        from .models import pick_device, pick_dtype

        self.plan, self.runs_dir, self.progress, self.save_weights = plan, runs_dir, progress, save_weights
        p = plan.profile
        self.device = pick_device(device or p.model.device)
        self.dtype = pick_dtype(p.model.dtype)
        self._base = None

    def load(self, ref: str):
        from .models import load_pipeline

        return load_pipeline(ref, self.device, self.dtype)

    def base_pipe(self):
        if self._base is None:
            self._base = self.load(self.plan.profile.model.base)
        return self._base

    # -- data -----------------------------------------------------------------------------------

    def data(self, size: int) -> dict[str, ConceptData]:
        from .data import ImageSetError, load_image_set

        p = self.plan.profile
        prior = any(s.prior_preservation for s in self.plan.settings.values())
        kw = dict(pipe_fn=self.base_pipe, model_key=p.model.base, steps=p.model.sample_steps,
                  guidance=p.model.guidance, cache_dir=self.runs_dir / ".cache")
        out = {}
        for name in self.plan.concepts:
            c = p.concept(name)
            try:
                images = load_image_set(c.images.attack, prompt=c.prompt, size=size, concept=c.name, **kw)
                cls = None
                if prior:
                    cls = load_image_set(p.regularization.images_for(c.class_prompt), prompt=c.class_prompt,
                                         size=size, **kw)
            except (ImageSetError, OSError) as e:
                raise AttackUsageError(f"concept '{name}': images.attack: {e}") from None
            out[name] = ConceptData(c, images, cls)
        return out

    def job(self, pipe, settings: AttackSettings, d: ConceptData, model_ref: str):
        from .attacks import job_for_concept

        m = self.plan.profile.model
        return job_for_concept(pipe, d.concept, settings, d.images, class_images=d.class_images, seed=m.seed,
                               sample_steps=m.sample_steps, guidance=m.guidance, base=model_ref,
                               tags={"concept": d.concept.name})

    def key(self, model_hash: str, settings: AttackSettings, d: ConceptData) -> str:
        job = self.job(None, settings, d, "")
        m = self.plan.profile.model
        return cache_key(model_hash, settings, d.concept.name, seed=job.seed, eval_seeds=job.eval_seeds,
                         prompt=job.prompt, eval_prompt=job.eval_text, images=d.images,
                         class_images=job.class_images, sample_steps=m.sample_steps, guidance=m.guidance,
                         dtype=m.dtype, device=self.device.type)

    # -- one run --------------------------------------------------------------------------------

    def extra(self, method: str, *, immunized: bool, control: bool, model: str, keys: dict[str, str] | None,
              settings: AttackSettings) -> dict[str, Any]:
        plan = self.plan
        job = self.job(None, settings, next(iter(self._data.values())), "")
        return {"attack": method, "concepts": plan.concepts, "targets": plan.targets, "others": plan.others,
                "immunized": immunized, "control": control, "immunize_run": plan.immunize_run.name,
                "immunize_runs": [plan.immunize_run.name], "immunize_method": plan.immunize_method,
                "model": model, "settings": asdict(settings), "seed": job.seed, "eval_seeds": job.eval_seeds,
                "eval_prompts": {c: self.job(None, settings, d, "").eval_text for c, d in self._data.items()},
                "cache_keys": keys or {}, "done": [], "reused": {}, "group_size": plan.group_size,
                "data": {c: {"set": "images.attack", "digest": _digest(d.images)} for c, d in self._data.items()}}

    def attack_concepts(self, writer, method: str, settings: AttackSettings, model_ref: str, stage: str,
                        concepts: Sequence[str], on_step: Callable[[str, int], None] | None = None,
                        skip: Mapping[str, Path] | None = None) -> str | None:
        """Attack ``concepts`` of ``model_ref`` into ``writer``'s run (copying those in ``skip`` from cached runs);
        returns the hash of the model (None when every concept was copied)."""
        from .attacks import run_attack
        from .models import model_hash

        skip = skip or {}
        total = settings.steps * len(concepts)
        done: list[str] = []
        reused: dict[str, str] = {}
        mhash = None
        for i, name in enumerate(concepts):
            if name in skip:
                self.copy_concept(writer, skip[name], name)
                reused[name] = skip[name].name
                done.append(name)
                writer.set_status(extra={"done": list(done), "reused": dict(reused)})
                writer.progress(settings.steps * (i + 1), total)
                if on_step:
                    for step in eval_steps(writer.dir, name):
                        on_step(name, step)
                continue
            pipe = self.load(model_ref)  # attacks change the pipeline in place: a fresh one per attack
            if mhash is None:
                mhash = model_hash(pipe)
            job = self.job(pipe, settings, self._data[name], model_ref)
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
            writer.set_status(extra={"done": list(done)})
            del pipe
        return mhash

    def copy_concept(self, writer, source: Path, concept: str) -> None:
        """Copy a concept's evaluation images from a cached run (arrays + PNG events), and its weights when saved."""
        from PIL import Image

        if self.save_weights and weights_dir(source, concept).is_dir():
            shutil.copytree(weights_dir(source, concept), weights_dir(writer.dir, concept), dirs_exist_ok=True)
        for step in eval_steps(source, concept):
            src = eval_path(source, concept, step)
            dst = eval_path(writer.dir, concept, step)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            ev = load_eval_images(source, concept, step)
            for seed, im in zip(ev.seeds, ev.images):
                writer.log_image(f"eval/{concept}", step, Image.fromarray(im), concept=concept,
                                 attack=writer.status.get("method"), seed=seed, reused_from=source.name)
        writer.log_status(f"{concept}: reused the attack of run {source.name} (same cache key)")

    # -- one method -----------------------------------------------------------------------------

    def run_method(self, method: str, backends: Mapping[str, Any] | None,
                   references: Mapping[str, np.ndarray] | None) -> PairResult:
        from .runs import RunWriter

        plan, p = self.plan, self.plan.profile
        settings = plan.settings[method]
        keys = {c: self.key(self.twin_hash, settings, d) for c, d in self._data.items()}
        common = dict(method=method, profile=p, profile_name=plan.profile_name, group=plan.group,
                      concepts=plan.concepts, phase=f"attack/{method}")
        whole, parts = find_cached(self.runs_dir, keys, need_weights=self.save_weights)
        twin_reused = whole is not None
        reused: dict[str, str] = {}
        notes = []
        if self.save_weights and whole is None:
            unweighted, _ = find_cached(self.runs_dir, keys)
            if unweighted is not None:
                notes.append(f"{method}: the cached unimmunized attack {unweighted.name} kept no weights, so the "
                             "unimmunized model was attacked again to save them (--save-weights)")
        if whole is not None:
            twin_dir = whole
        else:
            with RunWriter(self.runs_dir, "attack", parent=plan.twin_parent, base_model_hash=self.twin_hash,
                           extra=self.extra(method, immunized=False, control=False, model=plan.twin_model, keys=keys,
                                            settings=settings), **common) as tw:
                tw.log_status(f"{method} on the unimmunized model {Path(plan.twin_model).name} "
                              f"({', '.join(plan.concepts)}), shared by every immunization that started from it")
                self.attack_concepts(tw, method, settings, plan.twin_model, f"{method} x^A", plan.concepts,
                                     skip=parts)
                reused = dict(tw.status["extra"].get("reused") or {})
            twin_dir = tw.dir
        if plan.twin_only:
            return PairResult(method, None, twin_dir, twin_reused, reused, notes=notes)
        if plan.control:
            run_parent, model_ref, model_hash_ = plan.twin_parent, plan.twin_model, self.twin_hash
        else:
            run_parent, model_ref, model_hash_ = plan.immunize_run.name, plan.model, None
        result = PairResult(method, Path(), twin_dir, twin_reused, reused, notes=notes)
        with RunWriter(self.runs_dir, "attack", parent=run_parent, twin=twin_dir.name, base_model_hash=model_hash_,
                       extra=self.extra(method, immunized=not plan.control, control=plan.control, model=model_ref,
                                        keys=keys if plan.control else None, settings=settings), **common) as run:
            result.run = run.dir
            self._link(twin_dir, run.id)
            run.log_status(f"{method} on the {'unimmunized model again (control)' if plan.control else 'immunized model'} "
                           f"{Path(model_ref).name}; twin {twin_dir.name}"
                           + (" (reused from the cache)" if twin_reused else ""))
            evaluator = None
            if backends:
                tags = {"attack": method, "group": plan.group}

                def log(e, _run=run):
                    log_event(_run, e)
                    if e.name.startswith("msgr/"):
                        result.msgr.setdefault(e.step, {})[e.name.split("/", 1)[1]] = e.value

                evaluator = PairEvaluator(backends, plan.targets, plan.others, references,
                                          pair_images_reader(run.dir, twin_dir), log, tags)
            stage = f"{method} {'control' if plan.control else 'x^T'}"
            mhash = self.attack_concepts(run, method, settings, model_ref, stage, plan.concepts,
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
        return result

    def _link(self, twin_dir: Path, run_id: str) -> dict[str, Any]:
        """Point the unimmunized run's ``twin`` at ``run_id`` (the newest run compared with it; ``extra.twins`` keeps
        them all)."""
        from .runs import read_status, update_status

        st = read_status(twin_dir)
        extra = st.get("extra") or {}
        twins = [t for t in extra.get("twins") or [] if t != run_id] + [run_id]
        imm = [r for r in extra.get("immunize_runs") or [] if r != self.plan.immunize_run.name]
        imm.append(self.plan.immunize_run.name)
        return update_status(twin_dir, twin=run_id, extra={"twins": twins, "immunize_runs": imm})

    # -- all ------------------------------------------------------------------------------------

    def run(self, backends, live_eval: bool) -> list[PairResult]:
        from .attacks.common import resolution
        from .models import model_hash

        from .data import check_image_sets, profile_image_sets

        plan = self.plan
        if not plan.concepts:  # an empty slice (``part``): nothing to attack
            return []
        prior = any(s.prior_preservation for s in plan.settings.values())
        sets = profile_image_sets(plan.profile, plan.concepts, ("attack",), regularization=prior)
        if live_eval:
            sets += profile_image_sets(plan.profile, plan.targets, ("reference",), regularization=False)
        check_image_sets(sets, path=plan.profile_name)  # before any model loads or run is written
        probe = self.load(plan.twin_model)
        size = resolution(probe)
        self.twin_hash = plan.twin_hash or model_hash(probe)
        del probe
        self._data = self.data(size)
        for m, s in plan.settings.items():  # every job is valid before anything trains
            for d in self._data.values():
                try:
                    self.job(None, s, d, "")
                except ValueError as e:
                    raise AttackUsageError(f"{m} on '{d.concept.name}': {e}") from None
        notes: list[str] = []
        references = None
        if live_eval:
            backends, references, notes = self.live_backends(backends, size)
        results = []
        for m in plan.methods:
            r = self.run_method(m, backends, references)
            r.notes = notes + r.notes
            results.append(r)
        return results

    def live_backends(self, backends, size: int):
        from .metrics import MetricWeightsMissing, get_backends, require_trained

        p = self.plan.profile
        if backends is None:
            try:
                backends = get_backends(p.eval, self.device)
            except MetricWeightsMissing as e:
                return None, None, [f"live evaluation off: {e} (run `mima evaluate` once the weights exist)"]
        for b in backends.values():
            try:
                require_trained(b)
            except ValueError as e:
                raise AttackUsageError(str(e)) from None
        references = None
        if any(b.kind == "similarity" for b in backends.values()):
            from .data import ImageSetError

            try:
                references = load_references(p, self.plan.targets, size, self.runs_dir, str(self.device))
            except (ImageSetError, OSError) as e:
                raise AttackUsageError(f"images.reference: {e}") from None
        return backends, references, []


def run_attacks(plan: AttackPlan, *, runs_dir: str | Path, device: str | None = None, progress=None,
                backends: Mapping[str, Any] | None = None, live_eval: bool = True,
                save_weights: bool = False) -> list[PairResult]:
    """Run :func:`plan_attack`'s plan: per method, the unimmunized attack (or its cached run) then the immunized one,
    with live evaluation. ``backends``: metric backends to use instead of ``[eval] metrics`` (tests).
    ``save_weights``: keep each attack's output (LoRA, embeddings, UNet) under ``<run>/checkpoints/<concept>/``, the
    unimmunized attack's too: the cache then serves only attacks that kept their weights (a note says when a cached
    one without them was attacked again).
    ``progress(stage, step, total, info)`` is called as steps finish. Ctrl-C keeps every finished concept (the run
    is marked interrupted; ``extra.done`` lists what finished; a later call reuses it from the cache)."""
    return _Runner(plan, Path(runs_dir), device, progress, save_weights).run(backends, live_eval)


def attack(runs_dir: str | Path, *, run: str | None = None, methods: Sequence[str] | None = None,
           group: str | None = None, steps: int | None = None, profile: Profile | None = None,
           profile_name: str | None = None, overrides: Sequence[str] = (), control: bool = False,
           twin_only: bool = False, part: tuple[int, int] | None = None, device: str | None = None,
           progress=None,
           backends: Mapping[str, Any] | None = None, live_eval: bool = True,
           save_weights: bool = False) -> list[PairResult]:
    """:func:`plan_attack` then :func:`run_attacks`."""
    plan = plan_attack(runs_dir, run=run, profile=profile, profile_name=profile_name, overrides=overrides,
                       group=group, methods=methods, steps=steps, control=control, twin_only=twin_only, part=part)
    return run_attacks(plan, runs_dir=runs_dir, device=device, progress=progress, backends=backends,
                       live_eval=live_eval, save_weights=save_weights)
