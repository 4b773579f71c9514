"""``erase``: UCE-erase concepts from a model's cross-attention k/v and save it as a run (kind ``erase``)."""

from __future__ import annotations

from pathlib import Path

from .image_sets import check_image_sets, profile_image_sets
from .editing import uce_edit
from .profile import Profile


def erase_others(profile: Profile, group: str | None, erased: list[str]) -> list[str]:
    """The concepts an erase keeps, as its utility counts them: the group's others (every concept without a
    group), less the erased ones."""
    return [c.name for c in (profile.group(group).others if group else profile.concepts) if c.name not in erased]


def erase(profile: Profile, *, runs_dir: str | Path, group: str | None = None, profile_name: str | None = None,
          device: str | None = None, progress=None) -> Path:
    """Erase ``[erase] concepts`` (default: the group's targets) from ``[model] base`` with UCE; returns the run dir.

    Preserved prompts: ``[erase] preserve``, or when empty the prompts of every profile concept not erased. A
    preserved prompt that is also erased is erased: one list of every concept a model should keep (the testbed
    profiles list the whole world) serves every group.

    The erased model is ``<run>/model`` (UNet only + ``mima_model.json`` naming the base). ``[erase] method = "none"``
    is an error here: there is nothing to erase. The image sets that immunizing the group reads are checked first
    (:func:`engine.image_sets.check_image_sets`), so that a broken one stops the work before this run is written.
    """
    from .models import load_pipeline, model_hash, pick_device, pick_dtype, save_model
    from .runs import RunWriter

    if profile.erase.method != "uce":
        raise ValueError(f"[erase] method is {profile.erase.method!r}; set it to \"uce\" to erase")
    concepts = profile.erase_targets(group)
    # the erased model is the start of the group's immunization: its image sets are checked before any work
    targets = profile.group(group).target_names if group else profile.concept_names
    check_image_sets(profile_image_sets(profile, targets, ("immunize",)), path=profile_name)
    base = profile.model.base
    dev, dtype = pick_device(device or profile.model.device), pick_dtype(profile.model.dtype)
    pipe = load_pipeline(base, dev, dtype)
    base_hash = model_hash(pipe)
    with RunWriter(runs_dir, "erase", method="uce", profile=profile, profile_name=profile_name, group=group,
                   concepts=[c.name for c in concepts], base_model_hash=base_hash,
                   extra={"base": base, "target": profile.erase.target}) as run:
        e = profile.erase
        erased = {c.prompt.strip() for c in concepts}
        preserve = [p for p in e.preserve or [c.prompt for c in profile.concepts] if p.strip() not in erased]
        report = uce_edit(pipe.unet, pipe.text_encoder, pipe.tokenizer, [c.prompt for c in concepts], preserve,
                          e.target, e.lamb, e.erase_scale, e.preserve_scale, e.padding)
        for key, value in vars(report).items():
            run.log_metric(f"uce/{key}", value)
        run.log_status(f"UCE: {report.erased_rows} erased + {report.preserved_rows} preserved rows in width "
                       f"{report.width} over {report.layers} k/v layers; preserved drift {report.preserve_drift:.2e}"
                       + (" (rows dependent: least-squares compromise)" if report.dependent else ""))
        run.progress(1, 1)
        if progress:
            progress("erase", 1, 1, {"drift": report.preserve_drift})
        save_model(pipe, run.dir / "model", base=base, full=False)
        erased_hash = model_hash(pipe)
        run.set_status(extra={"base": base, "target": e.target, "preserve_drift": report.preserve_drift,
                              "erased_model_hash": erased_hash})
        if profile.utility.enabled:  # also caches the base's and the erased model's utility images for immunize
            from .metrics.utility import measure_run_utility

            others = erase_others(profile, group, [c.name for c in concepts])
            base_source = (lambda: load_pipeline(base, dev, dtype), base_hash)
            run.set_phase("utility")
            measure_run_utility(run, profile, [c.name for c in concepts], others, model=(lambda: pipe, erased_hash),
                                parent=base_source, base=base_source, cache_dir=Path(runs_dir) / ".cache",
                                device=str(dev), progress=progress)
    return run.dir
