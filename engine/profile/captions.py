"""The generic captions of the merge regulariser (``C_reg``): read and sampled."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

from .errors import ProfileError

__all__ = ["PACKAGE_DIR", "DATA_DIR", "default_captions_path", "read_captions", "sample_captions"]

PACKAGE_DIR = Path(__file__).resolve().parents[1]
"""The ``engine`` package folder."""
DATA_DIR = PACKAGE_DIR / "data"


def default_captions_path() -> Path:
    return DATA_DIR / "captions.txt"


def read_captions(path: str | os.PathLike | None = None) -> list[str]:
    """Non-empty, stripped lines of a caption file (default: the shipped generic captions)."""
    p = Path(path) if path is not None else default_captions_path()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ProfileError(f"cannot read caption file: {e.strerror or e}", path=p, field="regularization.captions") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ProfileError("caption file is empty", path=p, field="regularization.captions")
    return lines


def sample_captions(captions: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` captions drawn without replacement (all of them, shuffled, when there are fewer)."""
    rng = random.Random(seed)
    return rng.sample(list(captions), min(n, len(captions)))
