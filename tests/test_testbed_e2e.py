"""End to end on the shipped testbed through the CLI: erase, immunize, attack both twins, report (2-step runs)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from engine.testbed import JUDGE_FILE, PIPELINE_DIR
from mima_cli.app import app

pytestmark = pytest.mark.skipif(
    not (PIPELINE_DIR / "model_index.json").exists() or not JUDGE_FILE.exists(),
    reason="the trained testbed is not in the package yet (build it: mima testbed build --install)",
)

runner = CliRunner()
QUICK = ["--set", "immunize.steps=2", "--set", "immunize.sample_every=2", "--set", "attack.steps=2",
         "--set", "attack.eval_every=2", "--set", "attack.eval_images=2", "--set", "eval.steps=[2]",
         "--set", "model.sample_steps=4"]


def test_reproduce_quick_on_the_testbed(tmp_path):
    # two worker processes: the unimmunized attack is split between them and assembled from the cache
    res = runner.invoke(app, ["--runs-dir", str(tmp_path), "reproduce", "--profile", "testbed", "--quick",
                              "--methods", "mima", "--jobs", "2", *QUICK], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "mima" in res.output and "MSGR" in res.output
    out = runner.invoke(app, ["--runs-dir", str(tmp_path), "report", "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    text = json.dumps(report)
    assert "judge" in text and "mima" in text
    pairs = {p["method"]: p for p in report["pairs"]}
    assert set(pairs) == {"mima", "none"}
    assert pairs["mima"]["twin"] == pairs["none"]["twin"]  # one unimmunized run, compared with both
    # the control re-attacks the unimmunized model in another process: the same images, so no gap at all
    assert pairs["none"]["msgr"]["judge"] == 0.0
    assert pairs["mima"]["msgr"]["judge"] is not None and pairs["mima"]["msgr"]["judge"] != 0.0
    # a second call finds every run finished and runs nothing
    again = runner.invoke(app, ["--runs-dir", str(tmp_path), "reproduce", "--profile", "testbed", "--quick",
                                "--methods", "mima", *QUICK], catch_exceptions=False)
    assert again.exit_code == 0 and "0 step(s) run" in again.output
