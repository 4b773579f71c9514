"""``mima attack`` end to end on the tiny pipeline: twin runs and their links, the cached unimmunized attack, evaluation
images with the same seeds on both sides, live metric events, the control (``none``) pair, one-line errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from attack_helpers import attack_runs, copy_runs, invoke
from engine.runs import eval_steps, load_eval_images
from engine.runs import RunReader, read_status

STEPS = [0, 1, 2]  # eval_at_start + eval_every = 1 over 2 attack steps
CONCEPTS = ["strieker", "checkov", "ringo", "cellini"]  # g2's targets, then two others


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _pairs(built):
    runs = attack_runs(built["runs"])
    imm = {r["extra"]["immunize_method"]: r for r in runs if r["extra"]["immunized"]}
    twins = [r for r in runs if not r["extra"]["immunized"]]
    return imm, twins


def test_two_linked_runs_and_the_cached_twin(built):
    imm, twins = _pairs(built)
    assert set(imm) == {"mima", "jt"}
    (twin,) = twins  # jt reused the unimmunized attack made for mima: same model, data, seeds, settings
    assert "(cached)" in built["outputs"][1] and "(cached)" not in built["outputs"][0]
    for method in ("mima", "jt"):
        run = imm[method]
        assert run["kind"] == "attack" and run["method"] == "lora" and run["state"] == "finished"
        assert run["parent"] == built[method] and run["twin"] == twin["id"]
        assert run["extra"]["immunize_run"] == built[method] and run["extra"]["attack"] == "lora"
        assert run["concepts"] == CONCEPTS and run["extra"]["targets"] == CONCEPTS[:2]
        assert run["extra"]["done"] == CONCEPTS
    assert twin["parent"] == built["erase"] and twin["extra"]["immunized"] is False
    assert twin["twin"] == imm["jt"]["id"]  # the newest run compared with it ...
    assert twin["extra"]["twins"] == [imm["mima"]["id"], imm["jt"]["id"]]  # ... and all of them
    assert twin["extra"]["immunize_runs"] == [built["mima"], built["jt"]]
    # the twin attacked the model the immunization started from; the immunized side the immunized model
    imm_status = read_status(built["runs"] / built["mima"])
    assert twin["base_model_hash"] == imm_status["base_model_hash"]
    assert imm["mima"]["base_model_hash"] != twin["base_model_hash"]
    assert set(twin["extra"]["cache_keys"]) == set(CONCEPTS)


def test_eval_images_at_every_step_with_identical_seeds(built):
    imm, (twin,) = _pairs(built)
    for run in (imm["mima"], imm["jt"]):
        for c in CONCEPTS:
            assert eval_steps(run["dir"], c) == STEPS == eval_steps(twin["dir"], c)
            for step in STEPS:
                t, a = load_eval_images(run["dir"], c, step), load_eval_images(twin["dir"], c, step)
                assert t.seeds == a.seeds == [90000, 90001] and t.prompt == a.prompt == f"an artwork of {c}"
                assert t.images.shape == a.images.shape == (2, 64, 64, 3)
        images = [e for e in RunReader(run["dir"]).events("image") if e["name"] == "eval/strieker"]
        assert sorted((e["step"], e["tags"]["seed"]) for e in images) == [(s, k) for s in STEPS for k in (90000, 90001)]
    # the same seeds from different weights give different images (the immunized model changed)
    a = load_eval_images(twin["dir"], "strieker", 2).images
    t = load_eval_images(imm["mima"]["dir"], "strieker", 2).images
    assert not np.array_equal(a, t)


def test_attacks_train_on_the_attack_images(built):
    from engine.image_sets import load_image_set
    from engine.profile import load_profile

    imm, (twin,) = _pairs(built)
    profile = load_profile(built["profile"])
    from engine.attacks.cache import image_digest as _digest

    for c in CONCEPTS:
        concept = profile.concept(c)
        attack = load_image_set(concept.images.attack, prompt=concept.prompt, size=64, concept=c)
        immunize = load_image_set(concept.images.immunize, prompt=concept.prompt, size=64, concept=c)
        for run in (imm["mima"], twin):
            data = run["extra"]["data"][c]
            assert data == {"set": "images.attack", "digest": _digest(attack)} and data["digest"] != _digest(immunize)


def test_metric_events_at_every_eval_step(built):
    from engine.metrics import get_backends
    from engine.metrics.gaps import msgr_images, mrsgr_images

    imm, (twin,) = _pairs(built)
    run = imm["mima"]
    events = RunReader(run["dir"]).events("metric")
    names = {(e["name"], e["step"]) for e in events}
    for step in STEPS:
        for name in ("msgr/judge", "msgr/judge-acc", "mrsgr/judge", "mrsgr/judge-acc", "success/judge-acc"):
            assert (name, step) in names, (name, step)
        for c in CONCEPTS:
            assert (f"sim/judge/{c}", step) in names
    msgr = [e for e in events if e["name"] == "msgr/judge"]
    assert [e["step"] for e in msgr] == STEPS
    assert all(e["tags"] == {"attack": "lora", "group": "g2", "metric": "judge", "step": e["step"]} for e in msgr)
    sims = [e for e in events if e["name"] == "sim/judge/strieker" and e["step"] == 2]
    assert sorted(e["tags"]["pair"] for e in sims) == ["I-A", "r-A", "r-T"]
    # the logged MSGR / MRSGR are the ones recomputed from the kept arrays
    from engine.image_sets import load_references
    from engine.profile import load_profile

    profile = load_profile(built["profile"])
    backends = get_backends(profile.eval)
    refs = load_references(profile, CONCEPTS[:2], 64, built["runs"])
    x_a = {c: load_eval_images(twin["dir"], c, 2).images for c in CONCEPTS}
    x_t = {c: load_eval_images(run["dir"], c, 2).images for c in CONCEPTS}
    want = msgr_images(backends["judge"], refs, x_a, x_t, CONCEPTS[:2]).value
    assert msgr[-1]["value"] == pytest.approx(want, rel=1e-9, abs=1e-12)
    want_r = mrsgr_images(backends["judge"], x_a, x_t, CONCEPTS[:2], CONCEPTS[2:]).value
    (mrsgr,) = [e for e in events if e["name"] == "mrsgr/judge" and e["step"] == 2]
    assert mrsgr["value"] == pytest.approx(want_r, rel=1e-9, abs=1e-12)
    # identical seeds, identical data: the two immunized-side runs of jt and mima share x^A exactly
    jt_events = RunReader(imm["jt"]["dir"]).events("metric")
    success = {e["step"]: e["value"] for e in events if e["name"] == "success/judge-acc"}
    assert success == {e["step"]: e["value"] for e in jt_events if e["name"] == "success/judge-acc"}


def test_cache_key_depends_on_every_input():
    from engine.attacks.cache import cache_key
    from engine.attacks import default_settings

    s = default_settings("lora", steps=2)
    img = np.zeros((2, 8, 8, 3), np.uint8)
    kw = dict(seed=0, eval_seeds=[1, 2], prompt="p", eval_prompt="p", images=img, sample_steps=2, guidance=2.0,
              dtype="float32", device="cpu")
    k = cache_key("h", s, "c", **kw)
    assert k == cache_key("h", s, "c", **kw)
    changed = [cache_key("h2", s, "c", **kw), cache_key("h", replace(s, steps=3), "c", **kw),
               cache_key("h", s, "d", **kw), cache_key("h", s, "c", **{**kw, "seed": 1}),
               cache_key("h", s, "c", **{**kw, "images": img + 1}), cache_key("h", s, "c", **{**kw, "eval_seeds": [1]})]
    assert len({k, *changed}) == 1 + len(changed)


def test_control_pair_is_the_none_row_with_msgr_zero(built, tmp_path):
    runs = copy_runs(built, tmp_path)
    res = invoke("--runs-dir", runs, "attack", "--run", built["mima"], "--control")
    assert res.exit_code == 0, res.output
    (control,) = [r for r in attack_runs(runs) if r["extra"].get("control")]
    (twin,) = [r for r in attack_runs(runs) if not r["extra"]["immunized"] and not r["extra"].get("control")]
    assert control["extra"]["immunize_method"] == "none" and control["parent"] == built["erase"]
    assert control["twin"] == twin["id"] and read_status(runs / twin["id"])["twin"] == control["id"]
    # an independent re-run (not the cache) with the same seeds: the same images on the CPU, so MSGR is 0
    for c in CONCEPTS:
        np.testing.assert_array_equal(load_eval_images(control["dir"], c, 2).images,
                                      load_eval_images(twin["dir"], c, 2).images)
    msgr = [e for e in RunReader(control["dir"]).events("metric") if e["name"] == "msgr/judge"]
    assert [e["value"] for e in msgr] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("args, code, message", [
    (["--method", "lorra"], 2, "unknown attack 'lorra'; did you mean 'lora'?"),
    (["--run", "erase"], 2, "is not an immunization run"),
    (["--run", "nope-nothing"], 2, "no run matches 'nope-nothing'"),
    (["--set", 'concepts.0.images.attack={folder = "/nonexistent/imgs"}'], 2, "concepts.0.images.attack (concept 'strieker'): folder '/nonexistent/imgs' does not exist"),
    (["--set", "attack.nope=1"], 2, "unknown key 'nope'"),
])
def test_bad_input_is_one_line(built, args, code, message):
    before = len(attack_runs(built["runs"]))
    res = invoke("--runs-dir", built["runs"], "attack", *args)
    assert res.exit_code == code, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.stderr
    assert len(attack_runs(built["runs"])) == before  # nothing was started


def test_no_immunization_run_is_one_line(tmp_path):
    res = invoke("--runs-dir", tmp_path, "attack")
    assert res.exit_code == 2 and "no finished immunization run" in res.output and "Traceback" not in res.output


def test_ctrl_c_keeps_finished_concepts_and_the_next_attack_reuses_them(built, tmp_path, monkeypatch):
    import engine.attacks as attacks
    from engine.attacks.pairs import attack

    runs = copy_runs(built, tmp_path)
    real, calls = attacks.run_attack, []

    def interrupted_at_the_third(job, *args, **kwargs):
        calls.append(job.concept)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(job, *args, **kwargs)

    monkeypatch.setattr(attacks, "run_attack", interrupted_at_the_third)
    with pytest.raises(KeyboardInterrupt):  # other settings (1 step): nothing cached yet
        attack(runs, run=built["mima"], steps=1, live_eval=False)
    (partial,) = [r for r in attack_runs(runs) if r["extra"]["settings"]["steps"] == 1]
    assert partial["state"] == "interrupted" and partial["extra"]["done"] == CONCEPTS[:2]
    assert eval_steps(partial["dir"], "strieker") == [0, 1]

    calls.clear()
    monkeypatch.setattr(attacks, "run_attack", lambda job, *a, **k: calls.append(job.concept) or real(job, *a, **k))
    (res,) = attack(runs, run=built["mima"], steps=1, live_eval=False)
    assert res.reused == {c: partial["id"] for c in CONCEPTS[:2]} and not res.twin_reused
    assert calls == CONCEPTS[2:] + CONCEPTS  # the twin's missing concepts, then the immunized model's four
    twin = read_status(res.twin)
    assert twin["state"] == "finished" and twin["extra"]["done"] == CONCEPTS and twin["twin"] == res.run.name
    np.testing.assert_array_equal(load_eval_images(res.twin, "checkov", 1).images,
                                  load_eval_images(partial["dir"], "checkov", 1).images)


def test_twin_parts_are_interleaved_slices_of_the_concepts(built, tmp_path):
    from engine.attacks.pairs import attack, plan_attack

    runs = copy_runs(built, tmp_path)
    whole = plan_attack(runs, run=built["mima"]).concepts
    n = len(whole)
    slices = [plan_attack(runs, run=built["mima"], twin_only=True, part=(i, 2)).concepts for i in (1, 2)]
    assert slices == [whole[0::2], whole[1::2]]
    before = len(attack_runs(runs))
    # more parts than concepts: the last slice is empty, and attacking it writes no run
    assert plan_attack(runs, run=built["mima"], twin_only=True, part=(n + 1, n + 1)).concepts == []
    assert attack(runs, run=built["mima"], twin_only=True, part=(n + 1, n + 1), live_eval=False) == []
    assert len(attack_runs(runs)) == before
    with pytest.raises(ValueError, match="only with twin_only"):
        plan_attack(runs, run=built["mima"], part=(1, 2))


def test_save_weights_never_leaves_the_cached_twin_without_weights(built, tmp_path):
    """The twin of the built runs was attacked without --save-weights: with it, the cache does not serve that twin
    (it holds no weights) but attacks the unimmunized model again, saving both sides, and says so; a later
    --save-weights attack then reuses the twin that kept its weights."""
    from engine.runs import weights_dir

    runs = copy_runs(built, tmp_path)
    _, (old_twin,) = _pairs(built)
    res = invoke("--runs-dir", runs, "attack", "--run", built["jt"], "--method", "lora", "--save-weights", "--no-eval")
    assert res.exit_code == 0, res.output
    assert f"the cached unimmunized attack {old_twin['id']} kept no weights" in res.output and "(cached)" not in res.output
    new = [r for r in attack_runs(runs) if r["id"] not in {a["id"] for a in attack_runs(built["runs"])}]
    (twin,) = [r for r in new if not r["extra"]["immunized"]]
    (imm,) = [r for r in new if r["extra"]["immunized"]]
    assert imm["twin"] == twin["id"]
    for run in (twin, imm):
        for c in CONCEPTS:
            assert (weights_dir(run["dir"], c) / "mima_attack.json").exists(), (run["id"], c)
    again = invoke("--runs-dir", runs, "attack", "--run", built["mima"], "--method", "lora", "--save-weights",
                   "--no-eval")
    assert again.exit_code == 0, again.output
    assert f"twin {twin['id']} (cached)" in again.output and "kept no weights" not in again.output


def test_steps_option_counts_before_the_profile_is_checked(built, tmp_path):
    """``--steps N`` with ``--set eval.steps=[N]`` beyond the profile's attack steps: the evaluation step is checked
    against N, not refused against the profile's steps."""
    runs = copy_runs(built, tmp_path)
    res = invoke("--runs-dir", runs, "attack", "--run", built["mima"], "--steps", "4", "--set", "attack.eval_every=4",
                 "--set", "eval.steps=[4]")
    assert res.exit_code == 0, res.output
    new = [r for r in attack_runs(runs) if r["id"] not in {x["id"] for x in attack_runs(built["runs"])}]
    assert new
    for r in new:
        msgr = [e["step"] for e in RunReader(r["dir"]).events("metric") if e["name"] == "msgr/judge"]
        assert msgr == [] if not r["extra"]["immunized"] else msgr == [0, 4]
