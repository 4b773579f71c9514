"""The dashboard's data layer: folding events, the metric table, progress rates, the runs watcher."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from engine.runs import RunWriter
from mima_cli.tui.data import (
    MetricTable,
    RateMeter,
    RunData,
    downsample,
    fmt_duration,
    fmt_value,
    progress_bar,
)
from mima_cli.tui.watcher import RunEvents, RunGone, RunsScanned, RunsWatcher, WatchError
from mima_cli.tui.widgets import in_multiplexer, resolve_image_mode, step_ticks


def ev(kind, name, value=None, step=None, t=100.0, **extra):
    event = {"t": t, "run": "r", "phase": "p", "step": step, "kind": kind, "name": name}
    if value is not None:
        event["value"] = value
    event.update(extra)
    return event


# ------------------------------------------------------------------------------------------ RunData


def test_scalars_are_grouped_primary_losses_first(tmp_path):
    data = RunData("r", tmp_path)
    data.apply(
        [
            ev("scalar", "grad_norm", 2.0, 1),
            ev("scalar", "outer_loss", 1.0, 1),
            ev("scalar", "inner_loss/Van Gogh", 0.5, 1),
            ev("scalar", "inner_loss/Picasso", 0.7, 1),
            ev("scalar", "loss", 0.9, 1, tags={"concept": "Monet"}),  # tag instead of name suffix
            ev("scalar", "prior_loss", 0.1, 1),
            ev("scalar", "inner_loss/Van Gogh", 0.4, 2),
            ev("scalar", "zeta", "not a number", 1),  # ignored, never raises
        ]
    )
    groups = data.scalar_groups()
    assert list(groups) == ["inner_loss", "outer_loss", "prior_loss", "loss", "grad_norm"]
    assert groups["inner_loss"] == {"Van Gogh": [(1.0, 0.5), (2.0, 0.4)], "Picasso": [(1.0, 0.7)]}
    assert groups["loss"] == {"Monet": [(1.0, 0.9)]}
    assert groups["outer_loss"] == {"outer_loss": [(1.0, 1.0)]}


def test_latest_image_per_name_and_messages(tmp_path):
    data = RunData("r", tmp_path)
    data.apply(
        [
            ev("image", "samples/Van Gogh", step=10, path="samples/a.png", tags={"concept": "Van Gogh"}),
            ev("image", "samples/Van Gogh", step=20, path="samples/b.png", tags={"concept": "Van Gogh"}),
            ev("image", "eval/Picasso", step=5, path="samples/c.png"),
            ev("image", "eval/Monet", step=5, path="../other-run/samples/c.png"),  # outside the run: ignored
            ev("image", "eval/Monet", step=6, path="/etc/c.png"),
            ev("status", "state", "running", t=100.0),
            ev("status", "message", "hello", t=130.0),
            ev("status", "state", "failed", t=190.0, error="CUDA out of memory"),
        ]
    )
    assert data.images["samples/Van Gogh"].step == 20
    assert data.images["samples/Van Gogh"].path == tmp_path / "samples/b.png"
    assert data.images["samples/Van Gogh"].count == 2
    assert data.images["eval/Picasso"].label == "Picasso"
    assert "eval/Monet" not in data.images
    assert [m.text for m in data.messages] == ["state: running", "hello", "state: failed (CUDA out of memory)"]
    assert data.messages[-1].level == "error"
    assert data.message_count == 3 and data.t0 == 100.0


def test_images_of_one_step_with_seeds_form_a_strip(tmp_path):
    data = RunData("r", tmp_path)
    for step in (0, 50):
        for seed in (2, 0, 1):
            data.apply([ev("image", "eval/Van Gogh", step=step, path=f"samples/{step}-{seed}.png", tags={"concept": "Van Gogh", "seed": seed})])
    data.apply([ev("image", "eval/Van Gogh", step=10, path="samples/late.png", tags={"seed": 0})])  # older: ignored
    ref = data.images["eval/Van Gogh"]
    assert ref.step == 50 and ref.seeds == [0, 1, 2]
    assert [p.name for p in ref.paths] == ["50-0.png", "50-1.png", "50-2.png"]
    assert ref.caption == "Van Gogh · step 50 · 3 seeds"


def test_metric_table_pivots_concepts_steps_and_summaries():
    events = [
        ev("metric", "clip/Van Gogh", 0.21, 100, tags={"concept": "Van Gogh", "metric": "clip"}),
        ev("metric", "lpips/Van Gogh", 0.4, 100, tags={"concept": "Van Gogh", "metric": "lpips"}),
        ev("metric", "clip/Picasso", 0.25, 100, tags={"concept": "Picasso", "metric": "clip"}),
        ev("metric", "msgr/clip", 0.1, None, tags={"metric": "clip", "step": 200, "group": "g2-1"}),
        ev("metric", "clip/Van Gogh", 0.23, 200, tags={"concept": "Van Gogh", "metric": "clip"}),
        ev("metric", "mrsgr/clip", 0.8, 200, tags={"metric": "clip", "group": "g2-1"}),
        ev("metric", "clip/Van Gogh", 0.24, 200, tags={"concept": "Van Gogh", "metric": "clip"}),  # last wins
    ]
    table = MetricTable.build(events)
    assert table.metrics == ["clip", "lpips"]
    assert [(r, q, s) for r, q, s, _ in table.rows] == [
        ("Van Gogh", "", "100"),
        ("Picasso", "", "100"),
        ("Van Gogh", "", "200"),
        ("MSGR", "group=g2-1", "200"),
        ("MRSGR", "group=g2-1", "200"),
    ]
    assert table.rows[0][3] == {"clip": 0.21, "lpips": 0.4}
    assert table.rows[2][3] == {"clip": 0.24}
    assert table.has_qualifiers
    assert table.latest()[("Van Gogh", "", "clip")] == 0.24


def test_rate_meter_and_formatting():
    meter = RateMeter()
    for step in range(0, 11):
        meter.add({"t": 1000.0 + step * 0.5, "step": step, "total": 100})
    assert meter.rate == pytest.approx(2.0)
    assert meter.eta == pytest.approx(45.0)
    meter.add({"t": 1010.0, "step": 1, "total": 50})  # a new phase counts from the start again
    assert meter.rate is None and meter.total == 50
    assert fmt_duration(45) == "45s" and fmt_duration(185) == "3m05s" and fmt_duration(7500) == "2h05m"
    assert fmt_duration(None) == "" and fmt_duration(float("nan")) == ""
    assert fmt_value(0.123456) == "0.1235" and fmt_value(float("nan")) == "nan" and fmt_value(3) == "3"
    assert fmt_value({"a": 1.0}) == "a=1"
    assert progress_bar(0.5, 4) == "██    50%" and progress_bar(None) == ""


def test_downsample_keeps_long_series_plottable():
    points = [(float(i), float(i)) for i in range(1000)] + [(1000.0, float("nan"))]
    xs, ys = downsample(points, 100)
    assert len(xs) == len(ys) == 100
    assert xs[-1] == 999.0 and ys[0] == pytest.approx(4.5)
    assert downsample([(0.0, 1.0), (1.0, float("inf"))], 10) == ([0.0], [1.0])
    assert step_ticks(1, 204, 5) == [50.0, 100.0, 150.0, 200.0]


def test_image_mode_falls_back_to_half_blocks():
    assert resolve_image_mode("auto", env={"TMUX": "/tmp/tmux-0/default,1,0"}, isatty=True) == "halfcell"
    assert resolve_image_mode("auto", env={"TERM": "screen-256color"}, isatty=True) == "halfcell"
    assert resolve_image_mode("auto", env={}, isatty=False) == "halfcell"
    assert resolve_image_mode("sixel", env={"TMUX": "1"}) == "sixel"  # an explicit choice is kept
    assert in_multiplexer({"STY": "123.pts-0"}) and not in_multiplexer({"TERM": "xterm-256color"})
    with pytest.raises(ValueError, match="images must be one of"):
        resolve_image_mode("kitty")


def test_image_mode_is_none_on_a_terminal_of_no_size():
    """textual-image divides by the terminal's columns and rows when it is imported."""
    assert all(resolve_image_mode(m, env={}, isatty=True, unsized=True) == "none" for m in ("auto", "halfcell", "tgp"))
    assert resolve_image_mode("halfcell", unsized=False) == "halfcell"


# ------------------------------------------------------------------------------------------ watcher


class Sink(list):
    def of(self, kind):
        return [m for m in self if isinstance(m, kind)]


def test_watcher_lists_runs_and_follows_watched_ones(tmp_path):
    runs = tmp_path / "runs"
    sink = Sink()
    watcher = RunsWatcher(runs, sink.append)
    watcher.poll_once()  # the runs directory does not exist yet: an empty list, no error
    assert [m.runs for m in sink.of(RunsScanned)] == [[]]

    run = RunWriter(runs, "immunize", method="mima", group="g", run_id="r1", status_interval=0)
    for step in range(1, 4):
        run.log_scalar("outer_loss", 1.0 / step, step)
        run.progress(step, 10)
    watcher.poll_once()
    summary = sink.of(RunsScanned)[-1].runs[0]
    assert (summary.id, summary.state, summary.step, summary.total) == ("r1", "running", 3, 10)
    assert summary.get("method") == "mima"

    watcher.watch(["r1"])
    sink.clear()
    watcher.poll_once()
    assert sink.of(RunsScanned) == []  # nothing changed: no new scan is posted
    (first,) = sink.of(RunEvents)
    assert first.reset and first.run_id == "r1"
    assert [e["value"] for e in first.events if e["kind"] == "scalar"] == [1.0, 0.5, 1.0 / 3]

    run.log_scalar("outer_loss", 0.25, 4)
    sink.clear()
    watcher.poll_once()
    (second,) = sink.of(RunEvents)
    assert not second.reset and [e["value"] for e in second.events] == [0.25]
    run.close()


def test_watcher_survives_truncated_lines_garbage_and_deletion(tmp_path):
    runs = tmp_path / "runs"
    run = RunWriter(runs, "attack", method="lora", run_id="r1")
    run.close()
    sink = Sink()
    watcher = RunsWatcher(runs, sink.append)
    watcher.watch(["r1"])
    watcher.poll_once()
    sink.clear()

    line = json.dumps({"t": 1.0, "run": "r1", "phase": "a", "step": 1, "kind": "scalar", "name": "loss", "value": 0.5})
    with open(run.events_path, "a", encoding="utf-8") as f:
        f.write("{not json}\n")
        f.write(line[:20])  # the writer is mid-line
    watcher.poll_once()
    assert sink.of(RunEvents) == []
    with open(run.events_path, "a", encoding="utf-8") as f:
        f.write(line[20:] + "\n")
    watcher.poll_once()
    (batch,) = sink.of(RunEvents)
    assert [e["value"] for e in batch.events] == [0.5]

    run.events_path.write_text(line + "\n", encoding="utf-8")  # replaced by a shorter file
    sink.clear()
    watcher.poll_once()
    (batch,) = sink.of(RunEvents)
    assert batch.reset and len(batch.events) == 1

    run.events_path.unlink()  # caught mid-deletion (rmtree removes the files first): what was read stays
    sink.clear()
    watcher.poll_once()
    assert sink.of(RunEvents) == [] and sink.of(RunGone) == []

    shutil.rmtree(runs / "r1")
    sink.clear()
    watcher.poll_once()
    assert [m.run_id for m in sink.of(RunGone)] == ["r1"]
    assert sink.of(RunsScanned)[-1].runs == []
    watcher.poll_once()  # and again: nothing left to follow, still no error
    assert sink.of(WatchError) == []


def test_watcher_reads_only_the_tail_of_long_runs_for_the_list(tmp_path):
    runs = tmp_path / "runs"
    run = RunWriter(runs, "immunize", run_id="big")
    for step in range(1, 3001):
        run.progress(step, 3000)
    run.close()
    sink = Sink()
    watcher = RunsWatcher(runs, sink.append, tail_bytes=4096)
    watcher.poll_once()
    summary = sink.of(RunsScanned)[-1].runs[0]
    assert summary.step == 3000 and summary.total == 3000
    assert watcher._runs["big"].tail.offset == run.events_path.stat().st_size


def test_watcher_thread_starts_wakes_and_stops(tmp_path):
    sink = Sink()
    watcher = RunsWatcher(tmp_path, sink.append, interval=30)
    watcher.start()
    deadline = time.monotonic() + 5
    while watcher.polls < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    RunWriter(tmp_path, "erase", run_id="e1").close()
    watcher.wake()
    while watcher.polls < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    watcher.stop()
    assert not watcher._thread.is_alive()
    assert [s.id for s in sink.of(RunsScanned)[-1].runs] == ["e1"]


def test_long_histories_are_posted_in_chunks(tmp_path):
    run = RunWriter(tmp_path, "immunize", run_id="r")
    for step in range(25):
        run.log_scalar("outer_loss", float(step), step)
    run.close()
    sink = Sink()
    watcher = RunsWatcher(tmp_path, sink.append, chunk=10)
    watcher.watch(["r"])
    watcher.poll_once()
    batches = sink.of(RunEvents)
    assert [len(b.events) for b in batches] == [10, 10, 6]  # state "running" + 25 scalars
    assert [b.reset for b in batches] == [True, False, False]
    data = RunData("r", Path(tmp_path))
    for b in batches:
        data.apply(b.events)
    assert len(data.scalars["outer_loss"]) == 25


def test_compare_cells_fill_the_twin_column_of_an_intact_attack_pair(built):
    """An attack pair's metrics are all logged in the immunized run (tagged pair=T/A, r-T/r-A): the Compare tab puts
    each side in its column, from either run's screen, so the twin column is not blank."""
    from engine.runs import RunReader
    from mima_cli.tui.data import MetricTable, compare_cells

    from attack_helpers import attack_runs

    (imm,) = [r for r in attack_runs(built["runs"]) if r["extra"]["immunized"] and r["parent"] == built["mima"]]
    events = [e for e in RunReader(imm["dir"]).events("metric")]
    mine = MetricTable.build(events).latest()
    twin = MetricTable.build([e for e in RunReader(built["runs"] / imm["twin"]).events("metric")]).latest()
    assert twin == {}  # the unimmunized run logs no metrics of its own
    cells = compare_cells(mine, twin)
    paired = {k: v for k, v in cells.items() if "pair=T|A" in k[1]}
    assert paired and all(this is not None and other is not None for this, other in paired.values())
    acc = {e["tags"]["pair"]: e["value"] for e in events
           if e["name"] == "sim/judge-acc/strieker" and e["tags"]["pair"] in ("T", "A") and e["step"] == 2}
    ((_, qualifiers, _),) = [k for k in paired if k[0] == "strieker" and k[2] == "judge-acc"]
    assert cells[("strieker", qualifiers, "judge-acc")] == [acc["T"], acc["A"]]
    # seen from the twin's screen, the sides swap
    assert compare_cells(twin, mine)[("strieker", qualifiers, "judge-acc")] == [acc["A"], acc["T"]]
