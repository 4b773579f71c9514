"""What the attacks of one plan share: the pipelines (:class:`Models`) and every concept's attack data, jobs, cache
keys and run links (:class:`Jobs`), made once before anything trains."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.profile import AttackSettings, Concept, Profile
from engine.runs import AttackLinks

from .cache import cache_key, image_digest
from .plan import AttackPlan, AttackUsageError

__all__ = ["ConceptData", "Models", "Jobs"]


@dataclass
class ConceptData:
    concept: Concept
    images: np.ndarray
    class_images: np.ndarray | None


class Models:
    """Pipelines on the attack's device and dtype: a fresh one per attack (attacks train in place), the base once."""

    def __init__(self, profile: Profile, device: str | None) -> None:
        from engine.models import pick_device, pick_dtype

        self.device = pick_device(device or profile.model.device)
        self.dtype = pick_dtype(profile.model.dtype)
        self.base_ref = profile.model.base
        self._base = None

    def load(self, ref: str):
        from engine.models import load_pipeline

        return load_pipeline(ref, self.device, self.dtype)

    def base(self):
        if self._base is None:
            self._base = self.load(self.base_ref)
        return self._base


class Jobs:
    """Every concept's attack data at the model's resolution, and the jobs, cache keys and run links made of it."""

    def __init__(self, plan: AttackPlan, models: Models, runs_dir: Path, size: int) -> None:
        self.plan, self.models = plan, models
        self.data = self._load(runs_dir, size)
        for m, s in plan.settings.items():  # every job is valid before anything trains
            for d in self.data.values():
                try:
                    self.job(None, s, d, "")
                except ValueError as e:
                    raise AttackUsageError(f"{m} on '{d.concept.name}': {e}") from None

    def _load(self, runs_dir: Path, size: int) -> dict[str, ConceptData]:
        from engine.image_sets import ImageSetError, load_image_set

        p = self.plan.profile
        prior = any(s.prior_preservation for s in self.plan.settings.values())
        kw = dict(pipe_fn=self.models.base, model_key=p.model.base, steps=p.model.sample_steps,
                  guidance=p.model.guidance, cache_dir=runs_dir / ".cache")
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
        from . import job_for_concept

        m = self.plan.profile.model
        return job_for_concept(pipe, d.concept, settings, d.images, class_images=d.class_images, seed=m.seed,
                               sample_steps=m.sample_steps, guidance=m.guidance, base=model_ref,
                               tags={"concept": d.concept.name})

    def keys(self, model_hash: str, settings: AttackSettings) -> dict[str, str]:
        """The cache key of every concept's attack on the model ``model_hash``."""
        m = self.plan.profile.model
        out = {}
        for c, d in self.data.items():
            job = self.job(None, settings, d, "")
            out[c] = cache_key(model_hash, settings, d.concept.name, seed=job.seed, eval_seeds=job.eval_seeds,
                               prompt=job.prompt, eval_prompt=job.eval_text, images=d.images,
                               class_images=job.class_images, sample_steps=m.sample_steps, guidance=m.guidance,
                               dtype=m.dtype, device=self.models.device.type)
        return out

    def links(self, method: str, settings: AttackSettings, *, immunized: bool, control: bool, model: str,
              keys: dict[str, str] | None) -> AttackLinks:
        """The ``extra`` of a new attack run of ``method``."""
        plan = self.plan
        job = self.job(None, settings, next(iter(self.data.values())), "")
        return AttackLinks(
            attack=method, concepts=plan.concepts, targets=plan.targets, others=plan.others, immunized=immunized,
            control=control, immunize_run=plan.immunize_run.name, immunize_runs=[plan.immunize_run.name],
            immunize_method=plan.immunize_method, model=model, settings=asdict(settings), seed=job.seed,
            eval_seeds=job.eval_seeds,
            eval_prompts={c: self.job(None, settings, d, "").eval_text for c, d in self.data.items()},
            cache_keys=keys or {}, done=[], reused={}, group_size=plan.group_size,
            data={c: {"set": "images.attack", "digest": image_digest(d.images)} for c, d in self.data.items()})
