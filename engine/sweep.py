"""``sweep``: the trade-off between utility and immunity over settings of a profile.

    from engine.sweep import settings_grid, sweep
    grid = settings_grid(["immunize.outer_lr=1e-3,3e-4", "immunize.preserve_weight=0,10"])   # 4 settings
    points = sweep(profile_path, grid, methods=["mima", "cp"], runs_dir="runs", groups=["g3-1"])

Each setting is the profile with its ``--set`` overrides; for each one the reproduction's tasks run (erase, immunize
with each method, attack each immunized model and the twin; no control re-run), so a sweep resumes like ``mima
reproduce``: finished runs of the same profile contents are reused. One :class:`Point` per (setting, method,
group): the immunized model's utility without attack (its other concepts' and its targets' primary score, from
:mod:`engine.metrics.utility`), the targets' judge accuracy after the attack on it and on its twin, MSGR, MRSGR
and the other concepts' attack success (learnability), at the report step.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Point:
    setting: dict[str, Any]
    method: str
    group: str | None
    others: float | None = None
    """Utility without attack: mean primary score of the other concepts (judge accuracy on the testbed)."""
    others_worst: str | None = None
    others_min: float | None = None
    """The other concept with the lowest utility without attack, and its score (the bar asks each one to hold)."""
    targets: float | None = None
    """Utility without attack of the targets."""
    parent_others: float | None = None
    collapsed: bool | None = None
    targets_attacked: float | None = None
    """The targets' judge accuracy after the attack on the immunized model (mean over attacks): lower = immune."""
    twin_attacked: float | None = None
    """The same on the unimmunized twin: how well the attack works without immunization."""
    others_attacked: float | None = None
    twin_others_attacked: float | None = None
    msgr: dict[str, float | None] = field(default_factory=dict)
    mrsgr: dict[str, float | None] = field(default_factory=dict)
    immunize_run: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def split_values(text: str) -> list[str]:
    """``a,b,[c, d]`` -> ``["a", "b", "[c, d]"]``: commas inside brackets or quotes do not split."""
    out, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    out.append(cur)
    return [v.strip() for v in out if v.strip()]


def settings_grid(sets: Sequence[str]) -> list[dict[str, str]]:
    """Every combination of ``key=v1,v2,...`` (in order: the last key varies fastest)."""
    axes = []
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value1,value2,...")
        key, _, values = item.partition("=")
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z_][\w.-]*", key):
            raise ValueError(f"--set {item!r}: bad key {key!r}")
        vals = split_values(values)
        if not vals:
            raise ValueError(f"--set {item!r}: no values")
        axes.append([(key, v) for v in vals])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def points_of(runs_dir: Path, setting: dict[str, str], immunize_runs: Sequence[Path]) -> list[Point]:
    """The :class:`Point` of each immunization run (its attack pairs averaged over attacks)."""
    from .report import collect_pairs, mean_if_finite

    pairs = collect_pairs(runs_dir, [r.name for r in immunize_runs]) if immunize_runs else []
    out = []
    for run in immunize_runs:
        mine = [p for p in pairs if p.immunize_run == run.name and p.method != "none"]
        if not mine:
            continue
        first = mine[0]
        u = first.utility
        steps = [p.report_step(None) for p in mine]
        point = Point(setting=dict(setting), method=first.method, group=first.group, immunize_run=run.name)
        if u is not None:
            point.others, point.targets = u.role_mean("model", "other"), u.role_mean("model", "target")
            point.parent_others, point.collapsed = u.role_mean("parent", "other"), u.collapsed
            point.others_worst, point.others_min = u.role_worst("model", "other") or (None, None)
        acc = "judge-acc"

        def target_acc(p, side, s):
            per = p.sims.get(acc, {}).get(side, {}).get(s, {})
            return mean_if_finite([per.get(c) for c in p.targets])

        point.targets_attacked = mean_if_finite([target_acc(p, "T", s) for p, s in zip(mine, steps)])
        point.twin_attacked = mean_if_finite([target_acc(p, "A", s) for p, s in zip(mine, steps)])
        learn = [p.learnability(acc, s) for p, s in zip(mine, steps)]
        point.others_attacked = mean_if_finite([t for t, _ in learn])
        point.twin_others_attacked = mean_if_finite([a for _, a in learn])
        for kind in ("msgr", "mrsgr"):
            metrics = {m for p, s in zip(mine, steps) for m in getattr(p, kind).get(s, {})}
            getattr(point, kind).update({m: mean_if_finite([getattr(p, kind).get(s, {}).get(m, {}).get("value")
                                                             for p, s in zip(mine, steps)]) for m in sorted(metrics)})
        out.append(point)
    return out


def write_jsonl(path: Path, points: Sequence[Point]) -> None:
    from .runs import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(p.to_json() + "\n" for p in points))


def sweep(profile_source: str, grid: Sequence[dict[str, str]], *, methods: Sequence[str], runs_dir: str | Path,
          groups: Sequence[str] | None = None, base_sets: Sequence[str] = (), device: str | None = None,
          jobs: int | str = 1, out: str | Path | None = None, progress=None, status=None,
          worker_init=None) -> list[Point]:
    """Run every setting of ``grid`` (see the module docstring); returns the points, written to ``out`` (JSON lines,
    rewritten after each setting) when given."""
    from .profile import load_profile
    from .reproduce import reproduce

    runs_dir = Path(runs_dir)
    say = status or (lambda msg: None)
    points: list[Point] = []
    for i, setting in enumerate(grid):
        overrides = [*base_sets, *(f"{k}={v}" for k, v in setting.items())]
        profile = load_profile(profile_source, overrides)
        say(f"setting {i + 1}/{len(grid)}: " + (", ".join(f"{k}={v}" for k, v in setting.items()) or "the profile"))
        log = reproduce(profile, runs_dir=runs_dir, profile_name=profile_source, methods=methods, groups=groups,
                        control=False, device=device, jobs=jobs, progress=progress, status=status,
                        worker_init=worker_init)
        points += points_of(runs_dir, setting, log.immunize_runs)
        if out is not None:
            write_jsonl(Path(out), points)
    return points


def plot(points: Sequence[Point], out: str | Path, *, utility_bar: float = 0.9, immunity_bar: float = 0.3,
         title: str = "") -> Path:
    """A PNG of utility (others, no attack) against the targets' accuracy after the attack: one curve per method,
    each point labelled with its setting; the utility bar and the immunity bar drawn in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=120)
    methods = list(dict.fromkeys(p.method for p in points))
    for m in methods:
        mine = [p for p in points if p.method == m and p.others is not None and p.targets_attacked is not None]
        if not mine:
            continue
        mine.sort(key=lambda p: (p.targets_attacked, p.others))
        xs, ys = [p.targets_attacked for p in mine], [p.others for p in mine]
        line, = ax.plot(xs, ys, marker="o", label=m)
        for p in mine:
            label = " ".join(f"{k.split('.')[-1]}={v}" for k, v in p.setting.items())
            ax.annotate(label + (" (collapsed)" if p.collapsed else ""), (p.targets_attacked, p.others),
                        fontsize=6, xytext=(3, 3), textcoords="offset points", color=line.get_color())
    twins = [p.twin_attacked for p in points if p.twin_attacked is not None]
    if twins:
        ax.axvline(sum(twins) / len(twins), color="grey", linestyle=":", label="twin (no immunization)")
    ax.axhline(utility_bar, color="green", linestyle="--", label=f"utility bar ({utility_bar:.2f})")
    ax.axvline(immunity_bar, color="red", linestyle="--", label=f"immunity bar ({immunity_bar:.2f})")
    ax.set_xlabel("targets' judge accuracy after the attack (lower = more immune)")
    ax.set_ylabel("other concepts' judge accuracy, no attack (utility)")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "utility vs immunity", fontsize=9)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out
