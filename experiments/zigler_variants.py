"""Candidate drawings of the testbed style ``zigler`` (issue #3: the UNet drew the earlier gentle zigzag bands as
wavell's waves; zigler was the worst concept, 0.44-0.50). On 2026-12-04 both were built on an H200 (5.4k of 8k UNet
steps each, beside each other): zigler 1.00 with ``chevron``, 0.56 with ``lines``; ``chevron`` is now the shipped
drawing (``world._style_field``), so ``build chevron`` builds the shipped world.

``python experiments/zigler_variants.py sheet OUT.png`` renders wavell, the shipped zigler and every variant side by
side; ``python experiments/zigler_variants.py build VARIANT OUT [--device cuda] [--stages a,b] [--set KEY=VALUE ...]
[--check]`` runs the stages of a testbed build (``engine.testbed.train.build_testbed``; default all) with the variant
drawn in place of the shipped zigler; ``check VARIANT OUT`` (or ``--check``) writes ``OUT/check.json``
(``mima testbed check``'s gates on that build's pipeline and judge) and ``OUT/grid.png``.

On a GPU the judge stage is bound by rendering on the CPU (about 200 s on an H200), so
``experiments/gpu_testbed.sh`` builds everything else on the GPU and the judge stage can run on a CPU
(``build VARIANT OUT --stages judge``, 7-11 min on 2 cores) before ``check``.

- ``chevron``: two-colour bands displaced by a steep, sharp zigzag (slope 1.4, corners every 12-16 px, band period
  26-32 px along the bands' axis, 15-19 px across them), so the zigzag is a coarse feature, not a corner detail;
- ``lines``: zigzag lines about 5 px wide on a plain ground (period 16-22 px, slope 1.2): a line pattern, where wavell
  draws equal bands.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from engine.testbed import world

SHIPPED_FIELD = world._style_field


def _zigzag(v: np.ndarray, seg: float, slope: float) -> np.ndarray:
    return np.abs(((v / seg) % 2) - 1) * seg * slope


def zigler_field(variant: str, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    x, y = world._grid()
    amp = rng.uniform(0.8, 2.8)
    x = x + amp * world._smooth_noise(rng, 4)
    y = y + amp * world._smooth_noise(rng, 4)
    angle = rng.uniform(0, math.pi)
    u, v = world._rot(x, y, angle)
    if variant == "chevron":
        period, seg = rng.uniform(26, 32), rng.uniform(12, 16)
        f = np.sin(2 * math.pi * (u + _zigzag(v, seg, 1.4)) / period)
        return world._edge(f * period / (2 * math.pi)), 2
    if variant == "lines":
        period, seg = rng.uniform(16, 22), rng.uniform(12, 16)
        slope = 1.2
        w = 2.5 * math.sqrt(1 + slope**2)  # half width along u of a line 5 px wide across
        d = np.abs(((u + _zigzag(v, seg, slope)) % period) - period / 2)
        return world._edge(w - d), 2
    raise KeyError(variant)


VARIANTS = ("chevron", "lines")


def use_variant(variant: str) -> None:
    """Draw ``zigler`` as ``variant`` from now on in this process (``world.render`` and everything built on it)."""

    def field(style: str, rng: np.random.Generator):
        return zigler_field(variant, rng) if style == "zigler" else SHIPPED_FIELD(style, rng)

    world._style_field = field


def sheet(out: str, n: int = 8) -> None:
    from PIL import Image

    rows = [("wavell", None), ("zigler", None), *(("zigler", v) for v in VARIANTS)]
    tiles = []
    for style, variant in rows:
        world._style_field = SHIPPED_FIELD
        if variant:
            use_variant(variant)
        tiles.append(np.concatenate(list(world.concept_images(style, n, seed=0)), axis=1))
    world._style_field = SHIPPED_FIELD
    Image.fromarray(np.concatenate(tiles, axis=0)).resize((64 * n * 2, 64 * len(rows) * 2), Image.NEAREST).save(out)


def build(variant: str, out: str, device: str, overrides: list[str], tiny: bool = False,
          stages: tuple[str, ...] | None = None) -> dict:
    """Run (or resume) ``stages`` of a testbed build (default: all) with ``variant`` drawn for zigler."""
    from engine.testbed.build import DEFAULT, TINY
    from engine.testbed.train import STAGES, build_testbed

    use_variant(variant)
    cfg = (TINY if tiny else DEFAULT).with_overrides(overrides)
    last = [0.0]

    def progress(stage, step, total, info):
        if time.time() - last[0] > 20 or step == total:
            last[0] = time.time()
            print(f"[{variant}] {stage} {step}/{total} {info}", flush=True)

    return build_testbed(out, cfg, seed=0, progress=progress, device=device, stages=stages or STAGES)


def check(variant: str, out: str, device: str, n: int) -> dict:
    """``mima testbed check``'s gates on the build in ``out`` (its pipeline and judge): ``out/check.json``, and the
    concept grid ``out/grid.png``."""
    import torch

    from engine.testbed import load_pipeline
    from engine.testbed.check import check_testbed
    from engine.testbed.grid import concept_grid
    from engine.testbed.judge import load_judge_file

    use_variant(variant)
    pipe = load_pipeline(Path(out) / "pipeline", device=device)
    judge = load_judge_file(Path(out) / "judge.safetensors", device=device)
    with torch.no_grad():
        result = check_testbed(pipe, judge, n=n)
    timings = Path(out, "timings.json")
    result.update(variant=variant, device=device, timings_s=json.loads(timings.read_text()) if timings.exists() else {})
    Path(out, "check.json").write_text(json.dumps(result, indent=1))
    concept_grid(pipe).save(Path(out) / "grid.png")
    print(json.dumps({k: result[k] for k in ("variant", "generation_accuracy", "min_concept_accuracy",
                                             "judge_accuracy", "per_concept", "timings_s")}), flush=True)
    return result


def unpack(tar: str, text: str, out: str) -> None:
    """A device build (``experiments/gpu_testbed.sh``'s ``build_VARIANT.tar`` and ``text_VARIANT.safetensors``) into
    ``out``, with the tokenizer written anew (it is the same for every build of one configuration)."""
    import shutil
    import tarfile
    import tempfile

    from engine.testbed.build import TestbedConfig, make_tokenizer

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar) as t:
        t.extractall(out_dir, filter="data")
    shutil.copy(text, out_dir / "pipeline" / "text_encoder" / "model.safetensors")
    cfg = TestbedConfig(**{k: v for k, v in json.loads((out_dir / "config.json").read_text()).items()})
    with tempfile.TemporaryDirectory() as tmp:
        make_tokenizer(cfg, tmp).save_pretrained(out_dir / "pipeline" / "tokenizer")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sheet")
    s.add_argument("out")
    b = sub.add_parser("build")
    b.add_argument("variant", choices=VARIANTS)
    b.add_argument("out")
    b.add_argument("--device", default="cpu")
    b.add_argument("--set", dest="overrides", action="append", default=[])
    b.add_argument("--tiny", action="store_true", help="the tests' tiny configuration (a smoke run)")
    b.add_argument("--stages", default="", help="comma-separated build stages (default: all)")
    b.add_argument("--check", action="store_true", help="then check the build (needs its judge)")
    b.add_argument("--check-n", type=int, default=16, help="generations per concept of the check")
    c = sub.add_parser("check")
    c.add_argument("variant", choices=VARIANTS)
    c.add_argument("out")
    c.add_argument("--device", default="cpu")
    c.add_argument("--check-n", type=int, default=16)
    u = sub.add_parser("unpack")
    u.add_argument("tar")
    u.add_argument("text")
    u.add_argument("out")
    a = p.parse_args(argv)
    if a.cmd == "unpack":
        unpack(a.tar, a.text, a.out)
        return 0
    if a.cmd == "sheet":
        sheet(a.out)
        return 0
    if a.cmd == "build":
        build(a.variant, a.out, a.device, a.overrides, a.tiny, tuple(x for x in a.stages.split(",") if x) or None)
    if a.cmd == "check" or a.check:
        check(a.variant, a.out, a.device, a.check_n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
