"""``mima report``: tables laid out like the paper's, the same numbers as the logged metric events in every format,
the grid, random-init refusal, and the table arithmetic on hand-made pairs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from attack_helpers import attack_runs, copy_runs, invoke
from engine.report import PairSummary, build_report
from engine.runs import RunReader


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _last_events(run_dir):
    """{(name, step): value} of the run's own metric events (the last of each)."""
    return {(e["name"], e["step"]): e["value"] for e in RunReader(run_dir).events("metric")}


def test_json_numbers_are_the_logged_events(built):
    res = invoke("--runs-dir", built["runs"], "report", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    runs = {r["id"]: r for r in attack_runs(built["runs"])}
    assert {p["method"] for p in out["pairs"]} == {"mima", "jt"}
    for p in out["pairs"]:
        events = _last_events(runs[p["run"]]["dir"])
        assert p["step"] == 2 and p["attack"] == "lora" and p["group"] == "g2"
        for m in ("judge", "judge-acc"):
            assert p["msgr"][m] == events[(f"msgr/{m}", 2)]
            assert p["mrsgr"][m] == events[(f"mrsgr/{m}", 2)]
        assert p["success"]["judge-acc"] == events[("success/judge-acc", 2)]
    msgr, mrsgr, immune, learn = out["tables"]
    assert immune["kind"] == "immune" and [(r["method"], r["metric"]) for r in immune["rows"]] == [
        ("mima", "judge-acc"), ("jt", "judge-acc")]
    assert (msgr["kind"], mrsgr["kind"], msgr["family"], msgr["groups"]) == ("msgr", "mrsgr", "re-learning", ["g2"])
    assert learn["kind"] == "learn" and [(r["method"], r["metric"]) for r in learn["rows"]] == [
        ("mima", "judge-acc"), ("jt", "judge-acc")]
    by_pair = {p["method"]: p for p in out["pairs"]}
    assert [(r["method"], r["metric"]) for r in msgr["rows"]] == [
        ("mima", "judge"), ("mima", "judge-acc"), ("jt", "judge"), ("jt", "judge-acc")]
    for r in msgr["rows"]:
        cell = r["cells"]["g2"]
        assert cell["value"] == by_pair[r["method"]]["msgr"][r["metric"]]
        assert cell["success"] == by_pair[r["method"]]["success"]["judge-acc"]
        assert r["average"]["value"] == cell["value"]  # one group
    for r in mrsgr["rows"]:
        assert r["cells"]["g2"]["value"] == by_pair[r["method"]]["mrsgr"][r["metric"]]
    # curves: mean over targets of the logged similarities, at every step
    (curve,) = [c for c in out["curves"] if c["method"] == "mima" and c["metric"] == "judge"]
    assert curve["steps"] == [0, 1, 2] and None not in curve["x^A"] + curve["x^T"]
    # an earlier step on request
    early = json.loads(invoke("--runs-dir", built["runs"], "report", "--json", "--step", "1").stdout)
    for p in early["pairs"]:
        assert p["step"] == 1 and p["msgr"]["judge"] == _last_events(runs[p["run"]]["dir"])[("msgr/judge", 1)]


def test_rich_tables_csv_and_markdown(built):
    res = invoke("--runs-dir", built["runs"], "report")
    assert res.exit_code == 0, res.output
    text = res.stdout
    for piece in ("MSGR (%) — tiny — re-learning (lora)", "MRSGR (%)", "g2 (2)", "average", "mima", "jt", "judge-acc",
                  "x^A (unimmunized)", "attack step"):
        assert piece in text, piece
    rows = list(csv.DictReader(io.StringIO(invoke("--runs-dir", built["runs"], "report", "--csv").stdout)))
    # (msgr, mrsgr) x (2 methods x 2 metrics) x (g2, average) + (immune, learn) x (2 methods x judge-acc) x 2
    # + utility (base, parent, mima, jt) x 2
    assert len(rows) == 2 * 4 * 2 + 2 * 2 * 2 + 4 * 2
    assert {r["table"] for r in rows} == {"msgr", "mrsgr", "immune", "learn", "utility"}
    js = json.loads(invoke("--runs-dir", built["runs"], "report", "--json").stdout)
    cell = js["tables"][0]["rows"][0]["cells"]["g2"]
    (row,) = [r for r in rows if (r["table"], r["method"], r["metric"], r["group"]) == ("msgr", "mima", "judge", "g2")]
    assert float(row["value"]) == cell["value"]
    md = invoke("--runs-dir", built["runs"], "report", "--markdown").stdout
    assert "### MSGR (%) — tiny — re-learning (lora)" in md and "| method | metric | g2 (2) | average |" in md
    assert invoke("--runs-dir", built["runs"], "report", "--json", "--csv").exit_code == 2


def test_markdown_into_a_file_keeps_the_text_above_the_generated_line(built, tmp_path):
    from mima_cli.report import GENERATED

    md = invoke("--runs-dir", built["runs"], "report", "--markdown").stdout
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nHow these were made.\n")
    for _ in range(2):  # the second run replaces the tables the first one wrote
        res = invoke("--runs-dir", built["runs"], "report", "--markdown", "--into", doc)
        assert res.exit_code == 0, res.output
        assert doc.read_text() == "# Results\n\nHow these were made.\n\n" + GENERATED + "\n\n" + md.rstrip("\n") + "\n"
    assert invoke("--runs-dir", built["runs"], "report", "--into", doc).exit_code == 2


def test_grid_png(built, tmp_path):
    out = tmp_path / "grid.png"
    res = invoke("--runs-dir", built["runs"], "report", "--no-chart", "--grid", out)
    assert res.exit_code == 0, res.output
    with Image.open(out) as im:
        # 2 pairs x 2 targets rows of 96 px images (+ labels); 3 sets x 2 images per row
        assert im.format == "PNG" and im.width == 3 * 2 * 96 + 12 and im.height == 16 + 4 * (14 + 96)


def test_random_init_events_are_refused(built, tmp_path):
    runs = copy_runs(built, tmp_path)
    mima = next(r for r in attack_runs(runs) if r["extra"].get("immunize_method") == "mima" and r["extra"]["immunized"])
    real = _last_events(mima["dir"])[("msgr/judge", 2)]
    with (Path(mima["dir"]) / "events.jsonl").open("a") as f:  # a later number from a random-init backbone
        f.write(json.dumps({"t": 1e12, "run": mima["id"], "phase": "eval", "step": 2, "kind": "metric",
                            "name": "msgr/judge", "value": 99.0,
                            "tags": {"metric": "judge", "attack": "lora", "group": "g2", "random_init": True}}) + "\n")
    res = invoke("--runs-dir", runs, "report", "--json")
    out = json.loads(res.stdout)
    pair = next(p for p in out["pairs"] if p["run"] == mima["id"])
    assert pair["msgr"]["judge"] == real and out["refused"] == [f"{mima['id']}: judge"]
    assert "randomly initialised backbone refused" in res.stderr


def test_control_pair_is_the_none_row(built, tmp_path):
    runs = copy_runs(built, tmp_path)
    assert invoke("--runs-dir", runs, "attack", "--run", built["mima"], "--control").exit_code == 0
    out = json.loads(invoke("--runs-dir", runs, "report", "--json").stdout)
    rows = {(r["method"], r["metric"]): r for r in out["tables"][0]["rows"]}
    assert [m for m, _ in rows][::2] == ["mima", "jt", "none"]
    assert rows[("none", "judge")]["cells"]["g2"]["value"] == 0.0  # the same attack twice, same seeds: no gap
    assert rows[("none", "judge")]["cells"]["g2"]["success"] == rows[("mima", "judge")]["cells"]["g2"]["success"]


def test_empty_and_bad_refs_are_one_line(tmp_path, built):
    res = invoke("--runs-dir", tmp_path, "report")
    assert res.exit_code == 2 and res.stderr.strip().startswith("error: no finished attack pairs")
    res = invoke("--runs-dir", built["runs"], "report", "erase")
    assert res.exit_code == 2 and "expected an attack, immunization or evaluate run" in res.stderr


# -------------------------------------------------------------------------------- table arithmetic, no runs


def _pair(run, method, attack, group, size, msgr, success=None, step=40, profile="personal"):
    p = PairSummary(run=run, twin="t-" + run, run_dir=Path(run), twin_dir=Path("t"), profile=profile, group=group,
                    group_size=size, method=method, attack=attack, state="finished", immunize_run=None,
                    targets=["a"], others=[])
    p.msgr[step] = {"clip": {"value": msgr, "note": None, "source": run}}
    p.mrsgr[step] = {"clip": {"value": msgr / 2 if msgr is not None else None, "note": None, "source": run}}
    if success is not None:
        p.success[step] = {"judge-acc": success}
    return p


def test_personalization_is_averaged_over_attacks_and_groups_ordered_by_size():
    pairs = [
        _pair("1", "mima", "dreambooth", "g3-1", 3, 30.0, 0.8), _pair("2", "mima", "textual-inversion", "g3-1", 3, 10.0, 0.6),
        _pair("3", "mima", "dreambooth", "g2-1", 2, 50.0, 1.0), _pair("4", "mima", "custom-diffusion", "g2-1", 2, None, 0.5),
        _pair("5", "jt", "dreambooth", "g2-1", 2, 5.0), _pair("6", "mima", "lora", "g2-1", 2, 12.0, profile="styles"),
    ]
    report = build_report(pairs)
    titles = [t.title for t in report.tables]
    assert titles[0].startswith("MSGR (%) — personal — personalization (mean of 3 attacks: dreambooth, "
                                "textual-inversion, custom-diffusion)")
    assert titles[2] == "MSGR (%) — styles — re-learning (lora)"
    t = report.tables[0]
    assert t.groups == ["g2-1", "g3-1"]  # 2-concept groups first
    mima = next(r for r in t.rows if r.method == "mima")
    assert mima.cells["g3-1"].value == 20.0 and mima.cells["g3-1"].success == pytest.approx(0.7)
    assert mima.cells["g2-1"].value is None and mima.cells["g2-1"].attacks == ["dreambooth", "custom-diffusion"]
    assert mima.average.value == 20.0 and mima.average.note == "mean of 1 of 2 groups (the others are undefined)"
    jt = next(r for r in t.rows if r.method == "jt")
    assert list(jt.cells) == ["g2-1"] and jt.cells["g2-1"].value == 5.0 and jt.cells["g2-1"].success is None
    mrsgr = report.tables[1]
    assert mrsgr.kind == "mrsgr" and next(r for r in mrsgr.rows if r.method == "mima").cells["g3-1"].value == 10.0


def _attacked(run, group, target_acc, twin_acc, step=80):
    p = _pair(run, "mima", "lora", group, 2, 50.0, twin_acc, step=step, profile="styles")
    p.targets = ["a", "b"]
    p.msgr[step]["judge-acc"] = {"value": 50.0, "note": None, "source": run}
    p.sims["judge-acc"] = {"T": {step: {"a": target_acc[0], "b": target_acc[1]}},
                           "A": {step: {"a": twin_acc, "b": twin_acc}}}
    return p


def test_immunity_table_averages_the_groups_the_attack_teaches_the_twin():
    """The targets' accuracy after the attack, beside the twin's; a group whose twin the attack does not teach (0.5 <
    0.70) is shown but left out of the average, since a low accuracy there says nothing about immunity."""
    report = build_report([_attacked("1", "g2-1", (0.0, 0.5), 1.0), _attacked("2", "g2-2", (0.25, 0.25), 0.75),
                           _attacked("3", "g2-3", (1.0, 1.0), 0.5)])
    (immune,) = [t for t in report.tables if t.kind == "immune"]
    assert immune.title == "Immunity: the targets' accuracy after the attack, immunized (unimmunized twin) — styles — re-learning (lora)"
    (row,) = immune.rows
    assert row.metric == "judge-acc"
    assert (row.cells["g2-1"].value, row.cells["g2-1"].success) == (0.25, 1.0)
    assert (row.cells["g2-3"].value, row.cells["g2-3"].success) == (1.0, 0.5)
    assert row.average.value == pytest.approx(0.25) and row.average.success == pytest.approx(0.875)
    assert row.average.note == "mean of the 2 of 3 groups where the twin reaches 0.70"
    # a missing target accuracy leaves the cell undefined, not averaged over the rest
    partial = _attacked("4", "g2-1", (0.0, 0.5), 1.0)
    del partial.sims["judge-acc"]["T"][80]["b"]
    (row,) = next(t for t in build_report([partial]).tables if t.kind == "immune").rows
    assert row.cells["g2-1"].value is None and row.cells["g2-1"].note == "no targets attacked (or no accuracy metric)"
