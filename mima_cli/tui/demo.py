"""Synthetic runs for trying ``mima tui`` (and for its tests): no model, no GPU, only run directories.

    python -m mima_cli.tui.demo runs-demo --steps 300 --delay 0.2 &
    mima tui runs-demo

writes, step by step, the events the engine writes (see :mod:`engine.runs`):

* an immunize run (``inner_loss/<concept>``, ``outer_loss``, ``prior_loss``, ``merge_residual``,
  ``grad_norm``, ``step_seconds``, ``peak_memory_mb``, images ``samples/<concept>``);
* a LoRA attack on the immunized model and the same attack on the unimmunized model, linked as twins
  (``loss/<concept>``, images ``eval/<concept>``, metrics ``clip/<concept>`` as evaluations land);
* an evaluation run with the ``msgr/<metric>`` and ``mrsgr/<metric>`` summary.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

from engine.runs import RunWriter

CONCEPTS = ("Van Gogh", "Picasso")
EVAL_SEEDS = (0, 1, 2)
PALETTES = {"Van Gogh": ((30, 60, 160), (240, 200, 40)), "Picasso": ((170, 60, 40), (90, 150, 190))}


def concept_image(concept: str, clarity: float, seed: int, size: int = 64):
    """A procedural stand-in for a sample: stripes in the concept's colours, blended with noise.

    ``clarity`` 1 is the clean concept, 0 pure noise (what an immunized model should produce)."""
    from PIL import Image

    rng = random.Random(f"{concept}-{seed}")
    a, b = PALETTES.get(concept, ((200, 200, 200), (60, 60, 60)))
    image = Image.new("RGB", (size, size))
    pixels = []
    for y in range(size):
        for x in range(size):
            wave = 0.5 + 0.5 * math.sin((x + 2 * y) / 5 + (3 if concept == "Picasso" else 0) * (x // 16))
            clean = tuple(int(a[c] * wave + b[c] * (1 - wave)) for c in range(3))
            noise = tuple(rng.randrange(256) for _ in range(3))
            pixels.append(tuple(int(clarity * clean[c] + (1 - clarity) * noise[c]) for c in range(3)))
    image.putdata(pixels)
    return image


def hstack(images):
    from PIL import Image

    strip = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)))
    x = 0
    for im in images:
        strip.paste(im, (x, 0))
        x += im.width
    return strip


class Demo:
    """Four linked runs under ``runs_dir``, advanced by :meth:`step`.

    ``ids`` fixes the run ids (tests); ``sample_every`` / ``eval_every`` are in steps."""

    def __init__(
        self,
        runs_dir: str | Path,
        steps: int = 200,
        *,
        concepts: tuple[str, ...] = CONCEPTS,
        sample_every: int = 20,
        eval_every: int = 50,
        ids: dict[str, str] | None = None,
        seed: int = 0,
    ) -> None:
        ids = ids or {}
        self.steps = steps
        self.concepts = concepts
        self.sample_every = sample_every
        self.eval_every = eval_every
        self.rng = random.Random(seed)
        common = dict(profile_name="testbed", group="g2-1", concepts=list(concepts))
        self.immunize = RunWriter(runs_dir, "immunize", method="mima", run_id=ids.get("immunize"), **common)
        self.base_attack = RunWriter(
            runs_dir, "attack", method="lora", run_id=ids.get("base_attack"), phase="attack/lora",
            extra={"model": "unimmunized"}, **common,
        )
        self.attack = RunWriter(
            runs_dir, "attack", method="lora", run_id=ids.get("attack"), phase="attack/lora",
            parent=self.immunize.id, twin=self.base_attack.id, extra={"model": "immunized"}, **common,
        )
        self.evaluate = RunWriter(
            runs_dir, "evaluate", method="clip", run_id=ids.get("evaluate"), phase="eval",
            parent=self.attack.id, **common,
        )
        self.writers = (self.immunize, self.attack, self.base_attack, self.evaluate)
        self.immunize.log_status(f"immunizing {', '.join(concepts)} with mima for {steps} steps")
        self.attack.log_status("LoRA attack on the immunized model")
        self.base_attack.log_status("LoRA attack on the unimmunized model")
        self.evaluate.log_status("waiting for attack checkpoints")
        self.done = 0

    def noise(self, scale: float = 0.03) -> float:
        return self.rng.gauss(0, scale)

    def step(self, step: int) -> None:
        """Write step ``step`` (1-based) of every run."""
        frac = step / self.steps
        imm = self.immunize
        for i, concept in enumerate(self.concepts):
            imm.log_scalar(f"inner_loss/{concept}", 0.3 + 0.5 * math.exp(-4 * frac) + 0.05 * i + self.noise(), step)
        imm.log_scalar("outer_loss", 1.0 - 0.6 * (1 - math.exp(-3 * frac)) + self.noise(), step)
        imm.log_scalar("prior_loss", 0.05 + 0.02 * frac + self.noise(0.005), step)
        imm.log_scalar("merge_residual", 1e-4 * math.exp(-5 * frac), step)
        imm.log_scalar("grad_norm", 2.0 * math.exp(-2 * frac) + abs(self.noise(0.2)), step)
        imm.log_scalar("step_seconds", 0.8 + abs(self.noise(0.05)), step)
        imm.log_scalar("peak_memory_mb", 10240.0 + 20 * (step % 7), step)
        for run, immunized in ((self.attack, True), (self.base_attack, False)):
            for i, concept in enumerate(self.concepts):
                floor = 0.55 if immunized else 0.12
                loss = floor + 0.4 * math.exp(-5 * frac) + 0.03 * i + self.noise()
                run.log_scalar(f"loss/{concept}", loss, step, concept=concept, attack="lora")
        if step % self.sample_every == 0 or step == self.steps:
            for concept in self.concepts:
                # like the engine: immunize samples are one strip of SAMPLE_SEEDS images, attack
                # evaluations one image per seed (tag `seed`)
                strip = [concept_image(concept, max(0.0, 1 - 1.2 * frac), step * 10 + s) for s in range(4)]
                imm.log_image(f"samples/{concept}", step, hstack(strip), concept=concept)
                for seed in EVAL_SEEDS:
                    tags = dict(concept=concept, attack="lora", seed=seed)
                    self.attack.log_image(f"eval/{concept}", step, concept_image(concept, 0.15 * frac, seed), **tags)
                    self.base_attack.log_image(f"eval/{concept}", step, concept_image(concept, min(1.0, 1.5 * frac), seed), **tags)
        if step % self.eval_every == 0 or step == self.steps:
            self.evaluate.log_status(f"evaluating attack checkpoints at step {step}")
            for concept in self.concepts:
                for run, score in ((self.attack, 0.18 + 0.02 * frac), (self.base_attack, 0.2 + 0.12 * frac)):
                    run.log_metric(f"clip/{concept}", round(score + self.noise(0.005), 4), step, concept=concept, metric="clip")
            imm_score = 0.18 + 0.02 * frac
            base_score = 0.2 + 0.12 * frac
            self.evaluate.log_metric("msgr/clip", round((imm_score - 0.18) / (base_score - 0.18), 4), step, metric="clip", group="g2-1")
            self.evaluate.log_metric("mrsgr/clip", round(imm_score / base_score, 4), step, metric="clip", group="g2-1")
        for run in self.writers:
            run.progress(step, self.steps)
        if step % 50 == 0:
            imm.log_status(f"step {step}: outer loss {1.0 - 0.6 * (1 - math.exp(-3 * frac)):.3f}")
        self.done = step

    def finish(self) -> None:
        for run in self.writers:
            if run.state == "running":
                run.finish()
            run.close()

    def run(self, delay: float = 0.0) -> None:
        try:
            for step in range(self.done + 1, self.steps + 1):
                self.step(step)
                if delay:
                    time.sleep(delay)
        except KeyboardInterrupt:
            for run in self.writers:
                run.interrupt()
                run.close()
            raise
        self.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mima_cli.tui.demo", description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", type=Path, help="where to write the runs (created if missing)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--delay", type=float, default=0.2, help="seconds between steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        Demo(args.runs_dir, args.steps, seed=args.seed).run(args.delay)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
