"""One trade-off plot from several sweeps' JSON lines, each file's points relabelled, e.g.

    python experiments/tradeoff_plot.py docs/selective-tradeoff.png "paper=docs/sweeps/g3-1-paper.jsonl" \
        "selective=docs/sweeps/g3-1-selective.jsonl"

draws one curve per method and label ("mima (paper)", "cp (paper)", "mima (selective)", ...).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.sweep import Point, plot


def main(argv: list[str]) -> int:
    out, *sources = argv
    points = []
    for source in sources:
        label, _, path = source.partition("=")
        for line in Path(path).read_text().splitlines():
            d = json.loads(line)
            known = {k: v for k, v in d.items() if k in Point.__dataclass_fields__}
            p = Point(**known)
            p.method = f"{p.method} ({label})"
            points.append(p)
    plot(points, out, title="testbed g3-1, LoRA 80 steps: utility vs immunity")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
