"""``mima evaluate``: recompute the metrics of finished attack pairs into an evaluate run; refuse random-init
backbones; one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attack_helpers import attack_runs, copy_runs, invoke
from engine.runs import RunReader, list_runs


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _immunized(runs, method):
    (run,) = [r for r in attack_runs(runs) if r["extra"].get("immunized") and r["extra"]["immunize_method"] == method]
    return run


def _values(run_dir, name, attack_run=None):
    out = {}
    for e in RunReader(run_dir).events("metric"):
        if e["name"] == name and (e.get("tags") or {}).get("attack_run") == attack_run:
            out[e["step"]] = e["value"]
    return out


def test_evaluate_recomputes_into_a_linked_run(built, tmp_path):
    runs = copy_runs(built, tmp_path)
    mima = _immunized(runs, "mima")
    res = invoke("--runs-dir", runs, "evaluate", built["mima"], "--metrics", "judge", "--json")  # an immunize run
    assert res.exit_code == 0, res.output
    (ev,) = [r for r in list_runs(runs) if r["kind"] == "evaluate"]
    assert ev["state"] == "finished" and ev["parent"] == mima["id"] and ev["twin"] == mima["twin"]
    assert ev["extra"]["attack_runs"] == [mima["id"]] and ev["extra"]["metrics"] == ["judge"]
    # the same judge on the same arrays: the recomputed numbers are the live ones, at every step
    for name in ("msgr/judge", "mrsgr/judge"):
        recomputed = _values(ev["dir"], name, attack_run=mima["id"])
        assert recomputed == pytest.approx(_values(mima["dir"], name)) and sorted(recomputed) == [0, 1, 2]
    assert not _values(ev["dir"], "msgr/judge-acc", attack_run=mima["id"])  # only the metrics asked for
    out = json.loads(res.stdout)
    assert out["run"] == ev["id"] and out["pairs"][0]["run"] == mima["id"]
    assert out["pairs"][0]["msgr"]["judge"] == pytest.approx(_values(ev["dir"], "msgr/judge", mima["id"])[2])


def test_evaluate_one_step_of_a_twin_run(built, tmp_path):
    runs = copy_runs(built, tmp_path)
    twin = _immunized(runs, "mima")["twin"]
    res = invoke("--runs-dir", runs, "evaluate", twin, "--metrics", "judge-acc", "--step", "2")
    assert res.exit_code == 0, res.output
    (ev,) = [r for r in list_runs(runs) if r["kind"] == "evaluate"]
    assert len(ev["extra"]["attack_runs"]) == 2  # every run compared with the shared unimmunized attack
    steps = {e["step"] for e in RunReader(ev["dir"]).events("metric")}
    assert steps == {2}


def test_random_init_backbones_are_refused(built, tmp_path):
    from engine.metrics.evaluate import evaluate
    from engine.metrics.pairs import PairEvaluator
    from engine.metrics import get_backend

    runs = copy_runs(built, tmp_path)
    random_judge = {"judge": get_backend("judge", random_init=True)}
    with pytest.raises(ValueError, match="randomly initialised"):
        evaluate(runs, [built["mima"]], backends=random_judge)
    with pytest.raises(ValueError, match="randomly initialised"):
        PairEvaluator(random_judge, ["a"], [], None, lambda c, s: None, lambda e: None, {})
    assert not [r for r in list_runs(runs) if r["kind"] == "evaluate"]


@pytest.mark.parametrize("args, message", [
    (["erase"], "is a 'erase' run; expected an attack, immunization or evaluate run"),
    (["nope-nothing"], "no run matches 'nope-nothing'"),
    (["latest", "--metrics", "clip,dinoo"], "unknown metric 'dinoo'; did you mean 'dino'?"),
])
def test_bad_input_is_one_line(built, args, message):
    res = invoke("--runs-dir", built["runs"], "evaluate", *args)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.stderr


def test_pair_reader_refuses_different_seeds(tmp_path):
    from engine.metrics.pairs import EvaluationError, pair_images_reader
    from engine.runs import save_eval_images

    img = np.zeros((2, 8, 8, 3), np.uint8)
    save_eval_images(tmp_path / "t", "c", 1, img, [1, 2], "p")
    save_eval_images(tmp_path / "a", "c", 1, img, [1, 3], "p")
    read = pair_images_reader(tmp_path / "t", tmp_path / "a")
    assert read("c", 2) is None  # not there (yet)
    with pytest.raises(EvaluationError, match="differ in seeds or prompt"):
        read("c", 1)


def test_missing_judge_weights_turn_live_evaluation_off_and_evaluate_fills_in(built, tmp_path):
    runs = copy_runs(built, tmp_path)
    before = _immunized(runs, "jt")
    res = invoke("--runs-dir", runs, "attack", "--run", built["jt"], "--set", "eval.judge_weights=/nonexistent/j.safetensors")
    assert res.exit_code == 0, res.output
    assert "warning: live evaluation off: testbed judge weights not found" in " ".join(res.stderr.split())
    (new,) = [r for r in attack_runs(runs) if r["extra"].get("immunize_method") == "jt" and r["id"] != before["id"]]
    assert new["twin"] == before["twin"] and not RunReader(new["dir"]).events("metric")
    pair = lambda: next(p for p in json.loads(invoke("--runs-dir", runs, "report", "--json").stdout)["pairs"]  # noqa: E731
                        if p["method"] == "jt")
    assert pair()["run"] == new["id"] and pair()["msgr"] == {}  # the newest pair, not evaluated yet
    res = invoke("--runs-dir", runs, "evaluate", new["id"], "--set", f"eval.judge_weights={built['judge']}")
    assert res.exit_code == 0, res.output
    # the same attack on the same model with the same seeds (deterministic on the CPU): the first run's numbers
    got = pair()
    assert got["msgr"]["judge"] == pytest.approx(_values(before["dir"], "msgr/judge")[2], abs=1e-9)
    assert got["sources"] == [r["id"] for r in list_runs(runs) if r["kind"] == "evaluate"]
