"""What the dashboard knows about runs, built only from run-directory events (no Textual here).

:class:`RunData` folds the events of one run (see :mod:`engine.runs` for the schema) into what the run
screen draws: scalar series, the latest image per name, the metric table and the status messages.
:class:`RateMeter` turns progress events into steps/s and an ETA for the runs list.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

PRIMARY_GROUPS = ("inner_loss", "outer_loss", "prior_loss", "loss")
"""Scalar groups drawn first, in this order (then every other scalar group, by name)."""

SUMMARY_ROWS = ("msgr", "mrsgr")
"""Metric name prefixes that are summary rows of the metric table (``msgr/<metric>``)."""

MAX_MESSAGES = 500


# ------------------------------------------------------------------------------------------ formatting


def fmt_value(value: Any) -> str:
    """A metric or scalar value in a table cell."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else ""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    if isinstance(value, dict):
        text = " ".join(f"{k}={fmt_value(v)}" for k, v in value.items())
    elif isinstance(value, list):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text if len(text) <= 40 else text[:39] + "…"


def fmt_duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``3d04h``; empty for unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_rate(rate: float | None) -> str:
    if rate is None or not math.isfinite(rate) or rate <= 0:
        return ""
    return f"{rate:.3g}" if rate < 100 else f"{rate:.0f}"


def progress_bar(fraction: Any, width: int = 10) -> str:
    """``████▌     42%`` for a fraction in [0, 1]."""
    if not isinstance(fraction, (int, float)) or not math.isfinite(fraction):
        return ""
    fraction = min(max(float(fraction), 0.0), 1.0)
    eighths = int(round(fraction * width * 8))
    full, rest = divmod(eighths, 8)
    bar = "█" * full + ("" if rest == 0 else " ▏▎▍▌▋▊▉"[rest])
    return f"{bar:<{width}} {fraction:>4.0%}"


# ------------------------------------------------------------------------------------------- progress


class RateMeter:
    """Steps per second and ETA from progress events (``step``, ``total``, ``t``).

    The rate is measured over the progress events of the last ``window`` seconds of event time, so a
    run that was paused or restarted recovers quickly.
    """

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self.points: deque[tuple[float, int]] = deque(maxlen=512)
        self.step: int | None = None
        self.total: int | None = None

    def add(self, event: dict[str, Any]) -> None:
        t, step = event.get("t"), event.get("step")
        if not isinstance(t, (int, float)) or not isinstance(step, int):
            return
        if self.points and step < self.points[-1][1]:
            self.points.clear()  # a new phase started counting from 0
        total = event.get("total")
        self.total = total if isinstance(total, int) else self.total
        self.step = step
        self.points.append((float(t), step))
        while len(self.points) > 2 and self.points[-1][0] - self.points[0][0] > self.window:
            self.points.popleft()

    @property
    def rate(self) -> float | None:
        if len(self.points) < 2:
            return None
        (t0, s0), (t1, s1) = self.points[0], self.points[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    @property
    def eta(self) -> float | None:
        rate = self.rate
        if rate is None or self.total is None or self.step is None:
            return None
        return max(self.total - self.step, 0) / rate


@dataclass
class RunSummary:
    """One row of the runs screen: ``status.json`` plus what the tail of ``events.jsonl`` says."""

    id: str
    dir: str
    status: dict[str, Any]
    step: int | None = None
    total: int | None = None
    rate: float | None = None
    eta: float | None = None
    last_message: str | None = None

    def get(self, key: str, default: Any = None) -> Any:
        value = self.status.get(key)
        return default if value is None else value

    @property
    def state(self) -> str:
        return str(self.get("state", "unknown"))

    @property
    def running(self) -> bool:
        return self.state == "running"


# -------------------------------------------------------------------------------------------- run data


MAX_STRIP = 8
"""At most this many images of one name and step are shown side by side (e.g. one per evaluation seed)."""


@dataclass
class ImageRef:
    """The images logged under one name at its latest step: one, or one per seed (tag ``seed``)."""

    name: str
    label: str
    step: int | None
    paths: list[Path]
    count: int = 1
    tags: dict[str, Any] = field(default_factory=dict)
    seeds: list[Any] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.paths[0]

    @property
    def caption(self) -> str:
        parts = [self.label]
        if self.step is not None:
            parts.append(f"step {self.step}")
        if len(self.paths) > 1:
            parts.append(f"{len(self.paths)} seeds")
        return " · ".join(parts)


@dataclass
class LogLine:
    t: float | None
    phase: str
    text: str
    level: str = "info"  # info | state | error


def _tags(event: dict[str, Any]) -> dict[str, Any]:
    tags = event.get("tags")
    return tags if isinstance(tags, dict) else {}


def _seed_order(seed: Any) -> tuple[int, Any]:
    return (0, seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else (1, str(seed))


def series_key(event: dict[str, Any]) -> str:
    """``loss`` tagged ``concept=X`` and ``loss/X`` are the same series."""
    name = str(event.get("name", ""))
    concept = _tags(event).get("concept")
    if concept is not None and not name.endswith(f"/{concept}"):
        return f"{name}/{concept}"
    return name


def split_series(key: str) -> tuple[str, str]:
    """``inner_loss/Van Gogh`` -> (``inner_loss``, ``Van Gogh``); ``outer_loss`` -> (``outer_loss``, ``outer_loss``)."""
    group, sep, label = key.partition("/")
    return (group, label) if sep and label else (key, key)


class RunData:
    """Everything the run screen shows about one run, folded from its events."""

    def __init__(self, run_id: str, run_dir: str | Path) -> None:
        self.id = run_id
        self.dir = Path(run_dir)
        self.clear()

    def clear(self) -> None:
        self.scalars: dict[str, list[tuple[float, float]]] = {}
        self.images: dict[str, ImageRef] = {}
        self.metrics: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.messages: deque[LogLine] = deque(maxlen=MAX_MESSAGES)
        self.meter = RateMeter()
        self.message_count = 0
        self.t0: float | None = None
        self.events = 0
        self.version = 0
        self.gone = False
        self.utility: dict[str, Any] | None = None
        """The newest utility summary of the run (:mod:`engine.metrics.utility`), when it has one."""

    def apply(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            try:
                self._apply(event)
            except (TypeError, ValueError, AttributeError):
                continue  # a malformed event never stops the dashboard
            self.events += 1
        if events:
            self.version += 1

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        t = event.get("t")
        if self.t0 is None and isinstance(t, (int, float)):
            self.t0 = float(t)
        step = event.get("step")
        step = step if isinstance(step, int) and not isinstance(step, bool) else None
        if kind == "scalar":
            value = event.get("value")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return
            points = self.scalars.setdefault(series_key(event), [])
            points.append((float(step if step is not None else len(points)), float(value)))
        elif kind == "image":
            path = event.get("path")
            if not isinstance(path, str) or PurePosixPath(path).is_absolute() or ".." in PurePosixPath(path).parts:
                return  # only files inside the run directory are read
            key = series_key(event)
            tags = _tags(event)
            previous = self.images.get(key)
            if previous is not None:
                previous.count += 1
                if step is not None and previous.step is not None and step < previous.step:
                    return  # an older image logged late
                if step == previous.step:  # another seed of the same step: show them side by side
                    seed = tags.get("seed", len(previous.paths))
                    if len(previous.paths) < MAX_STRIP and seed not in previous.seeds:
                        at = sorted([*previous.seeds, seed], key=_seed_order).index(seed)
                        previous.seeds.insert(at, seed)
                        previous.paths.insert(at, self.dir / path)
                    return
            label = str(tags.get("concept") or split_series(key)[1])
            self.images[key] = ImageRef(
                key, label, step, [self.dir / path], (previous.count if previous else 1), tags,
                [tags.get("seed", 0)],
            )
        elif kind == "metric":
            tags = _tags(event)
            step = step if step is not None else tags.get("step")
            key = (event.get("name"), step, tuple(sorted((str(k), str(v)) for k, v in tags.items())))
            self.metrics.pop(key, None)
            self.metrics[key] = event
            if event.get("name") == "utility" and isinstance(event.get("summary"), dict):
                self.utility = event["summary"]
        elif kind == "progress":
            self.meter.add(event)
        elif kind == "status":
            name, value = event.get("name"), event.get("value")
            if name == "state":
                error = event.get("error")
                text = f"state: {value}" + (f" ({error})" if error else "")
                level = "error" if value == "failed" else "state"
            else:
                text, level = str(value), "info"
            self.messages.append(LogLine(t if isinstance(t, (int, float)) else None, str(event.get("phase") or ""), text, level))
            self.message_count += 1

    # -- views --------------------------------------------------------------------------------------

    def scalar_groups(self) -> dict[str, dict[str, list[tuple[float, float]]]]:
        """``{group: {label: points}}``, primary loss groups first (see :data:`PRIMARY_GROUPS`)."""
        groups: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for key, points in self.scalars.items():
            group, label = split_series(key)
            groups.setdefault(group, {})[label] = points
        order = [g for g in PRIMARY_GROUPS if g in groups] + sorted(g for g in groups if g not in PRIMARY_GROUPS)
        return {g: groups[g] for g in order}

    def utility_line(self) -> tuple[str, bool] | None:
        """``(one line, collapsed)`` of the run's utility without attack, or None when it has none."""
        from engine.metrics.utility import Utility

        if self.utility is None:
            return None
        try:
            u = Utility.from_dict(self.utility)
        except (KeyError, TypeError, ValueError):
            return None
        return u.describe(), u.collapsed

    def metric_table(self) -> MetricTable:
        return MetricTable.build(self.metrics.values())


# ---------------------------------------------------------------------------------------- metric table


@dataclass
class MetricTable:
    """Metric events pivoted: one row per (concept or summary, qualifiers, step), one column per metric.

    ``clip/Van Gogh`` tagged ``concept=Van Gogh, metric=clip, step=200`` lands in row ``Van Gogh``,
    step 200, column ``clip``; ``msgr/clip`` lands in row ``MSGR``, column ``clip``. Tags other than
    concept/metric/step (an attack, a group) qualify the row. The last value of a cell wins.
    """

    metrics: list[str]
    rows: list[tuple[str, str, str, dict[str, Any]]]  # (row label, qualifiers, step, {metric: value})

    @classmethod
    def build(cls, events: Any) -> MetricTable:
        metrics: list[str] = []
        rows: dict[tuple[str, str, str], dict[str, Any]] = {}
        for event in events:
            name = str(event.get("name", ""))
            tags = _tags(event)
            prefix, sep, rest = name.partition("/")
            if prefix.lower() in SUMMARY_ROWS and sep:
                row, metric = prefix.upper(), str(tags.get("metric") or rest)
            else:
                metric = str(tags.get("metric") or prefix)
                row = str(tags.get("concept") or (rest if sep else "run"))
            step = event.get("step")
            step = tags.get("step") if step is None else step
            qualifiers = " ".join(
                f"{k}={v}" for k, v in sorted(tags.items()) if k not in ("concept", "metric", "step")
            )
            key = (row, qualifiers, "" if step is None else str(step))
            rows.setdefault(key, {})[metric] = event.get("value")
            if metric not in metrics:
                metrics.append(metric)

        def order(item: tuple[tuple[str, str, str], dict[str, Any]]) -> tuple[int, str, float]:
            (row, qualifiers, step), _ = item
            summary = row.lower() in SUMMARY_ROWS
            try:
                step_n = float(step) if step else -1.0
            except ValueError:
                step_n = -1.0
            rank = SUMMARY_ROWS.index(row.lower()) + 1 if summary else 0
            return (rank, qualifiers, step_n)

        # concept rows keep first-seen order within the same qualifiers and step (sort is stable)
        ordered = sorted(rows.items(), key=order)
        return cls(metrics, [(r, q, s, values) for (r, q, s), values in ordered])

    @property
    def has_qualifiers(self) -> bool:
        return any(q for _, q, _, _ in self.rows)

    def latest(self) -> dict[tuple[str, str, str], Any]:
        """``{(row, qualifiers, metric): value}`` at the largest step of each cell (for comparisons)."""
        cells: dict[tuple[str, str, str], Any] = {}
        for row, qualifiers, _step, values in self.rows:  # rows are sorted by step
            for metric, value in values.items():
                cells[(row, qualifiers, metric)] = value
        return cells


def downsample(points: list[tuple[float, float]], limit: int) -> tuple[list[float], list[float]]:
    """At most ``limit`` finite points (bucket means), for plotting a long series in a narrow widget."""
    finite = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    if limit <= 0 or len(finite) <= limit:
        return [x for x, _ in finite], [y for _, y in finite]
    xs: list[float] = []
    ys: list[float] = []
    size = len(finite) / limit
    for i in range(limit):
        chunk = finite[int(i * size) : max(int((i + 1) * size), int(i * size) + 1)]
        xs.append(chunk[-1][0])
        ys.append(sum(y for _, y in chunk) / len(chunk))
    return xs, ys


# ------------------------------------------------------------------------------------------ compare cells

_PAIR_SIDES = {"T": ("T|A", True), "A": ("T|A", False), "r-T": ("r-T|r-A", True), "r-A": ("r-T|r-A", False)}
"""An attack pair's ``sim/`` events live in the immunized run, tagged with the side they measure: ``pair=T`` /
``r-T`` the immunized run's own images, ``pair=A`` / ``r-A`` its twin's (see :mod:`engine.metrics.pairs`)."""


def compare_cells(mine: dict[tuple[str, str, str], Any],
                  theirs: dict[tuple[str, str, str], Any]) -> dict[tuple[str, str, str], list[Any]]:
    """``{(row, qualifiers, metric): [this run's value, the twin's]}`` from two :meth:`MetricTable.latest` tables.

    A cell tagged with an attack pair's side goes to the run it measures, whichever of the two runs logged it, so
    the twin column of an attack pair is filled from the immunized run's events (``pair=T|A`` names both sides)."""
    cells: dict[tuple[str, str, str], list[Any]] = {}
    for table, is_mine in ((mine, True), (theirs, False)):
        for (row, qualifiers, metric), value in table.items():
            tokens = qualifiers.split()
            side = next((_PAIR_SIDES[t[5:]] for t in tokens if t.startswith("pair=") and t[5:] in _PAIR_SIDES), None)
            if side is None:
                cells.setdefault((row, qualifiers, metric), [None, None])[0 if is_mine else 1] = value
                continue
            label, own = side  # own: the value measures the run that logged it
            kept = " ".join([*(t for t in tokens if not t.startswith("pair=")), f"pair={label}"])
            cells.setdefault((row, kept, metric), [None, None])[0 if own == is_mine else 1] = value
    return cells
