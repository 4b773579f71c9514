"""Efficacy of UCE erasure on the testbed: judge accuracy on generations of the erased and the other concepts.

    python benchmarks/testbed_erase.py [--profile testbed] [--group g3-1] [--n 16]

Erases the group's targets (a new erase run under --runs-dir), then generates n images per style and object prompt
with the base and the erased model (fixed seeds, the profile's sampler settings) and prints one JSON line per
concept: {"concept", "erased", "base_acc", "erased_acc"}, then a summary line. Numbers are testbed numbers.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="testbed")
    ap.add_argument("--group", default=None)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--runs-dir", default=None)
    args = ap.parse_args()

    from engine.erase import erase
    from engine.models import load_pipeline
    from engine.profile import load_profile
    from engine.sampling import generate
    from engine.testbed import load_judge
    from engine.testbed.check import concept_prompts
    from engine.testbed.judge import accuracy

    profile = load_profile(args.profile)
    group = args.group or next(iter(profile.groups))
    runs = args.runs_dir or tempfile.mkdtemp(prefix="mima-erase-")
    run_dir = erase(profile, runs_dir=runs, group=group, profile_name=args.profile, device="cpu")
    erased = {c.name for c in profile.erase_targets(group)}
    judge = load_judge()
    base, edited = load_pipeline(profile.model.base), load_pipeline(run_dir)
    seeds = range(7000, 7000 + args.n)
    steps, guidance = profile.model.sample_steps, profile.model.guidance
    rows = []
    for concept, _head, prompt in concept_prompts():
        row = {"concept": concept, "erased": concept in erased,
               "base_acc": accuracy(judge, generate(base, prompt, seeds, steps, guidance), concept),
               "erased_acc": accuracy(judge, generate(edited, prompt, seeds, steps, guidance), concept)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    tgt = [r["erased_acc"] for r in rows if r["erased"]]
    oth = [r["erased_acc"] for r in rows if not r["erased"]]
    print(json.dumps({"summary": "testbed UCE erase", "group": group, "run": str(run_dir),
                      "max_erased_acc": max(tgt), "min_other_acc": min(oth),
                      "mean_other_acc": sum(oth) / len(oth), "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
