"""The paper's qualitative figure of attack pairs (``mima report --grid``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from engine.runs import load_eval_images

from .pairs import PairSummary

__all__ = ["qualitative_grid"]


def qualitative_grid(pairs: Sequence[PairSummary], out: str | Path, *, runs_dir: str | Path, step: int | None = None,
                     images_per_set: int = 2, device: str | None = None) -> Path:
    """The paper's qualitative figure: per pair and target concept, one row ``reference | unimmunized after attack |
    immunized after attack`` (``images_per_set`` images each) at the reported step; written as PNG."""
    import numpy as np
    from PIL import Image, ImageDraw

    from engine.image_sets import load_references
    from engine.profile import load_profile

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
