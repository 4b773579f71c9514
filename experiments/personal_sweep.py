"""Personalization budget sweep on the testbed (issue #5): which settings of DreamBooth, DreamBooth-LoRA, Custom
Diffusion and Textual Inversion teach the testbed's personal instances, and by which step.

Every run attacks the *unimmunized* shipped testbed (``profiles/testbed-personal.toml``'s concepts, attack images,
class images, attacker token, evaluation prompt and seeds) and writes one JSON line: method, lr, batch, prior
preservation, concept, the judge's accuracy on the instance (personal head) and on its object (object head) at each
evaluation step, the final loss and the seconds it took. Runs are spread over ``--workers`` processes (spawned; on
a GPU they share it) and are written as they finish, so a run cut short still leaves every finished line.

    python experiments/personal_sweep.py --out sweep.jsonl --device cuda --workers 12
    python experiments/personal_sweep.py --out sweep.jsonl --smoke        # 2 tiny runs on the CPU
    python experiments/personal_sweep.py --out sweep.jsonl --pipeline BUILD/pipeline   # a candidate build
    python experiments/personal_sweep.py --out words.jsonl --words    # the base asked for each whole look in words
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import sys
import time

PROFILE = "testbed-personal"
EVAL_STEPS = (20, 40, 80, 120, 160)


LRS = {"dreambooth": (1e-4, 3e-4, 1e-3, 3e-3), "custom-diffusion": (1e-3, 3e-3, 1e-2, 3e-2),
       "dreambooth-lora": (1e-3, 3e-3, 1e-2), "textual-inversion": (5e-3, 2e-2, 5e-2)}


def grid(smoke: bool, methods=tuple(LRS), lrs: tuple[float, ...] = (), batches=(1, 4), priors=(False, True),
         steps: int = max(EVAL_STEPS)) -> list[dict]:
    """The settings to run, method-major (``lrs`` empty: :data:`LRS` of each method)."""
    if smoke:
        return [dict(method="dreambooth", lr=3e-4, batch=2, prior=False, steps=2, eval_every=1),
                dict(method="custom-diffusion", lr=1e-3, batch=1, prior=True, steps=2, eval_every=1)]
    cfgs = []
    for method in methods:
        ps = (False,) if method == "textual-inversion" else priors
        for lr, batch, prior in itertools.product(lrs or LRS[method], batches, ps):
            cfgs.append(dict(method=method, lr=lr, batch=batch, prior=prior, steps=steps, eval_every=0))
    return cfgs


def run_one(cfg: dict, concept: str, device: str, eval_steps: tuple[int, ...] = EVAL_STEPS,
            pipeline: str | None = None) -> dict:
    from engine.attacks import job_for_concept
    from engine.attacks.common import default_settings
    from engine.image_sets import load_image_set
    from engine.profile import load_profile
    from engine.testbed import judge as judge_mod
    from engine.testbed import load_judge, load_pipeline, world

    p = load_profile(PROFILE)
    c = p.concept(concept)
    steps = cfg["steps"]
    eval_steps = [s for s in eval_steps if s <= steps] if not cfg["eval_every"] else list(range(1, steps + 1))
    settings = default_settings(cfg["method"], testbed=True, steps=steps, lr=cfg["lr"], batch=cfg["batch"],
                                prior_preservation=cfg["prior"], eval_every=0, eval_images=p.attack.eval_images,
                                eval_prompt=p.attack.eval_prompt, token=p.attack.token)
    pipe = load_pipeline(pipeline, device=device)
    judge = load_judge().to(device)
    images = load_image_set(c.images.attack, prompt=c.prompt, size=64, concept=c.name)
    cls = load_image_set(p.regularization.images_for(c.class_prompt), prompt=c.class_prompt, size=64) \
        if cfg["prior"] else None
    job = job_for_concept(pipe, c, settings, images, class_images=cls, seed=p.model.seed,
                          sample_steps=p.model.sample_steps, guidance=p.model.guidance, log_images=False)
    acc, obj = {}, {}

    def on_eval(step, imgs):
        acc[step] = judge_mod.accuracy(judge, imgs, concept)
        obj[step] = judge_mod.accuracy(judge, imgs, world.PERSONAL_BY_NAME[concept].object)

    t0 = time.perf_counter()
    result = _run_with_steps(job, eval_steps, on_eval)
    return dict(cfg, concept=concept, acc=acc, obj=obj, loss_first=result.losses[0], loss_last=result.losses[-1],
                seconds=time.perf_counter() - t0, device=device)


def words(out: str, pipeline: str | None, device: str, n: int = 16) -> None:
    """The base model asked for each instance's whole look in words ("a photo of a red star with yellow tips and a
    white centre"; the world never draws it): judge accuracy on the instance and on its object, ``n`` generations
    from the evaluation seeds, one JSON line per instance. What Textual Inversion and Custom Diffusion can at best
    find, since they only steer what the base draws."""
    from engine.attacks.common import EVAL_SEED
    from engine.profile import load_profile
    from engine.sampling import generate
    from engine.testbed import judge as judge_mod
    from engine.testbed import load_judge, load_pipeline, world

    p = load_profile(PROFILE)
    pipe = load_pipeline(pipeline, device=device)
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge().to(device)
    for inst in world.PERSONAL:
        prompt = world.object_prompt(inst.object, world.whole_look(inst))
        images = generate(pipe, prompt, range(EVAL_SEED, EVAL_SEED + n), p.model.sample_steps, p.model.guidance)
        line = dict(concept=inst.name, prompt=prompt, acc=judge_mod.accuracy(judge, images, inst.name),
                    obj=judge_mod.accuracy(judge, images, inst.object), n=n, pipeline=pipeline or "shipped")
        with open(out, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)


def _run_with_steps(job, eval_steps, on_eval):
    """``run_attack`` evaluating at ``eval_steps`` (AttackSettings only knows "every N")."""
    from engine.attacks import run_attack
    from engine.profile import AttackSettings

    original = AttackSettings.eval_steps
    AttackSettings.eval_steps = property(lambda self: list(eval_steps))
    try:
        return run_attack(job, on_eval=on_eval)
    finally:
        AttackSettings.eval_steps = original


def worker(rank: int, workers: int, eval_steps: tuple[int, ...], tasks: list, out: str, device: str, lock,
           pipeline: str | None = None) -> None:
    """Run every ``workers``-th task from ``rank`` on (one torch thread) and append its line to ``out``."""
    import torch

    torch.set_num_threads(1)
    for cfg, concept in tasks[rank::workers]:
        try:
            line = run_one(cfg, concept, device, eval_steps, pipeline)
        except Exception as e:  # a failed setting is a result too
            line = dict(cfg, concept=concept, error=f"{type(e).__name__}: {e}")
        with lock:
            with open(out, "a") as f:
                f.write(json.dumps(line) + "\n")
        print(json.dumps({k: line.get(k) for k in ("method", "lr", "batch", "prior", "concept", "acc", "seconds",
                                                   "error")}), flush=True)



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--concepts", default="redstar,blueheart,purplehouse,orangemoon,tealcross,greenfish")
    ap.add_argument("--methods", default=",".join(LRS))
    ap.add_argument("--lrs", default="", help="comma-separated learning rates (default: each method's LRS)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--priors", default="0,1", help="prior preservation off (0) and/or on (1)")
    ap.add_argument("--eval-steps", default=",".join(map(str, EVAL_STEPS)))
    ap.add_argument("--pipeline", default=None, help="testbed pipeline folder to attack (default: the shipped one)")
    ap.add_argument("--words", action="store_true", help="only ask the base for each whole look in words (see words())")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    if a.words:
        words(a.out, a.pipeline, a.device, n=2 if a.smoke else 16)
        return 0
    eval_steps = tuple(int(x) for x in a.eval_steps.split(","))
    concepts = a.concepts.split(",")[:1] if a.smoke else a.concepts.split(",")
    cfgs = grid(a.smoke, a.methods.split(","), tuple(float(x) for x in a.lrs.split(",") if x),
                tuple(int(x) for x in a.batches.split(",")), tuple(x == "1" for x in a.priors.split(",")),
                max(eval_steps))
    tasks = [(cfg, c) for cfg in cfgs for c in concepts]
    if a.workers == 1:
        worker(0, 1, eval_steps, tasks, a.out, a.device, mp.Lock(), a.pipeline)
        return 0
    ctx = mp.get_context("spawn")
    lock = ctx.Lock()
    procs = [ctx.Process(target=worker, args=(r, a.workers, eval_steps, tasks, a.out, a.device, lock, a.pipeline), daemon=True)
             for r in range(a.workers)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
