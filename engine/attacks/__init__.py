"""Fine-tuning attacks against a (possibly immunized) Stable Diffusion pipeline, one module per attack.

    from engine.attacks import ATTACKS, default_settings, job_for_concept, run_attack, load_attack_output
    settings = default_settings("lora", steps=2)
    result = run_attack(AttackJob(pipe, settings, images, "an artwork of Claude Monet"), logger, out="out/lora")
    load_attack_output(fresh_pipe, "out/lora")     # the diffusers call of that attack

Registered names: ``lora``, ``dreambooth``, ``dreambooth-lora``, ``textual-inversion``, ``custom-diffusion``.
Adding an attack is one new module with a ``@register(name)`` class (see :class:`~engine.attacks.common.Attack`)
imported below. Attacks train ``job.pipe`` in place (see :mod:`engine.attacks.common`).

``mima attack`` — an immunization run and its twin attacked as MSGR needs them — is planned in
:mod:`~engine.attacks.plan`, served from the cache of unimmunized attacks in :mod:`~engine.attacks.cache`, and run in
:mod:`~engine.attacks.pairs` (with :mod:`~engine.attacks.jobs`, what the attacks of one plan share).
"""

from __future__ import annotations

from .common import (
    ATTACK_JSON,
    ATTACKS,
    EVAL_SEED,
    Attack,
    AttackJob,
    AttackResult,
    Trainable,
    default_settings,
    get_attack,
    job_for_concept,
    load_attack_output,
    register,
    run_attack,
    with_settings,
)

from . import lora, dreambooth, dreambooth_lora, textual_inversion, custom_diffusion  # noqa: E402,F401  (register)

__all__ = [
    "ATTACKS", "ATTACK_JSON", "EVAL_SEED", "Attack", "AttackJob", "AttackResult", "Trainable", "register", "get_attack",
    "default_settings", "job_for_concept", "run_attack", "load_attack_output", "with_settings",
]
