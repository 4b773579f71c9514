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
    refused: list[str] = field(default_factory=list)

    @property
    def steps(self) -> list[int]:
        return sorted(self.msgr)

    def metrics(self) -> list[str]:
        return _order({m for per in self.msgr.values() for m in per}, METRIC_ORDER)

    def report_step(self, step: int | None) -> int | None:
        if step is not None:
            return step
        return self.steps[-1] if self.steps else None

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
    elif prefix == "sim" and tags.get("role") == "target":
        side = "A" if tags.get("pair") in A_PAIRS else "T" if tags.get("pair") in T_PAIRS else None
        if side:
            concept = str(tags.get("concept"))
            pair.sims.setdefault(metric, {}).setdefault(side, {}).setdefault(step, {})[concept] = value


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
    return pair


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

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "success": self.success, "attacks": self.attacks, "runs": self.runs,
                "steps": self.steps, "note": self.note}


@dataclass
class Row:
    method: str
    metric: str
    cells: dict[str, Cell]
    average: Cell


@dataclass
class Table:
    kind: str  # "msgr" | "mrsgr"
    profile: str | None
    family: str
    attacks: list[str]
    groups: list[str]
    group_sizes: dict[str, int]
    rows: list[Row]

    @property
    def title(self) -> str:
        what = "MSGR" if self.kind == "msgr" else "MRSGR"
        how = (f"re-learning ({', '.join(self.attacks)})" if self.family == "re-learning"
               else f"personalization (mean of {len(self.attacks)} attack{'s' if len(self.attacks) != 1 else ''}: "
                    f"{', '.join(self.attacks)})")
        return f"{what} (%) — {self.profile or 'profile ?'} — {how}"

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "kind": self.kind, "profile": self.profile, "family": self.family,
                "attacks": self.attacks, "groups": self.groups, "group_sizes": self.group_sizes,
                "rows": [{"method": r.method, "metric": r.metric,
                          "cells": {g: c.to_dict() for g, c in r.cells.items()}, "average": r.average.to_dict()}
                         for r in self.rows]}


@dataclass
class Report:
    step: int | None
    tables: list[Table]
    pairs: list[PairSummary]
    refused: list[str]

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
            })
        return {"step": self.step, "tables": [t.to_dict() for t in self.tables], "pairs": pairs,
                "curves": self.curves(), "refused": self.refused}

    def rows_flat(self) -> list[dict[str, Any]]:
        """One dict per table cell (the CSV)."""
        out = []
        for t in self.tables:
            for r in t.rows:
                for g, c in [*r.cells.items(), ("average", r.average)]:
                    out.append({"table": t.kind, "profile": t.profile, "family": t.family,
                                "attacks": " ".join(c.attacks or t.attacks), "method": r.method, "metric": r.metric,
                                "group": g, "value": c.value, "success": c.success,
                                "step": " ".join(map(str, c.steps)), "runs": " ".join(c.runs), "note": c.note or ""})
        return out


def _mean(values: list[float | None]) -> float | None:
    return sum(values) / len(values) if values and all(_finite(v) for v in values) else None


def _cell(pairs: list[PairSummary], kind: str, metric: str, step: int | None) -> Cell:
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
                "; ".join(notes) or None)


def _average(cells: Mapping[str, Cell]) -> Cell:
    values = [c.value for c in cells.values() if _finite(c.value)]
    successes = [c.success for c in cells.values() if _finite(c.success)]
    n, of = len(values), len(cells)
    note = None if n == of else f"mean of {n} of {of} groups (the others are undefined)"
    return Cell(sum(values) / n if n else None, sum(successes) / len(successes) if successes else None,
                note=note)


def build_report(pairs: Sequence[PairSummary], step: int | None = None) -> Report:
    """The tables (see the module docstring) of ``pairs`` at ``step`` (default: each pair's last step)."""
    tables: list[Table] = []
    by_table: dict[tuple, list[PairSummary]] = {}
    for p in pairs:
        by_table.setdefault((p.profile or "", family_of(p.attack)), []).append(p)
    for (profile, family), members in sorted(by_table.items(), key=lambda kv: (kv[0][0], kv[0][1] != "re-learning")):
        sizes = {p.group or "-": p.group_size for p in members}
        groups = sorted(sizes, key=lambda g: (sizes[g], g))
        attacks = _order({p.attack for p in members}, ("lora", *PERSONALIZATION))
        methods = _order({p.method for p in members}, METHOD_ORDER)
        metrics = _order({m for p in members for m in p.metrics()}, METRIC_ORDER)
        for kind in ("msgr", "mrsgr"):
            rows = []
            for method in methods:
                for metric in metrics:
                    cells = {}
                    for g in groups:
                        cell_pairs = [p for p in members if p.method == method and (p.group or "-") == g]
                        if cell_pairs:
                            cells[g] = _cell(sorted(cell_pairs, key=lambda p: attacks.index(p.attack)), kind, metric, step)
                    if cells:
                        rows.append(Row(method, metric, cells, _average(cells)))
            tables.append(Table(kind, profile or None, family, attacks, groups, sizes, rows))
    refused = sorted({f"{p.run}: {m}" for p in pairs for m in p.refused})
    return Report(step, tables, list(pairs), refused)


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
