"""``mima sweep``: settings grids, one JSON line per setting and method, the plot, and resuming."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from attack_helpers import invoke
from engine.sweep import Point, settings_grid, split_values

pytestmark = pytest.mark.usefixtures("one_thread")


def test_settings_grid_is_every_combination_in_order():
    assert split_values('1e-3, [1, 2],"a,b"') == ["1e-3", "[1, 2]", '"a,b"']
    grid = settings_grid(["immunize.outer_lr=1e-3,1e-4", "immunize.ascent=\"loss\",\"capped\""])
    assert grid == [{"immunize.outer_lr": "1e-3", "immunize.ascent": '"loss"'},
                    {"immunize.outer_lr": "1e-3", "immunize.ascent": '"capped"'},
                    {"immunize.outer_lr": "1e-4", "immunize.ascent": '"loss"'},
                    {"immunize.outer_lr": "1e-4", "immunize.ascent": '"capped"'}]
    assert settings_grid([]) == [{}]
    with pytest.raises(ValueError, match="expected key=value1"):
        settings_grid(["outer_lr"])


def test_sweep_writes_points_and_a_plot_and_resumes(tiny_profile, tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "s" / "sweep.jsonl"
    args = ["--runs-dir", runs, "sweep", "--profile", tiny_profile, "-m", "mima", "-g", "g2", "--jobs", "1",
            "--set", "immunize.outer_lr=1e-3,1e-1", "--fix", "utility.captions=0", "--out", out]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(p["setting"], p["method"], p["group"]) for p in lines] == [
        ({"immunize.outer_lr": "1e-3"}, "mima", "g2"), ({"immunize.outer_lr": "1e-1"}, "mima", "g2")]
    for p in lines:
        assert set(p) == set(Point({}, "", None).__dict__)
        assert p["others"] is not None and p["parent_others"] is not None and p["targets_attacked"] is not None
        assert p["others_min"] <= p["others"] and p["others_worst"] not in ("strieker", "checkov")  # g2's targets
        assert p["twin_attacked"] is not None and "judge" in p["msgr"]
    assert lines[0]["immunize_run"] != lines[1]["immunize_run"]
    assert lines[0]["twin_attacked"] == lines[1]["twin_attacked"]  # one unimmunized twin for every setting
    with Image.open(out.with_suffix(".png")) as im:
        assert im.format == "PNG" and im.width > 400
    before = sorted(p.name for p in runs.iterdir())
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in runs.iterdir()) == before  # resumed: nothing re-run
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines


def test_sweep_bad_input_is_one_line(tiny_profile, tmp_path):
    res = invoke("--runs-dir", tmp_path, "sweep", "--profile", tiny_profile, "--set", "immunize.outer_lr=abc")
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    res = invoke("--runs-dir", tmp_path, "sweep", "--profile", tiny_profile, "-g", "g9")
    assert res.exit_code == 2 and "g9" in res.stderr
