"""Utility without attack (engine.metrics.utility): the shipped testbed draws its world, a wrecked UNet is reported
collapsed, every immunization measures it, and the report, the TUI and ``mima evaluate --utility`` read it from the
run directories alone."""

from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attack_helpers import attack_runs, copy_runs, invoke
from engine.metrics.utility import (Utility, UtilityPrompt, heldout_captions, log_utility, measure_utility,
                                    read_utility, score_images, utility_backends, utility_prompts)
from engine.profile import load_profile
from engine.runs import RunWriter, read_status

pytestmark = pytest.mark.usefixtures("one_thread")


def made_utility(others: float, parent_others: float = 1.0, threshold: float = 0.8) -> Utility:
    """A utility measurement of two prompts (a target and an other) with the given judge accuracies."""
    prompts = [UtilityPrompt("strieker", "an artwork of strieker", "target", "strieker"),
               UtilityPrompt("ringo", "an artwork of ringo", "other", "ringo")]
    scores = {"model": {"strieker": {"judge-acc": 0.0}, "ringo": {"judge-acc": others}},
              "parent": {"strieker": {"judge-acc": 0.5}, "ringo": {"judge-acc": parent_others}},
              "base": {"strieker": {"judge-acc": 1.0}, "ringo": {"judge-acc": 1.0}}}
    return Utility(["judge-acc"], "judge-acc", threshold, prompts, scores, images=2)


def test_shipped_testbed_draws_every_concept_of_its_world(tmp_path):
    from engine.models import load_pipeline

    profile = load_profile("testbed", ["utility.captions=0", "utility.images=16"])  # a concept's accuracy to 1/16
    group = profile.group("g3-1")
    prompts = utility_prompts(profile, group.target_names, group.other_names)
    assert len(prompts) == 16 and {p.role for p in prompts} == {"target", "other"}  # the 8 styles and 8 objects
    base = load_pipeline("testbed")
    source = (lambda: base, "testbed")
    u = measure_utility(profile, prompts, model=source, parent=source, base=source,
                        backends=utility_backends(profile), cache_dir=tmp_path)
    scores = {p.name: u.concept_score("model", p.name) for p in prompts}
    # measured at these seeds (30000-30015): every concept 1.00 but strieker 0.81 (13 of 16), heart and tree 0.94
    assert min(scores.values()) >= 0.75 and sum(scores.values()) / len(scores) >= 0.95, scores
    assert sum(v >= 0.9 for v in scores.values()) >= 15, scores
    for p in prompts:
        assert u.concept_score("model", p.name, "judge") == pytest.approx(1.0)  # fidelity to itself
    assert u.share == pytest.approx(1.0) and not u.collapsed


def test_a_wrecked_unet_is_reported_collapsed(tmp_path):
    from engine.models import load_pipeline

    profile = load_profile("testbed", ["utility.captions=0", "utility.images=4", "utility.world=false"])
    prompts = utility_prompts(profile, ["strieker"], ["pointelle", "wavell", "hatcher"])
    base = load_pipeline("testbed")
    wrecked = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in wrecked.unet.parameters():  # every weight replaced by noise of its own scale
            p.copy_(torch.randn(p.shape, generator=gen) * p.std().nan_to_num(0.02))
    u = measure_utility(profile, prompts, model=(lambda: wrecked, "wrecked"), parent=(lambda: base, "testbed"),
                        base=(lambda: base, "testbed"), backends=utility_backends(profile), cache_dir=tmp_path)
    assert u.role_mean("parent", "other") >= 0.9
    assert u.role_mean("model", "other") < 0.5 and u.share < 0.8 and u.collapsed
    assert u.role_mean("model", "other", "judge") < 0.9  # far from the parent's same-seed images
    assert "COLLAPSED" in u.describe()


def test_prompts_and_held_out_captions(tiny_profile):
    profile = load_profile(tiny_profile, ["utility.captions=5"])
    prompts = utility_prompts(profile, ["strieker"], ["checkov", "ringo"])
    assert [(p.name, p.role) for p in prompts[:3]] == [("strieker", "target"), ("checkov", "other"), ("ringo", "other")]
    captions = [p for p in prompts if p.role == "caption"]
    assert len(captions) == 5 and all(p.concept is None for p in captions)
    merge = set(profile.regularization_captions())
    assert not merge & {p.prompt for p in captions}  # held out: none of the merge regulariser's captions
    assert heldout_captions(profile) == [p.prompt for p in captions]  # seeded
    world = utility_prompts(load_profile(tiny_profile, ["utility.world=true", "utility.captions=0"]), ["strieker"], [])
    assert {p.name for p in world} >= {"star", "fish", "zigler"}  # the testbed world's concepts on request


def test_clip_score_and_fidelity_scores():
    from engine.metrics import get_backend

    clip = get_backend("clip", random_init=True)
    lpips = get_backend("lpips", random_init=True)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    y = rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    prompts = [UtilityPrompt("cat", "a photo of a cat", "other", "cat")]
    scores = score_images({"cat": x}, {"cat": y}, prompts, {"clip": clip, "lpips": lpips})["cat"]
    expected = float((clip.features(x) @ clip.text_features(["a photo of a cat"])[0]).mean())
    assert scores["clip"] == pytest.approx(expected, abs=1e-6)
    # fidelity pairs image i with the parent's image i only
    assert scores["lpips"] == pytest.approx(float(1 - lpips.pairwise(x, y).diagonal().mean()), abs=1e-6)
    assert score_images({"cat": x}, {"cat": x}, prompts, {"lpips": lpips})["cat"]["lpips"] == pytest.approx(1.0, abs=1e-5)


def test_collapse_threshold_and_round_trip():
    assert made_utility(0.79).collapsed and not made_utility(0.8).collapsed
    assert made_utility(0.4, parent_others=0.5).share == pytest.approx(0.8)
    u = made_utility(0.1)
    back = Utility.from_dict(json.loads(json.dumps(u.to_dict())))
    assert back.share == u.share and back.collapsed and back.role_mean("parent", "target") == 0.5


def test_the_worst_other_concept_is_named():
    u = made_utility(0.9)
    u.prompts.append(UtilityPrompt("arrow", "a photo of a arrow", "other", "arrow"))
    u.scores["model"]["arrow"] = {"judge-acc": 0.5}
    assert u.role_mean("model", "other") == pytest.approx(0.7)
    assert u.role_worst("model", "other") == ("arrow", 0.5)
    assert u.role_worst("model", "target") == ("strieker", 0.0)
    assert u.role_worst("model", "caption") is None


def test_every_immunization_measures_utility(built):
    runs = {r["id"]: r for r in attack_runs(built["runs"])}
    assert runs  # the built fixture attacked two immunized models
    st = read_status(Path(built["runs"]) / built["mima"])
    assert set(st["extra"]["utility"]) == {"primary", "threshold", "share", "collapsed", "roles"}
    u = read_utility(Path(built["runs"]) / built["mima"])
    assert u is not None and u.primary == "judge-acc" and u.images == 2
    roles = [(p.name, p.role) for p in u.prompts]
    assert roles[:4] == [("strieker", "target"), ("checkov", "target"), ("ringo", "other"), ("cellini", "other")]
    assert [r for _, r in roles].count("caption") == 1
    assert u.concept_score("parent", "ringo", "judge") == pytest.approx(1.0)  # the parent against itself
    assert u.parent != u.base  # the erased model, not the base
    events = [json.loads(line) for line in (Path(built["runs"]) / built["mima"] / "events.jsonl").open()]
    assert any(e.get("phase") == "utility" and e["name"] == "utility/judge-acc/ringo" for e in events)


def _inject(run_dir: Path, u: Utility) -> None:
    with RunWriter(run_dir.parent, "immunize", run_id=run_dir.name, resume=True) as w:
        log_utility(w, u)


def test_collapse_mark_in_every_report_output(built, tmp_path):
    runs = copy_runs(built, tmp_path)
    _inject(Path(runs) / built["jt"], made_utility(0.1))  # jt's model draws a tenth of what its parent drew
    _inject(Path(runs) / built["mima"], made_utility(0.9))
    res = invoke("--runs-dir", runs, "report", "--no-chart")
    assert res.exit_code == 0, res.output
    text = " ".join(res.stdout.split())
    assert "Utility without attack (judge-acc: targets / others)" in text
    assert "0.00 / 0.10 †" in text and "collapsed: without any attack" in text
    assert "collapsed (no longer draws the other concepts, without attack): tiny: jt (g2)" in " ".join(res.stderr.split())
    md = invoke("--runs-dir", runs, "report", "--markdown").stdout
    assert "| jt | 0.00 / 0.10 † | 0.00 / 0.10 † |" in md and "| mima | 0.00 / 0.90 | 0.00 / 0.90 |" in md
    assert any(line.startswith("| jt | judge |") and "†" in line for line in md.splitlines())
    assert not any(line.startswith("| mima | judge |") and "†" in line for line in md.splitlines())
    rows = list(csv.DictReader(io.StringIO(invoke("--runs-dir", runs, "report", "--csv").stdout)))
    collapsed = {(r["table"], r["method"]) for r in rows if r["collapsed"] == "True"}
    assert ("utility", "jt") in collapsed and ("msgr", "jt") in collapsed and ("mrsgr", "jt") in collapsed
    assert not any(m == "mima" for _, m in collapsed)
    out = json.loads(invoke("--runs-dir", runs, "report", "--json").stdout)
    assert out["collapsed"] == ["tiny: jt (g2)"]
    msgr = next(t for t in out["tables"] if t["kind"] == "msgr")
    assert {r["method"]: r["cells"]["g2"]["collapsed"] for r in msgr["rows"]} == {"mima": False, "jt": True}
    (utility,) = out["utility"]
    assert [r["model"] for r in utility["rows"]] == ["base", "parent", "mima", "jt"]


def test_learnability_is_the_others_attack_success(built):
    out = json.loads(invoke("--runs-dir", built["runs"], "report", "--json").stdout)
    learn = next(t for t in out["tables"] if t["kind"] == "learn")
    for row in learn["rows"]:
        pair = next(p for p in out["pairs"] if p["method"] == row["method"])
        events = [json.loads(line) for line in (Path(built["runs"]).glob(f"{pair['run']}/events.jsonl")).__next__().open()]
        acc_t = [e["value"] for e in events if e.get("name", "").startswith("sim/judge-acc/") and e["step"] == 2
                 and e["tags"]["role"] == "other" and e["tags"]["pair"] == "T"]
        assert len(acc_t) == 2 and row["cells"]["g2"]["value"] == pytest.approx(sum(acc_t) / 2)


def test_evaluate_utility_of_a_run_and_of_a_folder(built, tmp_path, tiny_pipeline_dir):
    runs = copy_runs(built, tmp_path)
    res = invoke("--runs-dir", runs, "evaluate", "--utility", built["jt"], "--json",
                 "--set", "utility.collapse_share=1.0")
    assert res.exit_code == 0, res.output
    (one,) = json.loads(res.stdout)
    own = read_utility(Path(runs) / built["jt"])
    assert one["utility"]["scores"] == own.to_dict()["scores"]  # same images, same numbers
    assert one["utility"]["threshold"] == 1.0
    st = read_status(Path(runs) / one["run"])
    assert (st["kind"], st["method"], st["extra"]["model_run"]) == ("evaluate", "utility", built["jt"])
    report = json.loads(invoke("--runs-dir", runs, "report", "--json").stdout)
    jt = next(p for p in report["pairs"] if p["method"] == "jt")
    assert jt["utility"]["threshold"] == 1.0  # the report prefers the newer evaluate run
    profile_path = built["profile"]
    res = invoke("--runs-dir", runs, "evaluate", "--utility", str(tiny_pipeline_dir), "--profile", profile_path,
                 "--group", "g2", "--json")
    assert res.exit_code == 0, res.output
    (folder,) = json.loads(res.stdout)
    scores = folder["utility"]["scores"]
    assert scores["model"] == scores["parent"]  # the folder is the profile's base: its own parent
    assert [p["name"] for p in folder["utility"]["prompts"] if p["role"] == "target"] == ["strieker", "checkov"]
    res = invoke("--runs-dir", runs, "evaluate", "--utility", next(iter(r["id"] for r in attack_runs(runs))))
    assert res.exit_code == 2 and res.stderr.strip().startswith("error: ") and "erase or immunization run" in res.stderr
