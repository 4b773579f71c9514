"""The screens: every run (:class:`RunsScreen`), one run (:class:`RunScreen`) and the key help.

Over 450 lines because :class:`RunScreen` draws five tabs (curves, samples, metrics, log, compare) from one
``sync`` that reads top to bottom; the data they draw is folded in :mod:`mima_cli.tui.data`, outside Textual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, RichLog, Static, TabbedContent, TabPane

from mima_cli.tui.data import (
    PRIMARY_GROUPS,
    RunData,
    RunSummary,
    compare_cells,
    fmt_duration,
    fmt_rate,
    fmt_value,
    progress_bar,
)
from mima_cli.tui.widgets import CurvePlot, Thumbnail

if TYPE_CHECKING:
    from mima_cli.tui.app import MimaTui

STATE_STYLE = {
    "running": "bold cyan",
    "finished": "green",
    "failed": "bold red",
    "interrupted": "yellow",
    "unknown": "dim",
    "deleted": "bold magenta",
}


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def one_line_each(lines: list[Text]) -> Text:
    """Lines that are cut with an ellipsis instead of wrapping (so a fixed-height panel stays readable)."""
    text = Text("\n").join(lines)
    text.no_wrap, text.overflow = True, "ellipsis"
    return text


class SyncScreen(Screen):
    """A screen that redraws from the app's data when :meth:`sync` is called (at most a few times a second)."""

    @property
    def tui(self) -> MimaTui:
        return self.app  # type: ignore[return-value]

    def sync(self) -> None:
        raise NotImplementedError

    def on_screen_resume(self) -> None:
        self.sync()


# ----------------------------------------------------------------------------------------- runs list


class RunsTable(DataTable):
    """The runs table; enter opens the highlighted run."""

    BINDINGS = [Binding("enter", "select_cursor", "Open")]


class RunsScreen(SyncScreen):
    """Every run under the runs directory; new runs appear as they start."""

    BINDINGS = [
        Binding("t", "open_twin", "Twin"),
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
    ]

    COLUMNS = (
        ("state", "state"),
        ("kind", "kind"),
        ("method", "method"),
        ("profile", "profile"),
        ("group", "group"),
        ("progress", "progress"),
        ("steps/s", "rate"),
        ("ETA", "eta"),
        ("run", "id"),
        ("error / last message", "note"),
    )

    def compose(self) -> ComposeResult:
        yield Static(id="runs-title")
        table: DataTable[Any] = RunsTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        for label, key in self.COLUMNS:
            table.add_column(label, key=key)
        yield table
        yield Static(id="runs-detail")
        yield Footer()

    def on_mount(self) -> None:
        self._seen_version = -1
        self.query_one(DataTable).focus()
        self.sync()

    def on_screen_resume(self) -> None:
        self.tui.watch_runs(())
        self._seen_version = -1
        self.sync()

    def row_cells(self, s: RunSummary) -> dict[str, Any]:
        state = s.state
        steps = f"{s.step}/{s.total}" if s.step is not None and s.total else ""
        error = s.get("error")
        note = Text(str(error), style="red") if error else Text(s.last_message or "", style="dim")
        return {
            "state": state_text(state),
            "kind": s.get("kind", ""),
            "method": s.get("method", ""),
            "profile": s.get("profile", ""),
            "group": s.get("group", ""),
            "progress": Text(progress_bar(s.get("progress")), style=STATE_STYLE.get(state, "")),
            "rate": fmt_rate(s.rate) if s.running else "",
            "eta": fmt_duration(s.eta) if s.running else ("done" if state == "finished" else ""),
            "id": s.id,
            "note": note,
            "_steps": steps,
        }

    def sync(self) -> None:
        if not self.is_mounted or self._seen_version == self.tui.runs_version:
            return
        self._seen_version = self.tui.runs_version
        table = self.query_one(DataTable)
        runs = self.tui.summaries
        # like `tail -f`: a cursor on the newest run (or none yet) stays on the newest run
        follow_newest = table.row_count == 0 or table.cursor_row >= table.row_count - 1
        for key in [k.value for k in list(table.rows) if k.value not in runs]:
            table.remove_row(key)
        for run_id, summary in runs.items():
            cells = self.row_cells(summary)
            if run_id in table.rows:
                for _, column in self.COLUMNS:
                    if table.get_cell(run_id, column) != cells[column]:
                        table.update_cell(run_id, column, cells[column], update_width=True)
            else:
                table.add_row(*(cells[c] for _, c in self.COLUMNS), key=run_id)
        if follow_newest and table.row_count:
            table.move_cursor(row=table.row_count - 1)
        running = sum(1 for s in runs.values() if s.running)
        title = f"[b]mima[/b] · {escape(str(self.tui.runs_dir))} · {len(runs)} run{'s' if len(runs) != 1 else ''}"
        title += f" · [cyan]{running} running[/]" if running else ""
        if not runs:
            title += " · waiting for runs to appear"
        self.query_one("#runs-title", Static).update(title)
        self.show_detail()

    def highlighted(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        try:
            return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        except Exception:  # cursor outside the table while rows change
            return None

    def show_detail(self) -> None:
        """Three unwrapped lines about the highlighted run: id; error or last message; step and links."""
        run_id = self.highlighted()
        summary = self.tui.summaries.get(run_id) if run_id else None
        detail = self.query_one("#runs-detail", Static)
        if summary is None:
            detail.update(Text("no run selected · runs appear here as soon as they start", style="dim"))
            return
        lines = [Text(summary.id, style="bold")]
        if summary.get("error"):
            lines.append(Text(f"error: {summary.get('error')}", style="red"))
        else:
            lines.append(Text(summary.last_message or "", style="dim"))
        facts = []
        steps = self.row_cells(summary)["_steps"]
        if steps:
            facts.append(f"step {steps}")
        for key in ("twin", "parent"):
            if summary.get(key):
                facts.append(f"{key} {summary.get(key)}")
        concepts = summary.get("concepts") or []
        if concepts:
            facts.append("concepts " + ", ".join(map(str, concepts)))
        lines.append(Text(" · ".join(facts)))
        detail.update(one_line_each(lines))

    @on(DataTable.RowHighlighted)
    def _highlighted(self) -> None:
        self.show_detail()

    @on(DataTable.RowSelected)
    def _selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value:
            self.tui.open_run(event.row_key.value)

    def action_open_twin(self) -> None:
        run_id = self.highlighted()
        twin = self.tui.twin_of(run_id) if run_id else None
        if twin:
            self.tui.open_run(twin)
        else:
            self.notify("this run has no twin", severity="warning")

    def action_cursor_down(self) -> None:
        self.query_one(DataTable).action_cursor_down()

    def action_cursor_up(self) -> None:
        self.query_one(DataTable).action_cursor_up()


# ------------------------------------------------------------------------------------------- one run


class RunScreen(SyncScreen):
    """One run: curves, samples, metrics, messages, and the comparison with its twin."""

    BINDINGS = [
        Binding("escape,backspace", "back", "Runs"),
        Binding("1", "tab('curves')", "Curves", show=False),
        Binding("2", "tab('samples')", "Samples", show=False),
        Binding("3", "tab('metrics')", "Metrics", show=False),
        Binding("4", "tab('log')", "Log", show=False),
        Binding("5,c", "tab('compare')", "Compare"),
        Binding("t", "open_link('twin')", "Twin"),
        Binding("p", "open_link('parent')", "Parent"),
    ]

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.summary: RunSummary | None = None
        self.twin_id: str | None = None
        self._seen: tuple[Any, ...] = ()
        self._log_seen = 0
        self._plots: dict[str, CurvePlot] = {}
        self._thumbs: dict[str, Thumbnail] = {}
        self._compare_plots: dict[str, CurvePlot] = {}
        self._compare_thumbs: dict[tuple[str, str], Thumbnail] = {}
        self._metrics_shown: Any = None
        self._compare_shown: Any = None

    def compose(self) -> ComposeResult:
        yield Static(id="run-header")
        yield Static(id="run-utility")
        with TabbedContent(initial="curves", id="run-tabs"):
            with TabPane("1 Curves", id="curves"):
                yield VerticalScroll(Static("waiting for scalars…", classes="empty"), Grid(id="plots"), id="curves-scroll")
            with TabPane("2 Samples", id="samples"):
                yield VerticalScroll(Static("waiting for images…", classes="empty"), Vertical(id="thumbs"), id="samples-scroll")
            with TabPane("3 Metrics", id="metrics"):
                yield Static("waiting for metrics (they land as evaluations finish)…", classes="empty")
                yield DataTable(id="metrics-table", zebra_stripes=True, cursor_type="row")
            with TabPane("4 Log", id="log"):
                yield RichLog(id="log-view", max_lines=1000, wrap=True, markup=False, auto_scroll=True)
            with TabPane("5 Compare", id="compare"):
                with VerticalScroll(id="compare-scroll"):
                    yield Static(id="compare-title")
                    yield DataTable(id="compare-table", zebra_stripes=True, show_cursor=False)
                    yield Vertical(id="compare-thumbs")
                    yield Grid(id="compare-plots")
        yield Footer()

    def on_mount(self) -> None:
        self.sync()

    def on_screen_resume(self) -> None:
        self._seen = ()
        self.sync()

    # -- data -----------------------------------------------------------------------------------

    def sync(self) -> None:
        if not self.is_mounted:
            return
        tui = self.tui
        summary = tui.summaries.get(self.run_id)
        if summary is not None:
            self.summary = summary
        twin = tui.twin_of(self.run_id)
        if twin != self.twin_id or not self._seen:
            self.twin_id = twin
            tui.watch_runs((self.run_id, twin) if twin else (self.run_id,))
        data = tui.data.get(self.run_id)
        twin_data = tui.data.get(twin) if twin else None
        seen = (
            tui.runs_version,
            id(data),
            data.version if data else -1,
            data.gone if data else None,
            twin,
            id(twin_data),
            twin_data.version if twin_data else -1,
        )
        if seen == self._seen:
            return
        self.show_header(data)
        self.show_utility(data)
        if data is not None:
            self.show_curves(data)
            self.show_samples(data)
            self.show_metrics(data)
            self.show_log(data)
        self.show_compare(data, twin_data)
        self._seen = seen  # only once everything is drawn: a sync cut short redraws at the next tick

    def show_header(self, data: RunData | None) -> None:
        """Three lines that never wrap: state and id; progress, rate, ETA; what and links (or the error)."""
        s = self.summary
        gone = (data is not None and data.gone) or (s is not None and s.id not in self.tui.summaries)
        state = "deleted" if gone else (s.state if s else "unknown")
        line1 = Text.assemble(state_text(state), "  ", Text(self.run_id, style="bold"))
        progress: list[str] = []
        what: list[str] = []
        if s is not None:
            progress.append(progress_bar(s.get("progress")))
            meter = data.meter if data is not None and data.meter.step is not None else None
            step, total = (meter.step, meter.total) if meter else (s.step, s.total)
            if step is not None:
                progress.append(f"step {step}" + (f"/{total}" if total else ""))
            rate = meter.rate if meter else s.rate
            if s.running and not gone and rate:
                progress.append(f"{fmt_rate(rate)} steps/s")
                eta = meter.eta if meter else s.eta
                if eta is not None:
                    progress.append(f"ETA {fmt_duration(eta)}")
            what = [str(s.get(k)) for k in ("kind", "method", "profile", "group") if s.get(k)]
        line2 = Text(" · ".join(progress + what))
        links = []
        if self.twin_id:
            links.append(f"twin {self.twin_id}")
        if s is not None and s.get("parent"):
            links.append(f"parent {s.get('parent')}")
        if gone:
            line3 = Text("the run directory was deleted; showing what was read before", style="magenta")
        elif s is not None and s.get("error"):
            line3 = Text(f"error: {s.get('error')}", style="red")
        else:
            last = data.messages[-1].text if data is not None and data.messages else (s.last_message if s else None)
            line3 = Text(" · ".join(([f"» {last}"] if last else []) + links), style="dim")
        self.query_one("#run-header", Static).update(one_line_each([line1, line2, line3]))

    def show_utility(self, data: RunData | None) -> None:
        """One line under the header: what the model still draws without attack (red when collapsed)."""
        widget = self.query_one("#run-utility", Static)
        line = data.utility_line() if data is not None else None
        widget.display = line is not None
        if line is not None:
            text, collapsed = line
            widget.update(Text(text, style="bold red" if collapsed else "green", no_wrap=True, overflow="ellipsis"))

    def show_curves(self, data: RunData) -> None:
        groups = data.scalar_groups()
        grid = self.query_one("#plots", Grid)
        for group, series in groups.items():
            plot = self._plots.get(group)
            if plot is None:
                plot = self._plots[group] = CurvePlot(group)
                grid.mount(plot)
            plot.set_series(series)
        for group in self._plots.keys() - groups.keys():  # the events file was replaced
            self._plots[group].set_series({})
        self.query_one("#curves .empty").display = not groups

    def show_samples(self, data: RunData) -> None:
        box = self.query_one("#thumbs")
        for key, ref in data.images.items():
            thumb = self._thumbs.get(key)
            if thumb is None:
                thumb = self._thumbs[key] = Thumbnail(self.tui.image_class, ref.caption)
                box.mount(thumb)
            thumb.show(ref.caption, ref.paths, ref.step)
        self.query_one("#samples .empty").display = not data.images

    def show_metrics(self, data: RunData) -> None:
        table = self.query_one("#metrics-table", DataTable)
        metrics = data.metric_table()
        table.display = bool(metrics.rows)
        self.query_one("#metrics .empty").display = not metrics.rows
        if (metrics.metrics, metrics.rows) == self._metrics_shown:
            return  # unchanged: keep the scroll position
        self._metrics_shown = (metrics.metrics, metrics.rows)
        row = table.cursor_row
        table.clear(columns=True)
        if not metrics.rows:
            return
        table.add_column("concept")
        if metrics.has_qualifiers:
            table.add_column("for")
        table.add_column("step")
        for metric in metrics.metrics:
            table.add_column(metric)
        for label, qualifiers, step, values in metrics.rows:
            cells: list[Any] = [Text(label, style="bold" if label.isupper() else "")]
            if metrics.has_qualifiers:
                cells.append(qualifiers)
            cells.append(step)
            cells += [Text(fmt_value(values[m]), justify="right") if m in values else "" for m in metrics.metrics]
            table.add_row(*cells)
        table.move_cursor(row=min(row, table.row_count - 1))

    def show_log(self, data: RunData) -> None:
        log = self.query_one("#log-view", RichLog)
        if data.events == 0 or self._log_seen > data.message_count:
            log.clear()
            self._log_seen = 0
        new = data.message_count - self._log_seen
        if new <= 0:
            return
        t0 = data.t0
        for line in list(data.messages)[-min(new, len(data.messages)) :]:
            when = f"+{fmt_duration(line.t - t0) or '0s'}" if line.t is not None and t0 is not None else ""
            style = {"error": "bold red", "state": "cyan"}.get(line.level, "")
            log.write(Text.assemble((f"{when:>8} ", "dim"), (f"{line.phase:<10} ", "dim"), (line.text, style)))
        self._log_seen = data.message_count

    def show_compare(self, data: RunData | None, twin_data: RunData | None) -> None:
        title = self.query_one("#compare-title", Static)
        parts = [self.query_one(f"#compare-{w}") for w in ("thumbs", "plots", "table")]
        if not self.twin_id:
            title.update(
                "[dim]no twin: this run's status.json has no [b]twin[/b] and no run names it as its twin.\n"
                "Runs are linked by the job that starts them (e.g. an attack on the immunized model and the "
                "same attack on the unimmunized one).[/]"
            )
            for w in parts:
                w.display = False
            return
        for w in parts:
            w.display = True
        twin_summary = self.tui.summaries.get(self.twin_id)
        this_desc = " ".join(str(x) for x in (self.summary.get("kind"), self.summary.get("method")) if x) if self.summary else ""
        twin_desc = " ".join(str(x) for x in (twin_summary.get("kind"), twin_summary.get("method")) if x) if twin_summary else ""
        title.update(
            Text.assemble(
                ("this ", "bold"), (f"{self.run_id} {this_desc}", "cyan"), "\n",
                ("twin ", "bold"), (f"{self.twin_id} {twin_desc}", "yellow"),
                *( [("  (twin not found in the runs directory)", "magenta")] if twin_summary is None else [] ),
            )
        )
        # thumbnails: per image name, this run's above the twin's (seeds line up column by column)
        box = self.query_one("#compare-thumbs")
        mine = {ref.label: ref for ref in (data.images.values() if data else ())}
        theirs = {ref.label: ref for ref in (twin_data.images.values() if twin_data else ())}
        for label in list(dict.fromkeys([*mine, *theirs])):
            for side, refs in (("this", mine), ("twin", theirs)):
                thumb = self._compare_thumbs.get((label, side))
                if thumb is None:
                    thumb = self._compare_thumbs[(label, side)] = Thumbnail(self.tui.image_class, label)
                    thumb.add_class(f"-{side}")
                    box.mount(thumb)
                ref = refs.get(label)
                caption = f"{side}: " + (ref.caption if ref else f"{label} · no image yet")
                thumb.show(caption, ref.paths if ref else (), ref.step if ref else None)
        box.display = bool(mine or theirs)
        # curves: the primary groups, both runs overlaid
        plots = self.query_one("#compare-plots", Grid)
        mine_g = data.scalar_groups() if data else {}
        theirs_g = twin_data.scalar_groups() if twin_data else {}
        shown = [g for g in PRIMARY_GROUPS if g in mine_g or g in theirs_g] or list(dict.fromkeys([*mine_g, *theirs_g]))[:2]
        for group in shown:
            plot = self._compare_plots.get(group)
            if plot is None:
                plot = self._compare_plots[group] = CurvePlot(group)
                plots.mount(plot)
            plot.set_series(mine_g.get(group, {}), theirs_g.get(group, {}))
        plots.display = bool(shown)
        # metrics: this, twin and the difference at the latest step of each cell
        table = self.query_one("#compare-table", DataTable)
        a = data.metric_table().latest() if data else {}
        b = twin_data.metric_table().latest() if twin_data else {}
        table.display = bool(a or b)
        if (a, b) == self._compare_shown:
            return
        self._compare_shown = (a, b)
        table.clear(columns=True)
        if not (a or b):
            return
        for column in ("concept", "metric", "this", "twin", "Δ this−twin"):
            table.add_column(column)
        for (row, qualifiers, metric), (va, vb) in compare_cells(a, b).items():
            delta = ""
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
                delta = fmt_value(float(va) - float(vb))
            label = f"{row} {qualifiers}".strip()
            table.add_row(
                Text(label, style="bold" if row.isupper() else ""),
                metric,
                Text(fmt_value(va), justify="right"),
                Text(fmt_value(vb), justify="right"),
                Text(delta, justify="right"),
            )
        table.styles.height = table.row_count + 1

    # -- actions --------------------------------------------------------------------------------

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def action_open_link(self, link: str) -> None:
        target = self.twin_id if link == "twin" else (self.summary.get("parent") if self.summary else None)
        if not target:
            self.notify(f"this run has no {link}", severity="warning")
        elif target not in self.tui.summaries:
            self.notify(f"{link} {target} is not in {self.tui.runs_dir}", severity="warning")
        else:
            self.tui.open_run(target)


# ------------------------------------------------------------------------------------------------ help


HELP = """\
[b]mima tui[/b] — live dashboard of the runs in a runs directory (reads only
events.jsonl, status.json and samples/; never slows a run down)

[b]everywhere[/b]
  q          quit
  ?          this help (escape closes it)
  r          re-read the runs directory now

[b]runs[/b]
  ↑ ↓ / j k  move
  enter      open the run
  t          open the highlighted run's twin

[b]one run[/b]
  1 2 3 4    curves · samples · metrics · log
  5 or c     compare with the twin, side by side
  t / p      open the twin / the parent run
  escape     back to the runs
  ← →        switch tabs when the tab bar has focus (tab moves focus)
"""


class HelpScreen(ModalScreen[None]):
    """Key bindings."""

    BINDINGS = [
        Binding("escape,question_mark", "dismiss", "Close"),
        Binding("q", "app.quit", "Quit"),  # a modal screen hides the app's bindings
    ]

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box"):
            yield Static(HELP, id="help-text")
            yield Static("[dim]escape or ? to close[/]", id="help-hint")

    def action_dismiss(self, result: Any = None) -> None:  # type: ignore[override]
        self.dismiss(None)


__all__ = ["RunsScreen", "RunScreen", "HelpScreen"]
