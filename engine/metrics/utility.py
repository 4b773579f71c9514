"""Utility: what a model still draws without any attack — the cost of immunization, measured in every run.

    from engine.metrics.utility import utility_prompts, measure_utility
    prompts = utility_prompts(profile, targets=["strieker"], others=["pointelle", "checkov"])
    u = measure_utility(profile, prompts, model=(pipe, "hash"), parent=(parent_fn, "parent-hash"),
                        base=(base_fn, "testbed"), backends=backends, cache_dir=Path("runs/.cache"))
    u.share, u.collapsed                                   # others' utility relative to the parent's

Prompts (:class:`UtilityPrompt`) have a role: ``target`` (the concepts immunized against), ``other`` (every other
concept of the profile and, on the testbed, every style and object of its world) and ``caption`` (held-out generic
captions, none of those the merge regularises with). Each prompt is drawn ``[utility] images`` times, image *i*
with seed ``[utility] seed + i``, by three models: the model measured, its parent (the model immunization started
from) and the base. Scores per prompt and model:

``judge-acc``  share of the images the testbed judge names as the prompt's concept (concepts only);
``clip``       CLIP score, the mean cosine of the prompt's text features and each image's image features;
``judge`` / ``dino`` / ``lpips``
               fidelity: the mean similarity of each image to the parent's image of the same seed (1 for the parent).

The *primary* metric is ``judge-acc`` when measured, else ``clip``, else the first metric. ``share`` = the model's
mean primary score over the other concepts divided by the parent's; below ``[utility] collapse_share`` (0.8) the
model is *collapsed*: it no longer draws what its parent drew, and an MSGR measured on it says nothing about
immunization.

Events (kind ``metric``, phase ``utility``): ``utility/<metric>/<prompt name>`` with tags ``metric``, ``concept``
(the prompt's name), ``role`` and ``model`` (``model`` | ``parent`` | ``base``); then one ``utility`` event whose
value is ``share`` and whose field ``summary`` is :meth:`Utility.to_dict` (also saved in the run's status,
``extra.utility``). :func:`read_utility` reads it back from a run directory alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROLES = ("target", "other", "caption")
MODELS = ("model", "parent", "base")
SCORE_METRICS = ("judge-acc", "clip")
"""Metrics that score a prompt's images on their own (the others compare them with the parent's)."""
EVENT = "utility"


@dataclass(frozen=True)
class UtilityPrompt:
    name: str
    prompt: str
    role: str
    concept: str | None = None
    """The concept the judge checks the images against (None for a caption)."""


def is_testbed_model(ref: str | Path) -> bool:
    """True for ``testbed`` and for any testbed pipeline folder (it holds ``testbed.json``)."""
    from engine.testbed import TESTBED

    if str(ref) == TESTBED:
        return True
    path = Path(ref)
    return (path / "testbed.json").is_file() or (path / "model" / "testbed.json").is_file()


def utility_metrics(profile: Any) -> list[str]:
    """``[utility] metrics``, or the ``[eval] metrics`` (the backbones the report's tables use)."""
    return list(profile.utility.metrics or profile.eval.metrics)


def primary_metric(metrics: Sequence[str]) -> str:
    return next((m for m in SCORE_METRICS if m in metrics), metrics[0])


def heldout_captions(profile: Any) -> list[str]:
    """``[utility] captions`` generic captions that the merge regulariser does not use (seeded by the utility seed)."""
    from engine.profile import read_captions, sample_captions

    n = profile.utility.captions
    if n == 0:
        return []
    used = set(profile.regularization_captions())
    pool = [c for c in read_captions(profile.regularization.captions_path()) if c not in used]
    return sample_captions(pool, min(n, len(pool)), profile.utility.seed) if pool else []


def utility_prompts(profile: Any, targets: Sequence[str], others: Sequence[str]) -> list[UtilityPrompt]:
    """The prompts utility is measured on: the targets, the other concepts (on the testbed also its whole world's
    styles and objects), the held-out captions."""
    out = [UtilityPrompt(c, profile.concept(c).prompt, "target", c) for c in targets]
    out += [UtilityPrompt(c, profile.concept(c).prompt, "other", c) for c in others]
    world = profile.utility.world
    if world is None:
        world = is_testbed_model(profile.model.base)
    if world:
        from engine.testbed.check import concept_prompts

        named = {p.name for p in out}
        out += [UtilityPrompt(c, prompt, "other", c) for c, _, prompt in concept_prompts() if c not in named]
    out += [UtilityPrompt(f"caption-{i + 1}", text, "caption") for i, text in enumerate(heldout_captions(profile))]
    return out


# ------------------------------------------------------------------------------------------- images


ModelSource = tuple[Callable[[], Any], str]
"""``(pipe_fn, key)``: a function returning the pipeline (called only when an image set is not cached) and the key
its generations are cached under (the model's hash, :func:`engine.models.model_hash`)."""


def utility_images(source: ModelSource, prompts: Sequence[UtilityPrompt], profile: Any, cache_dir: Path | None,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """``{prompt name: uint8 [n, H, W, 3]}`` generations of each prompt by one model (cached by its key)."""
    from engine.image_sets import generated_set

    pipe_fn, key = source
    u = profile.utility
    seeds = range(u.seed, u.seed + u.images)
    out = {}
    for i, p in enumerate(prompts):
        out[p.name] = generated_set(pipe_fn, key, p.prompt, seeds, profile.model.sample_steps, profile.model.guidance,
                                    cache_dir)
        if progress:
            progress(i + 1, len(prompts))
    return out


def paired_similarity(backend: Any, a: np.ndarray, b: np.ndarray) -> float:
    """The mean similarity of ``a[i]`` and ``b[i]`` (images of the same seed), not of all pairs."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired similarity of {len(a)} and {len(b)} images")
    return float(backend.pair_matrix(a, b).diagonal().double().mean())


def score_images(images: Mapping[str, np.ndarray], parent: Mapping[str, np.ndarray],
                 prompts: Sequence[UtilityPrompt], backends: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{prompt name: {metric: value}}`` (see the module docstring); None where a metric does not apply."""
    out: dict[str, dict[str, float | None]] = {}
    for p in prompts:
        x = images[p.name]
        row: dict[str, float | None] = {}
        for name, backend in backends.items():
            if name == "judge-acc":
                try:
                    row[name] = backend.accuracy(x, p.concept) if p.concept else None
                except KeyError:  # a concept the judge has no head for
                    row[name] = None
            elif name == "clip":
                row[name] = backend.clip_score(x, p.prompt)
            else:
                row[name] = paired_similarity(backend, x, parent[p.name])
        out[p.name] = {k: (float(v) if v is not None and math.isfinite(v) else None) for k, v in row.items()}
    return out


# ------------------------------------------------------------------------------------------ summary


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


@dataclass
class Utility:
    """Utility of one model against its parent and the base (see the module docstring)."""

    metrics: list[str]
    primary: str
    threshold: float
    prompts: list[UtilityPrompt]
    scores: dict[str, dict[str, dict[str, float | None]]]
    """``model`` | ``parent`` | ``base`` -> prompt name -> metric -> value."""
    images: int = 8
    parent: str | None = None
    base: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def role_scores(self, model: str, role: str, metric: str | None = None) -> dict[str, float | None]:
        """Prompt name -> ``model``'s ``metric`` (default: the primary) score, for the prompts of ``role``."""
        metric = metric or self.primary
        per = self.scores.get(model, {})
        return {p.name: per.get(p.name, {}).get(metric) for p in self.prompts if p.role == role}

    def role_mean(self, model: str, role: str, metric: str | None = None) -> float | None:
        return _mean(list(self.role_scores(model, role, metric).values()))

    def role_worst(self, model: str, role: str, metric: str | None = None) -> tuple[str, float] | None:
        """The prompt of ``role`` with the lowest score and that score (None when none is scored)."""
        scored = [(n, v) for n, v in self.role_scores(model, role, metric).items() if v is not None]
        return min(scored, key=lambda nv: nv[1]) if scored else None

    def concept_score(self, model: str, name: str, metric: str | None = None) -> float | None:
        return self.scores.get(model, {}).get(name, {}).get(metric or self.primary)

    @property
    def share(self) -> float | None:
        """The model's other concepts' primary score relative to its parent's."""
        mine, parent = self.role_mean("model", "other"), self.role_mean("parent", "other")
        if mine is None or not parent:
            return None
        return mine / parent

    @property
    def collapsed(self) -> bool:
        share = self.share
        return share is not None and share < self.threshold

    def to_dict(self) -> dict[str, Any]:
        roles = {m: {metric: {r: self.role_mean(m, r, metric) for r in ROLES} for metric in self.metrics}
                 for m in MODELS if m in self.scores}
        return {"metrics": self.metrics, "primary": self.primary, "threshold": self.threshold,
                "share": self.share, "collapsed": self.collapsed, "images": self.images, "parent": self.parent,
                "base": self.base, "roles": roles,
                "prompts": [{"name": p.name, "prompt": p.prompt, "role": p.role, "concept": p.concept}
                            for p in self.prompts],
                "scores": self.scores, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Utility:
        known = {"metrics", "primary", "threshold", "share", "collapsed", "images", "parent", "base", "roles",
                 "prompts", "scores"}
        return cls(metrics=list(d["metrics"]), primary=str(d["primary"]), threshold=float(d["threshold"]),
                   prompts=[UtilityPrompt(**p) for p in d.get("prompts", [])], scores=dict(d.get("scores") or {}),
                   images=int(d.get("images") or 0), parent=d.get("parent"), base=d.get("base"),
                   extra={k: v for k, v in d.items() if k not in known})

    def describe(self) -> str:
        """One line: others' and targets' primary utility against the parent's, and the verdict."""
        def f(v):
            return "—" if v is None else f"{v:.2f}"
        share = self.share
        verdict = ("COLLAPSED" if self.collapsed else "kept") + (f" ({share:.0%} of the parent)" if share is not None else "")
        return (f"utility ({self.primary}, no attack): others {f(self.role_mean('model', 'other'))} "
                f"(parent {f(self.role_mean('parent', 'other'))}), targets {f(self.role_mean('model', 'target'))} "
                f"(parent {f(self.role_mean('parent', 'target'))}): {verdict}")


def utility_backends(profile: Any, device: str = "cpu", backends: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The backends of :func:`utility_metrics` (``backends``: already built ones, reused by name)."""
    from engine.metrics import get_backends

    names = utility_metrics(profile)
    have = dict(backends or {})
    missing = [n for n in names if n not in have]
    if missing:
        have.update(get_backends(profile.eval, device, metrics=missing))
    return {n: have[n] for n in names}


def measure_utility(profile: Any, prompts: Sequence[UtilityPrompt], *, model: ModelSource, parent: ModelSource,
                    base: ModelSource, backends: Mapping[str, Any], cache_dir: Path | None,
                    progress: Callable[[str, int, int], None] | None = None) -> Utility:
    """Generate and score the prompts with the model, its parent and the base (see the module docstring).

    ``progress(which, done, total)``: after each prompt of each model. Generations are cached under
    ``cache_dir/images`` by each source's key, so the parent's and the base's are made once per runs directory.
    """
    from engine.metrics import require_trained

    for b in backends.values():
        require_trained(b)
    metrics = list(backends)
    sets: dict[str, dict[str, np.ndarray]] = {}
    keys: dict[str, str] = {}
    for which, source in (("parent", parent), ("base", base), ("model", model)):
        if source[1] in keys.values():  # the same model (e.g. no erase: the parent is the base)
            sets[which] = sets[next(k for k, v in keys.items() if v == source[1])]
        else:
            cb = (lambda i, n, w=which: progress(w, i, n)) if progress else None
            sets[which] = utility_images(source, prompts, profile, cache_dir, cb)
        keys[which] = source[1]
    scores = {which: score_images(sets[which], sets["parent"], prompts, backends) for which in MODELS}
    return Utility(metrics, primary_metric(metrics), profile.utility.collapse_share, list(prompts), scores,
                   images=profile.utility.images, parent=parent[1], base=base[1])


def measure_run_utility(writer: Any, profile: Any, targets: Sequence[str], others: Sequence[str], *,
                        model: ModelSource, parent: ModelSource, base: tuple[Callable[[], Any], str | None],
                        cache_dir: Path | None, device: str = "cpu", backends: Mapping[str, Any] | None = None,
                        progress: Callable[..., None] | None = None, **tags: Any) -> Utility:
    """Measure a model's utility and log it into a run (events, status, one status line); returns it.

    ``base``'s key may be None: it is then the hash of the pipeline ``base[0]()`` returns. ``progress(stage, done,
    total, info)`` is the CLI's progress callback (stage ``utility``).
    """
    from engine.models import model_hash

    if base[1] is None:
        base = (base[0], model_hash(base[0]()))
    prompts = utility_prompts(profile, targets, others)
    built = utility_backends(profile, device, backends)
    writer.log_status(f"utility: {len(prompts)} prompts x {profile.utility.images} images, metrics "
                      f"{', '.join(built)}, against the parent and the base")
    total = len(prompts) * len({model[1], parent[1], base[1]})
    done = {"n": 0}

    def step(which: str, i: int, n: int) -> None:
        done["n"] += 1
        writer.progress(done["n"], total)
        if progress:
            progress("utility", done["n"], total, {"model": which})

    u = measure_utility(profile, prompts, model=model, parent=parent, base=base, backends=built,
                        cache_dir=cache_dir, progress=step)
    log_utility(writer, u, **tags)
    writer.log_status(u.describe())
    return u


# ------------------------------------------------------------------------------------------ events


def log_utility(writer: Any, u: Utility, **tags: Any) -> None:
    """Write the utility events of :mod:`this module <engine.metrics.utility>` and ``extra.utility`` in the status
    (:class:`~engine.runs.UtilitySummary`)."""
    from engine.runs import UtilitySummary

    for which in MODELS:
        for p in u.prompts:
            for metric, value in u.scores.get(which, {}).get(p.name, {}).items():
                writer.log("metric", f"{EVENT}/{metric}/{p.name}", value, phase=EVENT,
                           tags={**tags, "metric": metric, "concept": p.name, "role": p.role, "model": which})
    summary = u.to_dict()
    writer.log("metric", EVENT, u.share, phase=EVENT, tags={**tags, "metric": u.primary}, summary=summary)
    status = UtilitySummary(**{k: summary[k] for k in ("primary", "threshold", "share", "collapsed", "roles")})
    writer.set_status(extra={EVENT: status.to_dict()})


def read_utility(run_dir: str | Path) -> Utility | None:
    """The newest utility measurement logged in a run directory (None when it has none)."""
    from engine.runs import RunReader

    last = None
    for e in RunReader(run_dir).events("metric"):
        if e.get("name") == EVENT and isinstance(e.get("summary"), dict):
            last = e["summary"]
    return Utility.from_dict(last) if last else None
