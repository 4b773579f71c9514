"""Snapshot tests of the dashboard's screens (SVGs under tests/__snapshots__/; update after a deliberate
change with ``pytest tests/test_tui_snapshots.py --snapshot-update`` and look at the report).

Deterministic: fixed run ids, seeded synthetic values and images, event times rewritten to a fixed
clock, fixed terminal sizes, a relative runs directory."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mima_cli.tui.app import MimaTui
from mima_cli.tui.demo import Demo
from mima_cli.tui.screens import HelpScreen, RunScreen, RunsScreen

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:textual_image")

IDS = {
    "immunize": "20260101-120000-immunize-mima-g2-1-aaaa",
    "attack": "20260101-120500-attack-lora-g2-1-bbbb",
    "base_attack": "20260101-120501-attack-lora-g2-1-cccc",
    "evaluate": "20260101-121000-evaluate-clip-g2-1-dddd",
}
T0 = 1_767_268_800.0  # 2026-01-01 12:00 UTC


def freeze(run_dir: Path) -> None:
    """Event times on a fixed clock (2 steps/s) and fixed status times, as if written long ago."""
    lines, step, progress = [], 0, 0.0
    for line in run_dir.joinpath("events.jsonl").read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        step = event["step"] if isinstance(event.get("step"), int) else step
        progress = event["value"] if event["kind"] == "progress" else progress
        event["t"] = T0 + step * 0.5
        lines.append(json.dumps(event))
    run_dir.joinpath("events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    status = json.loads(run_dir.joinpath("status.json").read_text(encoding="utf-8"))
    status.update(started=T0, updated=T0 + step * 0.5, pid=0)
    if status["state"] != "finished":  # RunWriter throttles status writes: make the last one exact
        status["progress"] = progress
    run_dir.joinpath("status.json").write_text(json.dumps(status), encoding="utf-8")


@pytest.fixture
def runs(tmp_path, monkeypatch):
    demo = Demo(tmp_path / "runs", steps=60, sample_every=10, eval_every=10, ids=IDS)
    for step in range(1, 31):
        demo.step(step)
    demo.immunize.finish()
    demo.base_attack.finish()
    demo.evaluate.fail("FileNotFoundError: no checkpoint at step 40")
    for run in demo.writers:
        run.close()
        freeze(run.dir)
    monkeypatch.chdir(tmp_path)
    return Path("runs")


def ready(screen_type, *, thumbs: int = 0, compare: bool = False):
    """``run_before``: wait until the watcher's data is on screen (and thumbnails are loaded)."""

    async def wait(pilot) -> None:
        app = pilot.app
        deadline = time.monotonic() + 10

        def done() -> bool:
            screen = app.screen
            if not isinstance(screen, screen_type):
                return False
            if isinstance(screen, RunsScreen):
                return screen.query_one("#runs-table").row_count == 4
            shown = screen._compare_thumbs if compare else screen._thumbs
            return bool(screen._plots) and len([t for t in shown.values() if t.step is not None]) >= thumbs

        while not done():
            assert time.monotonic() < deadline, "the dashboard did not load the runs"
            await pilot.pause(0.05)
        await settled(pilot)

    return wait


async def settled(pilot) -> None:
    """Let deferred work finish: DataTables measure new rows and columns when they are next idle."""
    await pilot.pause(0.2)
    deadline = time.monotonic() + 5
    from textual.widgets import DataTable

    def pending() -> bool:
        return any(t._require_update_dimensions or t._updated_cells for t in pilot.app.screen.query(DataTable))

    while pending() and time.monotonic() < deadline:
        await pilot.pause(0.05)
    await pilot.wait_for_scheduled_animations()
    await pilot.pause(0.1)


def test_runs_screen_80x24(runs, snap_compare):
    assert snap_compare(MimaTui(runs), terminal_size=(80, 24), run_before=ready(RunsScreen))


def test_run_screen_curves_120x40(runs, snap_compare):
    app = MimaTui(runs, IDS["immunize"])
    assert snap_compare(app, terminal_size=(120, 40), run_before=ready(RunScreen, thumbs=2))


def test_run_screen_samples_80x24(runs, snap_compare):
    app = MimaTui(runs, IDS["attack"])
    assert snap_compare(app, press=["2"], terminal_size=(80, 24), run_before=ready(RunScreen, thumbs=2))


def test_run_screen_compare_with_twin_120x40(runs, snap_compare):
    app = MimaTui(runs, IDS["attack"])
    assert snap_compare(app, press=["5"], terminal_size=(120, 40), run_before=ready(RunScreen, thumbs=4, compare=True))


def test_run_screen_metrics_and_help_80x24(runs, snap_compare):
    app = MimaTui(runs, IDS["evaluate"])

    async def metrics_then_help(pilot) -> None:
        await pilot.press("3")
        deadline = time.monotonic() + 10
        while pilot.app.screen.query_one("#metrics-table").row_count < 3:
            assert time.monotonic() < deadline
            await pilot.pause(0.05)
        await settled(pilot)

    assert snap_compare(app, terminal_size=(80, 24), run_before=metrics_then_help)
    help_app = MimaTui(runs)

    async def runs_then_help(pilot) -> None:  # the modal is pushed asynchronously: wait until it is on screen
        await ready(RunsScreen)(pilot)
        await pilot.press("question_mark")
        deadline = time.monotonic() + 10
        while not isinstance(pilot.app.screen, HelpScreen):
            assert time.monotonic() < deadline, "the help screen did not open"
            await pilot.pause(0.05)
        await settled(pilot)

    assert snap_compare(help_app, terminal_size=(80, 24), run_before=runs_then_help)
