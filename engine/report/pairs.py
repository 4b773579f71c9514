"""Attack pairs and their metric events, as the report reads them (:class:`PairSummary`, :func:`collect_pairs`).

Numbers come only from metric events (see :mod:`engine.metrics.pairs`): those an attack run logged live, overridden
by later ``evaluate`` runs of the same pair (events tagged ``attack_run``). Events of randomly initialised backbones
(tag ``random_init``) are refused and listed under ``refused``. Each pair carries the utility of its immunization run
(newest evaluate run first, else the run's own measurement).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.attacks.plan import PERSONALIZATION
from engine.runs import Pair, Runs

__all__ = ["METHOD_ORDER", "METRIC_ORDER", "PairSummary", "collect_pairs", "family_of", "metric_events",
           "newest_utility"]

METHOD_ORDER = ("mima", "jt", "cp", "imma", "alternating", "none")
METRIC_ORDER = ("clip", "dino", "lpips", "judge", "judge-acc")
A_PAIRS, T_PAIRS = ("r-A", "A"), ("r-T", "T")

def family_of(attack: str) -> str:
    return "personalization" if attack in PERSONALIZATION else "re-learning"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _order(items: Iterable[str], first: Sequence[str]) -> list[str]:
    items = list(dict.fromkeys(items))
    return sorted(items, key=lambda x: (first.index(x) if x in first else len(first), x))


# --------------------------------------------------------------------------------------------- pairs


def _sides_mean(per: dict, concepts: list[str], step: int | None) -> tuple[float | None, float | None]:
    """(x^T, x^A) means of ``per[side][step][concept]`` over ``concepts``; None where one is missing."""
    out = []
    for side in ("T", "A"):
        values = [per.get(side, {}).get(step, {}).get(c) for c in concepts]
        out.append(sum(values) / len(values) if values and all(_finite(v) for v in values) else None)
    return out[0], out[1]


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
        return _sides_mean(self.other_sims.get(metric, {}), self.others, step)

    def attacked_targets(self, metric: str, step: int | None) -> tuple[float | None, float | None]:
        """Mean ``metric`` accuracy over the targets after the attack at ``step``: (immunized model x^T, twin x^A)."""
        return _sides_mean(self.sims.get(metric, {}), self.targets, step)

    def curve(self, metric: str, side: str) -> dict[int, float]:
        """Mean over the targets of ``sims[metric][side]`` at every step where all targets have a value."""
        out = {}
        for step, per in sorted(self.sims.get(metric, {}).get(side, {}).items()):
            values = [per.get(c) for c in self.targets]
            if values and all(_finite(v) for v in values):
                out[step] = sum(values) / len(values)
        return out


def metric_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """The ``metric`` events of the run in ``run_dir``, in the order they were logged."""
    from engine.runs import RunReader

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


def _summary(pair: Pair, evaluate_runs: Sequence[tuple[str, list[dict]]], runs: Runs) -> PairSummary:
    st, links = pair.status, pair.links
    summary = PairSummary(
        run=st.id, twin=pair.twin.name, run_dir=pair.run, twin_dir=pair.twin, profile=st.profile, group=st.group,
        group_size=int(links.group_size or len(links.targets) or 1), method=links.method, attack=str(st.method),
        state=str(st.state), immunize_run=links.immunize_run, targets=list(links.targets), others=list(links.others))
    for e in metric_events(pair.run):
        if not (e.get("tags") or {}).get("attack_run"):
            _apply(summary, e, summary.run)
    for eval_id, events in evaluate_runs:
        for e in events:
            if (e.get("tags") or {}).get("attack_run") == summary.run:
                _apply(summary, e, eval_id)
    summary.utility = newest_utility(runs, summary.immunize_run, evaluate_runs)
    return summary


def newest_utility(runs: Runs, immunize_run: str | None, evaluate_runs: Sequence[tuple[str, list[dict]]]):
    """The newest :class:`~engine.metrics.utility.Utility` of an immunization run (None without one): from the last
    of ``evaluate_runs`` (``(run id, its metric events)``, oldest first; ``mima evaluate --utility``) that measured
    it, else the run's own."""
    from engine.metrics.utility import EVENT, Utility, read_utility

    if not immunize_run:
        return None
    for _, events in reversed(evaluate_runs):
        found = [e for e in events if e.get("name") == EVENT and (e.get("tags") or {}).get("model_run") == immunize_run
                 and isinstance(e.get("summary"), dict)]
        if found:
            return Utility.from_dict(found[-1]["summary"])
    run_dir = runs.dir_of(immunize_run, runs.runs_dir)
    return read_utility(run_dir) if run_dir is not None else None


def collect_pairs(runs_dir: str | Path, refs: Sequence[str] | None = None, *, latest_only: bool = True) -> list[PairSummary]:
    """Attack pairs with their metric events.

    ``refs``: run references (attack, immunization or evaluate runs; see :func:`engine.runs.pairs`);
    None = every *finished* pair under ``runs_dir``, keeping only the newest per (profile, group, method, attack)
    when ``latest_only``.
    """
    from engine.runs import pairs as find_pairs

    runs_dir = Path(runs_dir)
    runs = Runs.scan(runs_dir)
    evaluate_runs = [(r.id, metric_events(r.dir)) for r in runs.select("evaluate", state=None)]
    pairs = [_summary(p, evaluate_runs, runs) for p in find_pairs(runs_dir, refs)]
    if latest_only and not refs:
        newest: dict[tuple, PairSummary] = {}
        for p in pairs:  # ids sort by start time
            newest[(p.profile, p.group, p.method, p.attack)] = p
        pairs = list(newest.values())
    return sorted(pairs, key=lambda p: p.run)
