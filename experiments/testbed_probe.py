"""Probe a testbed build in progress: does the UNet follow the prompt yet?

    python experiments/testbed_probe.py --build testbed-build [--ema] [--n 4] [--png probe.png]

Loads ``<build>/unet.ckpt`` (raw or EMA weights) with the build's VAE and judge, generates n images per style and
object prompt (fixed seeds, pinned sampler), and prints one JSON line per concept with the judge's accuracy, then
how much the noise prediction depends on the prompt at a few timesteps (relative difference to the empty prompt).
A model that has not learnt the conditioning draws the same image for every prompt of a seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="testbed-build")
    ap.add_argument("--ema", action="store_true")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--png", default=None)
    args = ap.parse_args()

    from engine.diffusion import tokenize
    from engine.sampling import generate
    from engine.testbed import GUIDANCE, SAMPLE_STEPS, train, world
    from engine.testbed.build import DEFAULT, assemble_pipeline, make_text_encoder, make_tokenizer, make_unet
    from engine.testbed.judge import accuracy, load_judge_file

    out = Path(args.build)
    cfg_json = json.loads((out / "config.json").read_text())
    cfg = type(DEFAULT)(**{**cfg_json, **{k: tuple(v) for k, v in cfg_json.items() if isinstance(v, list)}})
    ck = train._load(out / "unet.ckpt")
    unet, text = make_unet(cfg), make_text_encoder(cfg)
    unet.load_state_dict(ck["unet"])
    text.load_state_dict(ck["text"])
    if args.ema:
        with torch.no_grad():
            for p, s in zip([*unet.parameters(), *text.parameters()], ck["ema"]):
                p.copy_(s)
    vae = train._trained_vae(out, cfg)
    vae.register_to_config(scaling_factor=float(train._load(out / "latents.pt")["scaling_factor"]))
    tok = make_tokenizer(cfg, out / "tokenizer")
    pipe = assemble_pipeline(unet.eval(), vae, text.eval(), tok)
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge_file(out / "judge.safetensors")
    rows, accs = [], {}
    prompts = [*((s, world.style_prompt(s)) for s in world.STYLES), *((o, world.object_prompt(o)) for o in world.OBJECTS)]
    for concept, prompt in prompts:
        imgs = generate(pipe, prompt, range(1000, 1000 + args.n), SAMPLE_STEPS, GUIDANCE)
        accs[concept] = accuracy(judge, imgs, concept)
        rows.append(np.concatenate(list(imgs), axis=1))
        print(json.dumps({"step": int(ck["step"]), "ema": args.ema, "concept": concept, "judge_acc": accs[concept]}))
    with torch.no_grad():
        ps = [p for _, p in prompts] + [""]
        ctx = text(tokenize(tok, ps))[0]
        x = torch.randn(1, 4, cfg.latent_size, cfg.latent_size, generator=torch.Generator().manual_seed(0))
        dep = {}
        for t in (900, 500, 100):
            e = unet(x.expand(len(ps), -1, -1, -1), torch.full((len(ps),), t), ctx).sample
            dep[t] = float(((e[:-1] - e[-1:]).flatten(1).norm(dim=1) / e[-1].norm()).mean())
    print(json.dumps({"step": int(ck["step"]), "ema": args.ema, "generation_accuracy": float(np.mean(list(accs.values()))),
                      "eps_prompt_dependence": dep}))
    if args.png:
        from PIL import Image

        Image.fromarray(np.concatenate(rows, axis=0)).save(args.png)


if __name__ == "__main__":
    main()
