"""``mima tui`` driven with ``App.run_test``: live updates while a run directory is appended to,
truncated lines and deleted runs survived, keys, and the command line."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from typer.testing import CliRunner

from mima_cli.app import app as cli
from mima_cli.tui.app import MimaTui
from mima_cli.tui.demo import Demo
from mima_cli.tui.screens import HelpScreen, RunScreen, RunsScreen
from mima_cli.tui.widgets import CurvePlot, Thumbnail

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings("ignore::DeprecationWarning:textual_image")]

IDS = {"immunize": "r1-immunize", "attack": "r2-attack", "base_attack": "r3-attack-base", "evaluate": "r4-evaluate"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def demo(tmp_path):
    d = Demo(tmp_path / "runs", steps=20, sample_every=2, eval_every=2, ids=IDS)
    yield d
    for run in d.writers:
        run.close()


async def until(pilot, condition, timeout: float = 10.0, what: str = "") -> None:
    """Let the app run until ``condition()`` holds (the watcher polls on its own thread)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        pilot.app.watcher.wake()
        await pilot.pause(0.05)


def plot_points(screen: RunScreen, group: str) -> dict[str, int]:
    plot = screen._plots.get(group)
    return {label: len(points) for label, points in plot.series.items()} if plot else {}


def drawn_steps(screen) -> set:
    """The steps the run screen's thumbnails show, once each is mounted and drawn (a new one is drawn on mount)."""
    return {t.step if t.is_mounted and t._shown is not None and t._shown[2] == t.step else None
            for t in screen._thumbs.values()}


async def test_run_screen_follows_an_appended_run(demo):
    demo.step(1)
    app = MimaTui(demo.attack.dir.parent, IDS["attack"], interval=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = app.screen
        assert isinstance(screen, RunScreen)
        await until(pilot, lambda: plot_points(screen, "loss") == {"Van Gogh": 1, "Picasso": 1}, what="first point")
        assert not screen._thumbs and screen.query_one("#metrics-table").row_count == 0

        for step in range(2, 5):  # appended while the app runs
            demo.step(step)
        await until(pilot, lambda: plot_points(screen, "loss") == {"Van Gogh": 4, "Picasso": 4}, what="curves")
        await until(pilot, lambda: drawn_steps(screen) == {4}, what="thumbnails")
        thumb = screen._thumbs["eval/Van Gogh"]
        assert thumb.query_one(".thumb-image").display and "Van Gogh · step 4" in str(thumb.query_one(".thumb-caption").render())
        table = screen.query_one("#metrics-table")
        await until(pilot, lambda: table.row_count == 4, what="metric rows (2 concepts x steps 2, 4)")
        assert [str(c.label) for c in table.columns.values()] == ["concept", "step", "clip"]
        header = str(screen.query_one("#run-header").render())
        assert "running" in header and "step 4/20" in header and "twin r3-attack-base" in header

        await pilot.press("5")  # compare with the twin: both runs side by side
        await until(pilot, lambda: len(screen._compare_thumbs) == 4, what="twin thumbnails")
        compare = screen.query_one("#compare-table")
        assert compare.row_count == 2
        assert set(screen._compare_plots["loss"].twin) == {"Van Gogh", "Picasso"}
        assert {k: t.step for k, t in screen._compare_thumbs.items()} == {
            ("Van Gogh", "this"): 4, ("Van Gogh", "twin"): 4, ("Picasso", "this"): 4, ("Picasso", "twin"): 4
        }

        demo.attack.log_status("attack checkpoint saved")
        demo.attack.fail("CUDA out of memory")
        await until(pilot, lambda: "failed" in str(screen.query_one("#run-header").render()), what="failed state")
        assert "error: CUDA out of memory" in str(screen.query_one("#run-header").render())
        await pilot.press("4")
        log_text = "\n".join(line.text for line in screen.query_one("#log-view").lines)
        assert "attack checkpoint saved" in log_text and "state: failed (CUDA out of memory)" in log_text


async def test_runs_screen_lists_new_runs_and_survives_damage(demo):
    demo.step(1)
    app = MimaTui(demo.attack.dir.parent, interval=0.05)
    async with app.run_test(size=(80, 24)) as pilot:
        assert isinstance(app.screen, RunsScreen)
        table = app.screen.query_one("#runs-table")
        await until(pilot, lambda: table.row_count == 4, what="four runs")
        assert str(table.get_cell(IDS["immunize"], "kind")) == "immunize"

        from engine.runs import RunWriter

        late = RunWriter(demo.attack.dir.parent, "erase", method="uce", run_id="r5-erase")
        await until(pilot, lambda: table.row_count == 5, what="a new run appears by itself")
        late.fail("ValueError: no concepts")
        await until(pilot, lambda: str(table.get_cell("r5-erase", "state")) == "failed", what="failed run")
        assert "no concepts" in str(table.get_cell("r5-erase", "note"))
        demo.immunize.finish()  # a longer state than any seen so far widens its column
        await until(pilot, lambda: str(table.get_cell(IDS["immunize"], "state")) == "finished", what="finished")
        await until(pilot, lambda: table.columns["state"].content_width >= len("finished"), what="wider column")

        # a half-written last line and a garbage line in a followed run are survived
        await pilot.press("enter")  # the cursor starts on the newest run
        await until(pilot, lambda: isinstance(app.screen, RunScreen), what="run screen")
        screen = app.screen
        assert screen.run_id == "r5-erase"
        line = json.dumps({"t": 1.0, "run": "r5-erase", "phase": "erase", "step": 1, "kind": "scalar", "name": "residual", "value": 0.5})
        with open(late.events_path, "a", encoding="utf-8") as f:
            f.write("\x00garbage\n" + line[:25])
        await pilot.pause(0.3)
        assert "residual" not in screen._plots
        with open(late.events_path, "a", encoding="utf-8") as f:
            f.write(line[25:] + "\n")
        await until(pilot, lambda: plot_points(screen, "residual") == {"residual": 1}, what="completed line")

        # the run directory is deleted underneath the open run screen
        late.close()
        shutil.rmtree(late.dir)
        await until(pilot, lambda: "deleted" in str(screen.query_one("#run-header").render()), what="deleted banner")
        assert plot_points(screen, "residual") == {"residual": 1}  # what was read is still shown
        await pilot.press("escape")
        await until(pilot, lambda: table.row_count == 4, what="the deleted run leaves the list")
        shutil.rmtree(demo.attack.dir.parent)  # even the whole runs directory
        await until(pilot, lambda: table.row_count == 0, what="empty list")
        assert "waiting for runs" in str(app.screen.query_one("#runs-title").render())
        assert app.is_running


async def test_keys_help_twin_and_quit(demo):
    demo.step(1)
    app = MimaTui(demo.attack.dir.parent, interval=0.05)
    async with app.run_test(size=(80, 24)) as pilot:
        table = app.screen.query_one("#runs-table")
        await until(pilot, lambda: table.row_count == 4)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        assert "compare with the twin" in str(app.screen.query_one("#help-text").render())
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)

        table.move_cursor(row=list(table.rows).index(IDS["base_attack"]))
        await pilot.press("t")  # the unimmunized attack's twin is the attack on the immunized model
        await until(pilot, lambda: isinstance(app.screen, RunScreen))
        assert app.screen.run_id == IDS["attack"]
        await pilot.press("t")  # and back: one run screen at a time
        await until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen.run_id == IDS["base_attack"])
        await pilot.press("p")  # no parent: a warning, no crash
        await pilot.press("2", "3", "4", "5", "1")
        await until(pilot, lambda: isinstance(app.screen.query_one(CurvePlot), CurvePlot))
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)
        await pilot.press("question_mark", "q")  # q quits from the help screen too
    assert app.return_code == 0 and not app.is_running


async def test_images_off_and_missing_files(demo):
    for step in (1, 2):
        demo.step(step)
    for png in demo.immunize.samples_dir.glob("*.png"):
        png.unlink()
    app = MimaTui(demo.attack.dir.parent, IDS["immunize"], interval=0.05)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await until(pilot, lambda: len(screen._thumbs) == 2 and drawn_steps(screen) == {2})
        assert all(str(t.query_one(".thumb-missing").render()) == "image missing" for t in screen._thumbs.values())
    off = MimaTui(demo.attack.dir.parent, IDS["attack"], images="none", interval=0.05)
    async with off.run_test(size=(80, 24)) as pilot:
        screen = off.screen
        await until(pilot, lambda: len(screen._thumbs) == 2 and drawn_steps(screen) == {2})
        assert not screen.query(Thumbnail).first().query(".thumb-image")


# ------------------------------------------------------------------------------------- command line


def test_cli_help_and_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["tui", "--help"])
    assert result.exit_code == 0 and "--run" in result.output and "--serve" in result.output
    result = runner.invoke(cli, ["tui", str(tmp_path), "--run", "nope"])
    assert result.exit_code == 2 and "no runs" in result.output
    result = runner.invoke(cli, ["tui", str(tmp_path), "--images", "kitty"])
    assert result.exit_code == 2 and "--images must be one of" in result.output


def test_serve_runs_the_same_command_for_each_browser(tmp_path):
    from mima_cli.tui_cmd import serve_command

    command = serve_command(tmp_path, "r1", "auto", 0.5)
    assert "-m mima_cli.app tui" in command and str(tmp_path.resolve()) in command
    assert "--images halfcell" in command and "--run r1" in command


def run_in_pty(args: list[str], rows: int, cols: int, timeout: float = 120.0) -> tuple[int, str]:
    """Run ``args`` on a new pty of ``rows`` x ``cols``; press q once the app has switched to the alternate screen.
    Returns the exit code and everything written to the terminal."""
    import fcntl
    import select
    import struct
    import subprocess
    import sys
    import termios
    from pathlib import Path

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TEXTUAL_DRIVER", "TMUX", "STY")}
    env.update(TERM="xterm-256color", PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                                   env.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "mima_cli.app", *args], stdin=slave, stdout=slave, stderr=slave,
                            env=env, start_new_session=True)
    os.close(slave)
    out, pressed, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    out += os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    pass
            if proc.poll() is not None:
                break
            if not pressed and b"\x1b[?1049h" in out:  # Textual took the terminal over
                time.sleep(2.0)
                os.write(master, b"q")
                pressed = True
        else:
            proc.kill()
        return proc.wait(), out.decode("utf-8", "replace")
    finally:
        os.close(master)


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pty")
def test_a_terminal_of_no_size_opens_and_quits(demo):
    """`mima tui` where the pty reports 0 columns and rows (`stty rows 0 cols 0`): it starts, draws, and quits on q,
    without images (textual-image divides by the terminal's size when it is imported)."""
    for step in (1, 2):
        demo.step(step)
    code, out = run_in_pty(["tui", str(demo.attack.dir.parent), "--run", IDS["attack"]], rows=0, cols=0)
    assert "ZeroDivisionError" not in out and code == 0, out[-2000:]


async def test_the_app_at_no_size(demo):
    """Textual's own test driver at 0x0: the run screen and its plots are laid out without an error."""
    for step in (1, 2):
        demo.step(step)
    app = MimaTui(demo.attack.dir.parent, IDS["attack"], interval=0.05)
    async with app.run_test(size=(0, 0)) as pilot:
        await until(pilot, lambda: plot_points(app.screen, "loss") == {"Van Gogh": 2, "Picasso": 2}, what="curves")
        await pilot.press("5")
        await pilot.pause(0.3)
    assert app.return_code in (None, 0)


async def test_run_screen_shows_the_utility_line_from_the_run_directory(demo):
    from engine.metrics.utility import Utility, UtilityPrompt, log_utility

    demo.step(1)
    prompts = [UtilityPrompt("Van Gogh", "an artwork of Van Gogh", "target", "Van Gogh"),
               UtilityPrompt("Picasso", "an artwork of Picasso", "other", "Picasso")]
    scores = {"model": {"Van Gogh": {"judge-acc": 0.0}, "Picasso": {"judge-acc": 0.1}},
              "parent": {"Van Gogh": {"judge-acc": 0.9}, "Picasso": {"judge-acc": 1.0}}}
    log_utility(demo.immunize, Utility(["judge-acc"], "judge-acc", 0.8, prompts, scores))
    app = MimaTui(demo.attack.dir.parent, IDS["immunize"], interval=0.05)
    async with app.run_test(size=(160, 40)) as pilot:
        screen = app.screen
        line = screen.query_one("#run-utility")
        await until(pilot, lambda: "COLLAPSED" in str(line.render()), what="utility line")
        assert "others 0.10 (parent 1.00)" in str(line.render()) and line.display
    attack = MimaTui(demo.attack.dir.parent, IDS["attack"], interval=0.05)
    async with attack.run_test(size=(160, 40)) as pilot:  # a run without a utility measurement: no line
        await pilot.pause(0.3)
        assert not attack.screen.query_one("#run-utility").display
