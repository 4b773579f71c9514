"""Quality gates of the testbed: is the judge right, and does the pipeline draw what it is asked for?

``check_testbed`` measures, with fixed seeds and the pinned sampler settings:

- the judge on held-out renders (``judge_accuracy``, all heads; ``judge_grayscale_style_accuracy``);
- ``generation_accuracy``: the share of base-pipeline generations, ``n`` per style and object prompt, that the
  judge takes for the intended concept; ``per_concept`` accuracies and a ``confusion`` table (prompt concept
  -> what its images were taken for);
- ``seconds_per_image`` of generation on this machine.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import torch

from ..sampling import generate
from . import world

GATES = {
    "judge_accuracy": 0.95,
    "judge_grayscale_style_accuracy": 0.80,
    "generation_accuracy": 0.80,
    "min_concept_accuracy": 0.60,
}
MAX_SECONDS_PER_IMAGE = 0.5
CHECK_SEED = 424_242


def concept_prompts() -> list[tuple[str, str, str]]:
    """(concept, head, prompt) for every style and object."""
    return [*((s, "style", world.style_prompt(s)) for s in world.STYLES),
            *((o, "object", world.object_prompt(o)) for o in world.OBJECTS)]


def head_names(head: str) -> list[str]:
    names = {"style": world.STYLES, "object": world.OBJECTS, "personal": tuple(p.name for p in world.PERSONAL)}[head]
    return [*names, "none"]


def check_testbed(pipe, judge, n: int = 16, steps: int | None = None, guidance: float | None = None,
                  seed: int = CHECK_SEED, judge_n: int = 40, progress=None) -> dict:
    from . import GUIDANCE, SAMPLE_STEPS
    from .judge import evaluate_judge

    steps = steps or SAMPLE_STEPS
    guidance = guidance if guidance is not None else GUIDANCE
    result = dict(evaluate_judge(judge, judge_n, seed))
    per_concept, confusion = {}, {}
    t_gen, n_gen = 0.0, 0
    prompts = concept_prompts()
    for i, (concept, head, prompt) in enumerate(prompts):
        t0 = time.perf_counter()
        images = generate(pipe, prompt, range(seed, seed + n), steps, guidance)
        t_gen += time.perf_counter() - t0
        n_gen += len(images)
        with torch.no_grad():
            pred = judge.classify(images)[head].tolist()
        names = head_names(head)
        taken = Counter(names[k] for k in pred)
        per_concept[concept] = taken.get(concept, 0) / len(images)
        confusion[concept] = dict(taken.most_common())
        if progress:
            progress(i + 1, len(prompts), concept)
    result.update(
        generation_accuracy=float(np.mean(list(per_concept.values()))),
        min_concept_accuracy=min(per_concept.values()),
        per_concept=per_concept,
        confusion=confusion,
        seconds_per_image=t_gen / max(1, n_gen),
        images_per_concept=n,
        sample_steps=steps,
        guidance=guidance,
        torch_threads=torch.get_num_threads(),
    )
    result["passed"] = passed(result)
    return result


def passed(result: dict) -> dict[str, bool]:
    """Which gates the result meets."""
    out = {k: result.get(k, 0.0) >= v for k, v in GATES.items()}
    out["seconds_per_image"] = result.get("seconds_per_image", float("inf")) <= MAX_SECONDS_PER_IMAGE
    return out
