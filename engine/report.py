"""The paper's result tables from a runs directory: what ``mima report`` prints (and ``--json`` gives).

    from engine.report import collect_pairs, build_report
    report = build_report(collect_pairs("runs"))          # every finished attack pair
    report.to_dict()["tables"][0]["rows"][0]["cells"]     # MSGR per group, with the attack's success beside it

Numbers come only from metric events (see :mod:`engine.evaluate`): those an attack run logged live, overridden by
later ``evaluate`` runs of the same pair (events tagged ``attack_run``). Events of randomly initialised backbones
(tag ``random_init``) are refused and listed under ``refused``.

Layout (PAPER.md, Tables 1-3): one table per profile and attack family — *re-learning* (``lora``) and
*personalization* (the mean over the personalization attacks present: dreambooth, dreambooth-lora,
textual-inversion, custom-diffusion) — with rows immunization method x metric, columns the groups (2-concept
groups, then 3-concept groups, ...) and their average; an MRSGR table of the same shape. Each cell carries the
attack's success on the unimmunized twin (``success/judge-acc``: the judge's accuracy on x^A), without which an
MSGR means little. The ``none`` row is the control of :mod:`engine.attack_runs` (the unimmunized model attacked
twice with the same seeds: 0 when the attack is deterministic).

Beside them, per profile, a *utility* table (:class:`UtilityTable`, from each immunization run's utility
measurement, :mod:`engine.metrics.utility`): rows base, parent and each method, cells the primary utility of the
targets and of the other concepts without attack. A method whose model is collapsed in a group has ``collapsed`` set
on its cells of every table, so no number of a model that no longer draws reads as immunization. A *learnability*
table (kind ``learn``) shows the other concepts' attack success on the immunized model beside the twin's.

Reported step: ``step`` if given, else the last attack step each pair has MSGR events for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .attack_runs import PERSONALIZATION
from .evaluate import is_compared_run, load_eval_images, resolve_pairs
from .metrics import ACCURACY_METRICS

METHOD_ORDER = ("mima", "jt", "cp", "imma", "alternating", "none")
METRIC_ORDER = ("clip", "dino", "lpips", "judge", "judge-acc")
A_PAIRS, T_PAIRS = ("r-A", "A"), ("r-T", "T")

__all__ = ["PairSummary", "Cell", "Row", "Table", "Report", "collect_pairs", "build_report", "family_of",
           "qualitative_grid"]


def family_of(attack: str) -> str:
    return "personalization" if attack in PERSONALIZATION else "re-learning"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _order(items: Iterable[str], first: Sequence[str]) -> list[str]:
    items = list(dict.fromkeys(items))
    return sorted(items, key=lambda x: (first.index(x) if x in first else len(first), x))


# --------------------------------------------------------------------------------------------- pairs


@dataclass
class PairSummary:
    """Everything the report needs of one attack pair (the immunized attack run and its unimmunized twin)."""

    run: str
    twin: str
    run_dir: Path
    twin_dir: Path
    profile: str | None
    group: str | None
    group_size: int
    method: str
    """The immunization method (``none`` for the control re-run)."""
    attack: str
    state: str
    immunize_run: str | None
    targets: list[str]
    others: list[str]
    msgr: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """step -> metric -> ``{"value", "note", "source"}`` (source: the run that logged it)."""
    mrsgr: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    success: dict[int, dict[str, float | None]] = field(default_factory=dict)
    """step -> accuracy metric -> mean acc(x^A) over the targets."""
    sims: dict[str, dict[str, dict[int, dict[str, float | None]]]] = field(default_factory=dict)
    """metric -> ``A`` | ``T`` -> step -> concept -> value (M(x^r, x^A) / M(x^r, x^T), or accuracies)."""
    other_sims: dict[str, dict[str, dict[int, dict[str, float | None]]]] = field(default_factory=dict)
    """The same for the other concepts (accuracy metrics: how well the attack teaches them, immunized or not)."""
    refused: list[str] = field(default_factory=list)
    utility: Any = None
    """The :class:`~engine.metrics.utility.Utility` of the immunization run (newest evaluate run first), or None."""

    @property
    def steps(self) -> list[int]:
        return sorted(self.msgr)

    def metrics(self) -> list[str]:
        return _order({m for per in self.msgr.values() for m in per}, METRIC_ORDER)

    def report_step(self, step: int | None) -> int | None:
        if step is not None:
            return step
        return self.steps[-1] if self.steps else None

    def learnability(self, metric: str, step: int | None) -> tuple[float | None, float | None]:
        """Mean ``metric`` accuracy over the other concepts at ``step``: (immunized model x^T, unimmunized twin x^A)."""
        per = self.other_sims.get(metric, {})
        out = []
        for side in ("T", "A"):
            values = [per.get(side, {}).get(step, {}).get(c) for c in self.others]
            out.append(sum(values) / len(values) if values and all(_finite(v) for v in values) else None)
        return out[0], out[1]

    def curve(self, metric: str, side: str) -> dict[int, float]:
        """Mean over the targets of ``sims[metric][side]`` at every step where all targets have a value."""
        out = {}
        for step, per in sorted(self.sims.get(metric, {}).get(side, {}).items()):
            values = [per.get(c) for c in self.targets]
            if values and all(_finite(v) for v in values):
                out[step] = sum(values) / len(values)
        return out


def _metric_events(run_dir: Path) -> list[dict[str, Any]]:
    from .runs import RunReader

    return RunReader(run_dir).events("metric")


def _apply(pair: PairSummary, event: Mapping[str, Any], source: str) -> None:
    tags = event.get("tags") or {}
    name = str(event.get("name", ""))
    step = event.get("step", tags.get("step"))
    if step is None:
        return
    step = int(step)
    prefix, _, rest = name.partition("/")
    metric = str(tags.get("metric") or rest.split("/", 1)[0])
    if tags.get("random_init"):
        if metric not in pair.refused:
            pair.refused.append(metric)
        return
    value = event.get("value")
    value = float(value) if _finite(value) else None
    if prefix in ("msgr", "mrsgr"):
        entry = {"value": value, "note": event.get("note"), "source": source}
        if prefix == "mrsgr":
            entry.update(target_mean=event.get("target_mean"), other_mean=event.get("other_mean"))
        getattr(pair, prefix).setdefault(step, {})[metric] = entry
    elif prefix == "success":
        pair.success.setdefault(step, {})[metric] = value
    elif prefix == "sim" and tags.get("role") in ("target", "other"):
        side = "A" if tags.get("pair") in A_PAIRS else "T" if tags.get("pair") in T_PAIRS else None
        if side:
            concept = str(tags.get("concept"))
            sims = pair.sims if tags.get("role") == "target" else pair.other_sims
            sims.setdefault(metric, {}).setdefault(side, {}).setdefault(step, {})[concept] = value


def _summary(runs_dir: Path, st: Mapping[str, Any], evaluate_runs: Sequence[tuple[str, list[dict]]]) -> PairSummary | None:
    from .runs import find_run, RunNotFound

    extra = st.get("extra") or {}
    if not st.get("twin"):
        return None
    try:
        twin_dir = find_run(runs_dir, st["twin"])
    except RunNotFound:
        return None
    run_dir = Path(st.get("dir") or Path(runs_dir) / st["id"])
    pair = PairSummary(
        run=st["id"], twin=twin_dir.name, run_dir=run_dir, twin_dir=twin_dir, profile=st.get("profile"),
        group=st.get("group"), group_size=int(extra.get("group_size") or len(extra.get("targets") or []) or 1),
        method="none" if extra.get("control") else str(extra.get("immunize_method") or "?"),
        attack=str(st.get("method")), state=str(st.get("state")), immunize_run=extra.get("immunize_run"),
        targets=list(extra.get("targets") or []), others=list(extra.get("others") or []))
    for e in _metric_events(run_dir):
        if not (e.get("tags") or {}).get("attack_run"):
            _apply(pair, e, pair.run)
    for eval_id, events in evaluate_runs:
        for e in events:
            if (e.get("tags") or {}).get("attack_run") == pair.run:
                _apply(pair, e, eval_id)
    pair.utility = _utility(runs_dir, pair.immunize_run, evaluate_runs)
    return pair


def _utility(runs_dir: Path, immunize_run: str | None, evaluate_runs: Sequence[tuple[str, list[dict]]]):
    """The newest utility of an immunization run: from an evaluate run (``mima evaluate --utility``), else its own."""
    from .metrics.utility import EVENT, Utility, read_utility
    from .runs import RunNotFound, find_run

    if not immunize_run:
        return None
    for _, events in reversed(evaluate_runs):
        found = [e for e in events if e.get("name") == EVENT and (e.get("tags") or {}).get("model_run") == immunize_run
                 and isinstance(e.get("summary"), dict)]
        if found:
            return Utility.from_dict(found[-1]["summary"])
    try:
        return read_utility(find_run(runs_dir, immunize_run))
    except RunNotFound:
        return None


def collect_pairs(runs_dir: str | Path, refs: Sequence[str] | None = None, *, latest_only: bool = True) -> list[PairSummary]:
    """Attack pairs with their metric events.

    ``refs``: run references (attack, immunization or evaluate runs; see :func:`engine.evaluate.resolve_pairs`);
    None = every *finished* pair under ``runs_dir``, keeping only the newest per (profile, group, method, attack)
    when ``latest_only``.
    """
    from .runs import list_runs, read_status

    runs_dir = Path(runs_dir)
    runs = list_runs(runs_dir)
    evaluate_runs = [(r["id"], _metric_events(Path(r["dir"]))) for r in runs if r.get("kind") == "evaluate"]
    if refs:
        statuses = []
        for p in resolve_pairs(runs_dir, refs):
            st = read_status(p.run)
            st["dir"] = str(p.run)
            statuses.append(st)
    else:
        statuses = [r for r in runs if is_compared_run(r) and r.get("state") == "finished"]
    pairs = [p for p in (_summary(runs_dir, st, evaluate_runs) for st in statuses) if p is not None]
    if latest_only and not refs:
        newest: dict[tuple, PairSummary] = {}
        for p in pairs:  # ids sort by start time
            newest[(p.profile, p.group, p.method, p.attack)] = p
        pairs = list(newest.values())
    return sorted(pairs, key=lambda p: p.run)


# --------------------------------------------------------------------------------------------- tables


@dataclass
class Cell:
    value: float | None
    success: float | None = None
    attacks: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    note: str | None = None
    collapsed: bool = False
    """The immunized model of this cell is collapsed (see :mod:`engine.metrics.utility`): its number measures a
    model that no longer draws, not an immunized one."""

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "success": self.success, "attacks": self.attacks, "runs": self.runs,
                "steps": self.steps, "note": self.note, "collapsed": self.collapsed}


@dataclass
class Row:
    method: str
    metric: str
    cells: dict[str, Cell]
    average: Cell


@dataclass
class Table:
    kind: str  # "msgr" | "mrsgr" | "learn" (the others' attack success: immunized model, twin beside it)
    profile: str | None
    family: str
    attacks: list[str]
    groups: list[str]
    group_sizes: dict[str, int]
    rows: list[Row]

    @property
    def title(self) -> str:
        what = {"msgr": "MSGR (%)", "mrsgr": "MRSGR (%)",
                "learn": "Learnability: the other concepts' attack success, immunized (unimmunized twin)"}[self.kind]
        how = (f"re-learning ({', '.join(self.attacks)})" if self.family == "re-learning"
               else f"personalization (mean of {len(self.attacks)} attack{'s' if len(self.attacks) != 1 else ''}: "
                    f"{', '.join(self.attacks)})")
        return f"{what} — {self.profile or 'profile ?'} — {how}"

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "kind": self.kind, "profile": self.profile, "family": self.family,
                "attacks": self.attacks, "groups": self.groups, "group_sizes": self.group_sizes,
                "rows": [{"method": r.method, "metric": r.metric,
                          "cells": {g: c.to_dict() for g, c in r.cells.items()}, "average": r.average.to_dict()}
                         for r in self.rows]}


@dataclass
class UtilityCell:
    """Utility without attack of one model in one group: primary score of its targets and others, the others'
    share of the parent's."""

    targets: float | None
    others: float | None
    share: float | None = None
    collapsed: bool = False
    runs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"targets": self.targets, "others": self.others, "share": self.share, "collapsed": self.collapsed,
                "runs": self.runs}


@dataclass
class UtilityRow:
    model: str
    """``base``, ``parent`` or an immunization method."""
    cells: dict[str, UtilityCell]
    average: UtilityCell


@dataclass
class UtilityTable:
    profile: str | None
    metric: str
    threshold: float
    groups: list[str]
    group_sizes: dict[str, int]
    rows: list[UtilityRow]
    unmeasured: list[str] = field(default_factory=list)
    """``method (group)`` of immunized models whose utility was never measured."""

    @property
    def title(self) -> str:
        return f"Utility without attack ({self.metric}: targets / others) — {self.profile or 'profile ?'}"

    @property
    def collapsed(self) -> list[str]:
        """``method (group)`` of every collapsed model."""
        return [f"{r.model} ({g})" for r in self.rows for g, c in r.cells.items() if c.collapsed]

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "kind": "utility", "profile": self.profile, "metric": self.metric,
                "threshold": self.threshold, "groups": self.groups, "group_sizes": self.group_sizes,
                "rows": [{"model": r.model, "cells": {g: c.to_dict() for g, c in r.cells.items()},
                          "average": r.average.to_dict()} for r in self.rows],
                "collapsed": self.collapsed, "unmeasured": self.unmeasured}


@dataclass
class Report:
    step: int | None
    tables: list[Table]
    pairs: list[PairSummary]
    refused: list[str]
    utility: list[UtilityTable] = field(default_factory=list)

    @property
    def collapsed(self) -> list[str]:
        """``profile: method (group)`` of every collapsed immunized model in the report."""
        return [f"{t.profile}: {c}" for t in self.utility for c in t.collapsed]

    def curves(self) -> list[dict[str, Any]]:
        """Similarity vs attack step per pair and metric: mean over targets of M(x^r, x^A) and M(x^r, x^T)."""
        out = []
        for p in self.pairs:
            for metric in _order(p.sims, METRIC_ORDER):
                a, t = p.curve(metric, "A"), p.curve(metric, "T")
                steps = sorted(set(a) | set(t))
                if steps:
                    out.append({"run": p.run, "twin": p.twin, "profile": p.profile, "group": p.group,
                                "method": p.method, "attack": p.attack, "metric": metric, "steps": steps,
                                "x^A": [a.get(s) for s in steps], "x^T": [t.get(s) for s in steps]})
        return out

    def to_dict(self) -> dict[str, Any]:
        pairs = []
        for p in self.pairs:
            s = p.report_step(self.step)
            pairs.append({
                "run": p.run, "twin": p.twin, "profile": p.profile, "group": p.group, "method": p.method,
                "attack": p.attack, "state": p.state, "immunize_run": p.immunize_run, "targets": p.targets,
                "others": p.others, "step": s,
                "msgr": {m: e["value"] for m, e in p.msgr.get(s, {}).items()},
                "mrsgr": {m: e["value"] for m, e in p.mrsgr.get(s, {}).items()},
                "success": dict(p.success.get(s, {})),
                "notes": {f"{k}/{m}": e["note"] for k in ("msgr", "mrsgr") for m, e in getattr(p, k).get(s, {}).items()
                          if e.get("note")},
                "sources": sorted({e["source"] for k in ("msgr", "mrsgr") for e in getattr(p, k).get(s, {}).values()}),
                "steps": p.steps,
                "utility": p.utility.to_dict() if p.utility is not None else None,
            })
        return {"step": self.step, "utility": [t.to_dict() for t in self.utility],
                "tables": [t.to_dict() for t in self.tables], "pairs": pairs, "curves": self.curves(),
                "refused": self.refused, "collapsed": self.collapsed}

    def rows_flat(self) -> list[dict[str, Any]]:
        """One dict per table cell (the CSV)."""
        out = []
        for u in self.utility:
            for r in u.rows:
                for g, c in [*r.cells.items(), ("average", r.average)]:
                    out.append({"table": "utility", "profile": u.profile, "family": "", "attacks": "",
                                "method": r.model, "metric": u.metric, "group": g, "value": c.others,
                                "success": None, "targets": c.targets, "share": c.share, "collapsed": c.collapsed,
                                "step": "", "runs": " ".join(c.runs), "note": ""})
        for t in self.tables:
            for r in t.rows:
                for g, c in [*r.cells.items(), ("average", r.average)]:
                    out.append({"table": t.kind, "profile": t.profile, "family": t.family,
                                "attacks": " ".join(c.attacks or t.attacks), "method": r.method, "metric": r.metric,
                                "group": g, "value": c.value, "success": c.success, "targets": None, "share": None,
                                "collapsed": c.collapsed, "step": " ".join(map(str, c.steps)),
                                "runs": " ".join(c.runs), "note": c.note or ""})
        return out


def _mean(values: list[float | None]) -> float | None:
    return sum(values) / len(values) if values and all(_finite(v) for v in values) else None


def _collapsed(p: PairSummary) -> bool:
    return p.method != "none" and p.utility is not None and p.utility.collapsed


def _learn_cell(pairs: list[PairSummary], metric: str, step: int | None) -> Cell:
    """The others' success: mean acc(x^T) (value) and acc(x^A) (success) over the pairs' attacks."""
    mine, twin, steps = [], [], []
    for p in pairs:
        s = p.report_step(step)
        steps.append(s)
        t, a = p.learnability(metric, s) if s is not None else (None, None)
        mine.append(t)
        twin.append(a)
    note = None if all(_finite(v) for v in mine) else "no other concepts attacked (or no accuracy metric)"
    return Cell(_mean(mine), _mean(twin), [p.attack for p in pairs], [p.run for p in pairs],
                sorted({s for s in steps if s is not None}), note, any(_collapsed(p) for p in pairs))


def _cell(pairs: list[PairSummary], kind: str, metric: str, step: int | None) -> Cell:
    if kind == "learn":
        return _learn_cell(pairs, metric, step)
    values, successes, notes, steps = [], [], [], []
    for p in pairs:
        s = p.report_step(step)
        steps.append(s)
        entry = getattr(p, kind).get(s, {}).get(metric) if s is not None else None
        if entry is None:
            values.append(None)
            notes.append(f"{p.attack}: no {kind} at step {s}" if s is not None else f"{p.attack}: no {kind} yet")
        else:
            values.append(entry["value"])
            if entry.get("note"):
                notes.append(f"{p.attack}: {entry['note']}")
        acc = p.success.get(s, {}) if s is not None else {}
        successes.append(acc.get("judge-acc", next(iter(acc.values()), None)) if acc else None)
    value = _mean(values)
    success = _mean(successes) if all(v is not None for v in successes) else None
    return Cell(value, success, [p.attack for p in pairs], [p.run for p in pairs], sorted({s for s in steps if s is not None}),
                "; ".join(notes) or None, any(_collapsed(p) for p in pairs))


def _average(cells: Mapping[str, Cell]) -> Cell:
    values = [c.value for c in cells.values() if _finite(c.value)]
    successes = [c.success for c in cells.values() if _finite(c.success)]
    n, of = len(values), len(cells)
    note = None if n == of else f"mean of {n} of {of} groups (the others are undefined)"
    return Cell(sum(values) / n if n else None, sum(successes) / len(successes) if successes else None,
                note=note, collapsed=any(c.collapsed for c in cells.values()))


def _utility_cell(pairs: list[PairSummary], model: str) -> UtilityCell | None:
    """Utility of ``model`` (``base``, ``parent`` or the pairs' immunized model) from the first pair that has it."""
    for p in pairs:
        u = p.utility
        if u is None:
            continue
        which = model if model in ("base", "parent") else "model"
        others, parent = u.role_mean(which, "other"), u.role_mean("parent", "other")
        share = others / parent if others is not None and parent else None
        collapsed = which == "model" and u.collapsed
        runs = [p.immunize_run] if p.immunize_run else []
        return UtilityCell(u.role_mean(which, "target"), others, share, collapsed, runs)
    return None


def _utility_table(profile: str, members: list[PairSummary], groups: list[str], sizes: dict[str, int]) -> UtilityTable | None:
    measured = [p for p in members if p.utility is not None]
    if not measured:
        return None
    metric, threshold = measured[0].utility.primary, measured[0].utility.threshold
    methods = _order({p.method for p in members if p.method != "none"}, METHOD_ORDER)
    rows = []
    for model in ("base", "parent", *methods):
        cells = {}
        for g in groups:
            in_group = [p for p in measured if (p.group or "-") == g and (model in ("base", "parent") or p.method == model)]
            cell = _utility_cell(in_group, model)
            if cell is not None:
                cells[g] = cell
        if cells:
            rows.append(UtilityRow(model, cells, UtilityCell(
                _mean([c.targets for c in cells.values()]), _mean([c.others for c in cells.values()]),
                _mean([c.share for c in cells.values()]), any(c.collapsed for c in cells.values()))))
    unmeasured = sorted({f"{p.method} ({p.group or '-'})" for p in members if p.method != "none" and p.utility is None})
    return UtilityTable(profile or None, metric, threshold, groups, sizes, rows, unmeasured)


def build_report(pairs: Sequence[PairSummary], step: int | None = None) -> Report:
    """The tables (see the module docstring) of ``pairs`` at ``step`` (default: each pair's last step)."""
    tables: list[Table] = []
    utility: dict[str, UtilityTable] = {}
    by_table: dict[tuple, list[PairSummary]] = {}
    for p in pairs:
        by_table.setdefault((p.profile or "", family_of(p.attack)), []).append(p)
    for (profile, family), members in sorted(by_table.items(), key=lambda kv: (kv[0][0], kv[0][1] != "re-learning")):
        sizes = {p.group or "-": p.group_size for p in members}
        groups = sorted(sizes, key=lambda g: (sizes[g], g))
        attacks = _order({p.attack for p in members}, ("lora", *PERSONALIZATION))
        methods = _order({p.method for p in members}, METHOD_ORDER)
        metrics = _order({m for p in members for m in p.metrics()}, METRIC_ORDER)
        if profile not in utility:
            in_profile = [p for p in pairs if (p.profile or "") == profile]
            all_sizes = {p.group or "-": p.group_size for p in in_profile}
            table = _utility_table(profile, in_profile, sorted(all_sizes, key=lambda g: (all_sizes[g], g)), all_sizes)
            if table is not None:
                utility[profile] = table
        accuracy = [m for m in metrics if m in ACCURACY_METRICS]
        for kind in ("msgr", "mrsgr", "learn"):
            rows = []
            for method in methods:
                for metric in metrics if kind != "learn" else accuracy:
                    cells = {}
                    for g in groups:
                        cell_pairs = [p for p in members if p.method == method and (p.group or "-") == g]
                        if cell_pairs:
                            cells[g] = _cell(sorted(cell_pairs, key=lambda p: attacks.index(p.attack)), kind, metric, step)
                    if cells:
                        rows.append(Row(method, metric, cells, _average(cells)))
            if rows or kind != "learn":
                tables.append(Table(kind, profile or None, family, attacks, groups, sizes, rows))
    refused = sorted({f"{p.run}: {m}" for p in pairs for m in p.refused})
    return Report(step, tables, list(pairs), refused, list(utility.values()))


# ---------------------------------------------------------------------------------------------- grid


def qualitative_grid(pairs: Sequence[PairSummary], out: str | Path, *, runs_dir: str | Path, step: int | None = None,
                     images_per_set: int = 2, device: str | None = None) -> Path:
    """The paper's qualitative figure: per pair and target concept, one row ``reference | unimmunized after attack |
    immunized after attack`` (``images_per_set`` images each) at the reported step; written as PNG."""
    import numpy as np
    from PIL import Image, ImageDraw

    from .evaluate import load_references
    from .profile import load_profile

    rows: list[tuple[str, list[np.ndarray]]] = []
    for p in pairs:
        s = p.report_step(step)
        if s is None:
            continue
        profile = load_profile(p.run_dir / "profile.toml")
        for c in p.targets:
            t, a = load_eval_images(p.run_dir, c, s), load_eval_images(p.twin_dir, c, s)
            if t is None or a is None:
                continue
            size = t.images.shape[1]
            ref = load_references(profile, [c], size, runs_dir, device)[c]
            k = images_per_set
            blank = np.full_like(t.images[0], 255)
            sets = [list(x[:k]) + [blank] * (k - len(x[:k])) for x in (ref, a.images, t.images)]
            rows.append((f"{c} | {p.method} | {p.attack} @ {s}", [im for x in sets for im in x]))
    if not rows:
        raise ValueError("no pair has evaluation images of both twins at the reported step")
    size = max(96, max(im.shape[0] for _, ims in rows for im in ims))  # labels need room next to tiny images
    k = images_per_set
    label_h, header_h, gap = 14, 16, 6
    width = 3 * k * size + 2 * gap
    height = header_h + len(rows) * (label_h + size)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate(("reference", "unimmunized + attack", "immunized + attack")):
        draw.text((i * (k * size + gap) + 2, 2), title, fill="black")
    y = header_h
    for label, ims in rows:
        draw.text((2, y + 1), label, fill="black")
        y += label_h
        for j, im in enumerate(ims):
            x = (j // k) * (k * size + gap) + (j % k) * size
            canvas.paste(Image.fromarray(np.asarray(im)).resize((size, size)), (x, y))
        y += size
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return out
