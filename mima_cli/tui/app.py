"""The Textual app behind ``mima tui``.

Data flows one way: :class:`~mima_cli.tui.watcher.RunsWatcher` (a thread) reads the runs directory and
posts :class:`RunsScanned` / :class:`RunEvents` / :class:`RunGone` messages; the app folds them into
``summaries`` and ``data`` and, at most :data:`REDRAW_HZ` times a second, asks the current screen to
redraw what changed (so a burst of events is one redraw).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from textual.app import App
from textual.binding import Binding
from textual.css.query import NoMatches

from engine.runs import Runs
from mima_cli.tui.data import RunData, RunSummary
from mima_cli.tui.screens import HelpScreen, RunScreen, RunsScreen, SyncScreen
from mima_cli.tui.watcher import RunEvents, RunGone, RunsScanned, RunsWatcher, WatchError
from mima_cli.tui.widgets import image_widget_class, resolve_image_mode

REDRAW_HZ = 4


class MimaTui(App[None]):
    """Live dashboard of the runs under ``runs_dir``; ``run`` opens that run's screen first.

    ``images`` is an ``--images`` mode (see :data:`~mima_cli.tui.widgets.IMAGE_MODES`); ``interval``
    the seconds between polls of the runs directory.
    """

    TITLE = "mima tui"
    CSS_PATH = "mima.tcss"
    ENABLE_COMMAND_PALETTE = False
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("r", "refresh", "Refresh", show=False),
    ]

    def __init__(
        self,
        runs_dir: str | os.PathLike,
        run: str | None = None,
        *,
        images: str = "halfcell",
        interval: float = 0.5,
    ) -> None:
        super().__init__()
        self.runs_dir = Path(runs_dir)
        self.initial_run = run
        self.image_mode = resolve_image_mode(images)
        self.image_class = image_widget_class(self.image_mode)
        self.summaries: dict[str, RunSummary] = {}
        self.runs_version = 0
        self.data: dict[str, RunData] = {}
        self.watcher = RunsWatcher(self.runs_dir, self.post_message, interval=interval)
        self.watch_errors = 0
        self._dirty = True

    # -- lifecycle ------------------------------------------------------------------------------

    def on_mount(self) -> None:
        self.install_screen(RunsScreen(), name="runs")
        self.push_screen("runs")
        if self.initial_run:
            self.push_screen(RunScreen(self.initial_run))
        self.watcher.start()
        self.set_interval(1 / REDRAW_HZ, self._redraw)

    def on_unmount(self) -> None:
        self.watcher.stop()

    # -- messages from the watcher --------------------------------------------------------------

    def on_runs_scanned(self, message: RunsScanned) -> None:
        self.summaries = {s.id: s for s in message.runs}
        self.runs_version += 1
        self._dirty = True

    def on_run_events(self, message: RunEvents) -> None:
        data = self.data.get(message.run_id)
        if data is None:
            data = self.data[message.run_id] = RunData(message.run_id, message.run_dir)
        elif message.reset:
            data.clear()
        data.apply(message.events)
        if message.reset:
            data.version += 1
        self._dirty = True

    def on_run_gone(self, message: RunGone) -> None:
        self.summaries.pop(message.run_id, None)
        self.runs_version += 1
        if message.run_id in self.data:
            self.data[message.run_id].gone = True
            self.data[message.run_id].version += 1
        self._dirty = True

    def on_watch_error(self, message: WatchError) -> None:
        self.watch_errors += 1
        if self.watch_errors <= 3:
            self.notify(message.error, title="reading the runs directory", severity="warning")

    def _redraw(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        screen = self.screen
        if isinstance(screen, SyncScreen):
            try:
                screen.sync()
            except NoMatches:  # the screen's widgets are being mounted or torn down (app exit): retry next tick
                self._dirty = True

    # -- used by the screens --------------------------------------------------------------------

    def watch_runs(self, run_ids: Iterable[str]) -> None:
        """Follow every event of these runs (and forget the data of the others)."""
        wanted = {r for r in run_ids if r}
        for run_id in [r for r in self.data if r not in wanted]:
            del self.data[run_id]
        self.watcher.watch(wanted)

    def twin_of(self, run_id: str) -> str | None:
        """The run's ``twin`` link, or the run that names it as its twin."""
        summary = self.summaries.get(run_id)
        if summary is not None and summary.get("twin"):
            return str(summary.get("twin"))
        named = Runs({**s.status, "id": s.id} for s in self.summaries.values()).children(run_id, "twin")
        return named[0].id if named else None

    def open_run(self, run_id: str) -> None:
        screen = RunScreen(run_id)
        if isinstance(self.screen, RunScreen):
            self.switch_screen(screen)  # one run screen at a time: escape always goes back to the list
        else:
            self.push_screen(screen)

    # -- actions --------------------------------------------------------------------------------

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_refresh(self) -> None:
        self.watcher.wake()
