"""``mima report``: the paper's tables (MSGR, MRSGR), similarity-vs-step charts and the qualitative grid."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from mima_cli.console import EXIT_FAILURE, EXIT_USAGE, console, err_console, fail, print_json, warn
from mima_cli.options import runs_dir

MARKERS = ("hd", "dot", "x", "+", "o", "*", "sd", "braille")


COLLAPSED = "†"


def _num(v, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _value(kind: str, v) -> str:
    return ("—" if v is None else f"{v:.0%}") if kind == "learn" else _num(v)


def _success(kind: str, v) -> str:
    return f" ({v:.2f})" if kind == "immune" else f" ({v:.0%})"


def _cell_text(cell, kind: str) -> Text:
    text = Text(_value(kind, cell.value), style="bold" if cell.value is not None else "dim")
    if cell.note and cell.value is not None:
        text.append("*", style="yellow")
    if cell.collapsed:
        text.append(COLLAPSED, style="bold red")
    if kind in ("msgr", "learn", "immune") and cell.success is not None:
        text.append(_success(kind, cell.success), style="dim")
    return text


def _plain_cell(cell, kind: str) -> str:
    return _cell_text(cell, kind).plain


def collapse_legend(threshold: float) -> str:
    return (f"{COLLAPSED} collapsed: without any attack this model draws the other concepts at less than "
            f"{threshold:.0%} of its parent's utility (utility table); its MSGR measures a broken model, not immunity")


def _utility_text(cell) -> Text:
    text = Text(f"{_num(cell.targets)} / {_num(cell.others)}", style="bold" if cell.others is not None else "dim")
    if cell.collapsed:
        text.append(f" {COLLAPSED}", style="bold red")
    return text


def _rich_utility(u) -> Table:
    table = Table(title=u.title, title_justify="left")
    table.add_column("model")
    for g in u.groups:
        table.add_column(f"{g} ({u.group_sizes[g]})", justify="right")
    table.add_column("average", justify="right", style="cyan")
    for r in u.rows:
        table.add_row(r.model, *[_utility_text(r.cells[g]) if g in r.cells else Text("") for g in u.groups],
                      _utility_text(r.average))
    table.caption = (f"{u.metric} of each model's own generations, no attack: the targets' prompts / the other "
                     f"concepts' (parent = the model immunization started from)"
                     + (f"\n{collapse_legend(u.threshold)}" if u.collapsed else "")
                     + (f"\n{unmeasured_line(u)}" if u.unmeasured else ""))
    table.caption_justify = "left"
    return table


def _markdown_utility(u) -> list[str]:
    out = [f"### {u.title}\n", "| " + " | ".join(["model", *[f"{g} ({u.group_sizes[g]})" for g in u.groups], "average"])
           + " |", "|" + "|".join(["---"] + ["---:"] * (len(u.groups) + 1)) + "|"]
    for r in u.rows:
        cells = [_utility_text(r.cells[g]).plain if g in r.cells else "" for g in u.groups]
        out.append("| " + " | ".join([r.model, *cells, _utility_text(r.average).plain]) + " |")
    if u.collapsed:
        out += ["", collapse_legend(u.threshold)]
    if u.unmeasured:
        out += ["", unmeasured_line(u)]
    out.append("")
    return out


def unmeasured_line(u) -> str:
    return (f"utility not measured for: {', '.join(u.unmeasured)} (run `mima evaluate --utility <immunization run>`); "
            f"their numbers may measure a collapsed model")


NONE_MRSGR = ("none: x^I is a re-run of x^A, so its MRSGR compares how alike the targets' own images are with how "
              "alike the others' are (M(x^A, x^A)); it is this group's baseline, not 0: read the other rows against it")


def print_utility(run_dir) -> None:
    """The utility line of a model run (warned when the model is collapsed); nothing when it has none."""
    from engine.metrics.utility import read_utility

    u = read_utility(run_dir)
    if u is None:
        return
    if u.collapsed:
        warn(f"{u.describe()}: the model no longer draws what its parent drew; its MSGR would measure destruction")
    else:
        console.print(u.describe(), highlight=False)


def _rich_table(t, threshold: float | None = None) -> Table:
    table = Table(title=t.title, title_justify="left", show_lines=False)
    table.add_column("method")
    table.add_column("metric")
    for g in t.groups:
        table.add_column(f"{g} ({t.group_sizes[g]})", justify="right")
    table.add_column("average", justify="right", style="cyan")
    last = None
    for r in t.rows:
        if last is not None and r.method != last:
            table.add_section()
        cells = [_cell_text(r.cells[g], t.kind) if g in r.cells else Text("") for g in t.groups]
        table.add_row(r.method if r.method != last else "", r.metric, *cells, _cell_text(r.average, t.kind))
        last = r.method
    if t.kind == "msgr":
        table.caption = "(x%) = judge accuracy on x^A: how well the attack works on the unimmunized twin"
    elif t.kind == "learn":
        table.caption = ("the other concepts' judge accuracy after the same attack on the immunized model (on the "
                         "unimmunized twin): immunization should leave them learnable")
    elif t.kind == "immune":
        from engine.report.tables import IMMUNE_TWIN_MIN

        table.caption = (f"the targets' judge accuracy after the attack on the immunized model (on the unimmunized "
                         f"twin); the average counts the groups where the twin reaches {IMMUNE_TWIN_MIN:.2f}")
    elif any(r.method == "none" for r in t.rows):
        table.caption = NONE_MRSGR
    if any(c.collapsed for r in t.rows for c in r.cells.values()):
        table.caption = "\n".join(x for x in (table.caption, collapse_legend(threshold or 0.8)) if x)
    table.caption_justify = "left"
    return table


def _threshold(report, profile) -> float:
    return next((u.threshold for u in report.utility if u.profile == profile), 0.8)


def _markdown(report) -> str:
    out = []
    for u in report.utility:
        out += _markdown_utility(u)
    for t in report.tables:
        out.append(f"### {t.title}\n")
        head = ["method", "metric", *[f"{g} ({t.group_sizes[g]})" for g in t.groups], "average"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---", "---"] + ["---:"] * (len(t.groups) + 1)) + "|")
        for r in t.rows:
            cells = [_plain_cell(r.cells[g], t.kind) if g in r.cells else "" for g in t.groups]
            out.append("| " + " | ".join([r.method, r.metric, *cells, _plain_cell(r.average, t.kind)]) + " |")
        if any(c.collapsed for r in t.rows for c in r.cells.values()):
            out += ["", collapse_legend(_threshold(report, t.profile))]
        out.append("")
    return "\n".join(out)


GENERATED = "<!-- below: `mima report --markdown` output; `--into` replaces it -->"


def write_into(path, markdown: str) -> None:
    """Replace what follows the :data:`GENERATED` line of a Markdown file with ``markdown`` (the text above it stays);
    a file without that line gets it, and the tables, at its end. Written atomically."""
    from engine.runs import atomic_write

    text = path.read_text(encoding="utf-8") if path.exists() else ""
    head = text.split(GENERATED, 1)[0].rstrip("\n")
    atomic_write(path, (head + "\n\n" if head else "") + GENERATED + "\n\n" + markdown.rstrip("\n") + "\n")


def _csv(report) -> str:
    rows = report.rows_flat()
    buf = io.StringIO()
    fields = ["table", "profile", "family", "attacks", "method", "metric", "group", "value", "success", "targets",
              "share", "collapsed", "step", "runs", "note"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in fields})
    return buf.getvalue()


def _charts(report, width: int) -> None:
    """One chart per (profile, group, attack): mean M(x^r, .) over the targets vs attack step, x^A and each method's
    x^T, for the first metric that has curves."""
    import plotext as plt

    curves = report.curves()
    if not curves:
        return
    keys = list(dict.fromkeys((c["profile"], c["group"], c["attack"]) for c in curves))
    for key in keys:
        mine = [c for c in curves if (c["profile"], c["group"], c["attack"]) == key]
        metric = mine[0]["metric"]
        mine = [c for c in mine if c["metric"] == metric]
        plt.clear_figure()
        plt.plotsize(min(width, 100), 14)
        series = [("x^A (unimmunized)", mine[0]["steps"], mine[0]["x^A"])]
        series += [(f"{c['method']} x^T", c["steps"], c["x^T"]) for c in mine]
        for i, (label, steps, values) in enumerate(series):
            pts = [(s, v) for s, v in zip(steps, values) if v is not None]
            if pts:
                plt.plot([s for s, _ in pts], [v for _, v in pts], label=label, marker=MARKERS[i % len(MARKERS)])
        what = "acc" if metric.endswith("-acc") else "M(x^r, ·)"
        plt.title(f"{metric} {what}, mean over targets — {key[1]} / {key[2]}")
        plt.xlabel("attack step")
        console.print(Text.from_ansi(plt.build()))


def report_cmd(
    ctx: typer.Context,
    runs: list[str] = typer.Argument(None, help="Runs to report (attack, immunization or evaluate runs; default: every "
                                                "finished attack pair, the newest per profile/group/method/attack)."),
    step: int = typer.Option(None, "--step", min=0, help="Attack step to report (default: each pair's last)."),
    json_out: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
    csv_out: bool = typer.Option(False, "--csv", help="Print one CSV row per table cell."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the tables as Markdown."),
    into: Path = typer.Option(None, "--into", metavar="FILE.md",
                              help="With --markdown: write the tables into FILE.md below its generated-tables line "
                                   "(the text above it stays) instead of printing them."),
    grid: str = typer.Option(None, "--grid", metavar="FILE.png",
                             help="Write the qualitative grid: per concept, reference | unimmunized | immunized."),
    chart: bool = typer.Option(True, "--chart/--no-chart", help="Similarity-vs-attack-step charts after the tables."),
) -> None:
    """Tables like the paper's (rows method x metric, columns groups + average), MRSGR, attack success, charts.

    Example: mima report --markdown
    """
    from engine.errors import EvaluationError
    from engine.report import build_report, collect_pairs, qualitative_grid

    if sum(map(bool, (json_out, csv_out, markdown))) > 1:
        fail("choose one of --json, --csv, --markdown", EXIT_USAGE)
    if into is not None and not markdown:
        fail("--into writes Markdown: add --markdown", EXIT_USAGE)
    rd = runs_dir(ctx)
    try:
        pairs = collect_pairs(rd, runs or None)
    except EvaluationError as e:
        fail(e, EXIT_USAGE)
    if not pairs:
        fail(f"no finished attack pairs in {rd}; run `mima attack` first", EXIT_USAGE)
    report = build_report(pairs, step)
    for r in report.refused:
        warn(f"randomly initialised backbone refused: {r}")
    if grid:
        from mima_cli.attack import quiet_model_loading

        quiet_model_loading()
        try:
            path = qualitative_grid(pairs, grid, runs_dir=rd, step=step)
        except ValueError as e:
            fail(e, EXIT_FAILURE)
    if json_out:
        print_json(report.to_dict())
    elif csv_out:
        typer.echo(_csv(report), nl=False)
    elif markdown and into is not None:
        write_into(into, _markdown(report))
        err_console.print(f"wrote the tables into {into}", highlight=False)
    elif markdown:
        typer.echo(_markdown(report))
    else:
        for u in report.utility:
            console.print(_rich_utility(u))
        for t in report.tables:
            console.print(_rich_table(t, _threshold(report, t.profile)))
        notes = {n for t in report.tables if t.kind == "msgr" for r in t.rows for c in r.cells.values() if c.note
                 for n in [c.note]}
        for n in sorted(notes):
            console.print(f"[yellow]*[/] {n}", highlight=False, style="dim")
        if chart:
            _charts(report, console.width)
    if not json_out and report.collapsed:
        warn_collapsed(report.collapsed)
    if grid:
        (err_console if json_out or csv_out or markdown else console).print(f"grid: {path}", highlight=False)


def warn_collapsed(models: list[str]) -> None:
    warn(f"collapsed (no longer draws the other concepts, without attack): {', '.join(models)}")


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
