"""Files that readers may open at any moment: one atomic write for every file the project replaces.

    atomic_write(run / "status.json", json.dumps(status))           # text (UTF-8)
    atomic_write(path, lambda tmp: save_file(tensors, tmp))         # any writer that takes a path
    atomic_savez(path, images=images, seeds=seeds)                  # numpy arrays

A reader sees the old file or the new one, never half of it: the data goes to a hidden temporary file beside the
target (``.<name>.<pid>.<thread>.tmp``), which then replaces the target with ``os.replace``. A failed write leaves
no temporary file behind.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_savez", "jsonable", "slug"]


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Path], Any]) -> Path:
    """Replace ``path`` atomically with ``data``: text (written as UTF-8), bytes, or a function that writes the file
    at the temporary path it is given. Returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        elif isinstance(data, (bytes, bytearray)):
            tmp.write_bytes(data)
        else:
            data(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_savez(path: str | os.PathLike, **arrays: Any) -> Path:
    """``np.savez(path, **arrays)``, atomically (the parent folder is created)."""
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: savez would append ".npz" to a name without it
            np.savez(f, **arrays)

    return atomic_write(path, write)


def jsonable(value: Any) -> Any:
    """``value`` as JSON can hold it (tensors and numpy values as numbers or lists, paths as strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    return str(value)


def slug(text: str) -> str:
    """Lowercase letters, digits and dots; every other run of characters becomes one ``-``."""
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-")
