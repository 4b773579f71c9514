"""Shared, built-once runs for the attack / evaluate / report tests (not a test module).

One session builds, on the tiny random pipeline: a UCE erase run of group g2, a mima and a jt immunization from it,
then ``mima attack --run <mima>`` and ``mima attack --run <jt>`` (the second reuses the cached unimmunized attack).
The testbed judge's shipped weights may not exist: an *untrained* Judge saved to a file stands in
(``eval.judge_weights``): its numbers are arbitrary but, given by a file, it counts as trained.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from typer.testing import CliRunner

from conftest import TINY_PROFILE, concept_block

_BUILT: dict = {}


def invoke(*args):
    from mima_cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def write_profile(folder: Path, base: Path) -> tuple[Path, Path]:
    """A copy of the tiny profile whose [eval] uses an untrained judge saved to a file."""
    from engine.testbed.judge import Judge, save_judge

    judge = folder / "judge.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_judge(Judge(), judge)
    concepts = "".join(concept_block(n) for n in ("strieker", "checkov", "ringo", "cellini"))
    text = TINY_PROFILE.format(base=base, concepts=concepts)
    text = text.replace('metrics = ["judge", "judge-acc"]', f'metrics = ["judge", "judge-acc"]\njudge_weights = "{judge}"')
    profile = folder / "tiny.toml"
    profile.write_text(text)
    return profile, judge


def attacked_runs(tmp_path_factory, tiny_pipeline_dir) -> dict:
    """Build the runs once per session (see the module docstring); returns paths, ids and the CLI outputs."""
    if _BUILT:
        return _BUILT
    from engine.immunize.runner import immunize
    from engine.profile import load_profile
    from engine.runs import list_runs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("attacked")
        profile_path, judge = write_profile(root, tiny_pipeline_dir)
        runs = root / "runs"
        p = load_profile(profile_path)
        mima = immunize(p, runs_dir=runs, group="g2", method="mima", profile_name="tiny")
        jt = immunize(p, runs_dir=runs, group="g2", method="jt", profile_name="tiny")
        first = invoke("--runs-dir", runs, "attack", "--run", mima.name)
        assert first.exit_code == 0, first.output
        second = invoke("--runs-dir", runs, "attack", "--run", jt.name, "--method", "lora")
        assert second.exit_code == 0, second.output
        (erase,) = [r["id"] for r in list_runs(runs) if r["kind"] == "erase"]
        _BUILT.update(root=root, runs=runs, profile=profile_path, judge=judge, mima=mima.name, jt=jt.name,
                      erase=erase, outputs=(first.output, second.output))
    finally:
        torch.set_num_threads(threads)
    return _BUILT


def copy_runs(built: dict, dest: Path) -> Path:
    """A private copy of the built runs directory (for tests that add runs)."""
    target = dest / "runs"
    shutil.copytree(built["runs"], target)
    return target


def attack_runs(runs: Path) -> list[dict]:
    from engine.runs import list_runs

    return [r for r in list_runs(runs) if r.get("kind") == "attack"]
