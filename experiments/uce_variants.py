"""UCE variants on one testbed group: what the erased model still draws of each concept (judge accuracy, 8 images per
prompt, the utility seeds).

    python experiments/uce_variants.py --profile testbed-relearn --group g3-2

Variants: the shipped edit (``uce_edit`` with the profile's ``[erase]``), larger ``erase_scale``, smaller ``lamb``, an
``artwork`` target, preserved rows through EOS only (no padding rows), and the erasure as hard constraints with the
preserved rows as the regulariser (the merge's form: ``projector(erased, preserved, ridge)``).
"""

from __future__ import annotations

import argparse
import json

import torch

from engine.editing import aligned_rows, projector, uce_edit
from engine.models import kv_layer_names
from engine.profile import load_profile
from engine.sampling import generate
from engine.testbed import load_judge, load_pipeline, world
from engine.testbed.judge.model import accuracy


def _rows(pipe, erase, preserve, erase_padding, preserve_padding, target=""):
    te, tok = pipe.text_encoder, pipe.tokenizer
    pairs = [aligned_rows(te, tok, q, target, erase_padding) for q in erase]
    ce, ct = torch.cat([a for a, _ in pairs]).double(), torch.cat([b for _, b in pairs]).double()
    cp = torch.cat([aligned_rows(te, tok, q, q, preserve_padding)[0].double() for q in preserve])
    shared = torch.cdist(ce, cp).min(dim=1).values <= 1e-6 * float(torch.cat([ce, cp]).abs().max())
    return ce[~shared], ct[~shared], cp


@torch.no_grad()
def _solve(pipe, proj, targets_of):
    params = dict(pipe.unet.named_parameters())
    for name in kv_layer_names(pipe.unet):
        w = params[name]
        w64 = w.detach().double()
        w.copy_(proj.solve(w64, targets_of(w64)).to(w.dtype))


def eos_only(pipe, erase, preserve, lamb=0.0):
    """Erased rows through the padding, preserved rows only through EOS."""
    ce, ct, cp = _rows(pipe, erase, preserve, True, False)
    _solve(pipe, projector(torch.cat([ce, cp]), None, 0.0, lamb), lambda w: torch.cat([ct @ w.T, cp @ w.T]))


def hard(pipe, erase, preserve, ridge=0.01):
    """Erased rows as exact constraints; the preserved rows only regularise the change."""
    ce, ct, cp = _rows(pipe, erase, preserve, True, True)
    _solve(pipe, projector(ce, cp, ridge), lambda w: ct @ w.T)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="testbed-relearn")
    ap.add_argument("--group", default="g3-2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    profile = load_profile(args.profile)
    targets = profile.group(args.group).target_names
    prompts = {s: world.style_prompt(s) for s in world.STYLES} | {o: world.object_prompt(o) for o in world.OBJECTS}
    erase = [prompts[t] for t in targets]
    preserve = [q for k, q in prompts.items() if k not in targets]
    e = profile.erase
    shipped = dict(target=e.target, lamb=e.lamb, erase_scale=e.erase_scale, preserve_scale=e.preserve_scale,
                   padding=e.padding)
    variants = {
        "shipped": lambda p: uce_edit(p.unet, p.text_encoder, p.tokenizer, erase, preserve, **shipped),
        "erase_scale 4": lambda p: uce_edit(p.unet, p.text_encoder, p.tokenizer, erase, preserve,
                                            **(shipped | {"erase_scale": 4.0})),
        "erase_scale 16": lambda p: uce_edit(p.unet, p.text_encoder, p.tokenizer, erase, preserve,
                                             **(shipped | {"erase_scale": 16.0})),
        "lamb 0.01": lambda p: uce_edit(p.unet, p.text_encoder, p.tokenizer, erase, preserve,
                                        **(shipped | {"lamb": 0.01})),
        "target artwork": lambda p: uce_edit(p.unet, p.text_encoder, p.tokenizer, erase, preserve,
                                             **(shipped | {"target": "artwork"})),
        "preserve through EOS": lambda p: eos_only(p, erase, preserve),
        "hard, ridge 0.01": lambda p: hard(p, erase, preserve),
    }
    judge = load_judge()
    for label, edit in variants.items():
        pipe = load_pipeline()
        pipe.set_progress_bar_config(disable=True)
        edit(pipe)
        acc = {k: accuracy(judge, generate(pipe, q, range(30000, 30008), 20, 4.0), k) for k, q in prompts.items()}
        others = {k: v for k, v in acc.items() if k not in targets}
        worst = min(others, key=others.get)
        print(json.dumps({"variant": label, "targets": {t: acc[t] for t in targets},
                          "others_mean": round(sum(others.values()) / len(others), 3),
                          "worst_other": [worst, others[worst]]}), flush=True)


if __name__ == "__main__":
    main()
