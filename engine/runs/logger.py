"""The logger Protocol the training loops call, and the two loggers that are not a run directory.

A :class:`~engine.runs.RunWriter` writes a run directory; :class:`MemoryLogger` keeps the events in a list (tests);
:class:`NullLogger` drops them. Training loops take any of them and never print.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .files import jsonable

__all__ = ["EventLogger", "NullLogger", "MemoryLogger"]


@runtime_checkable
class EventLogger(Protocol):
    """What training loops call. Implemented by :class:`~engine.runs.RunWriter`, :class:`MemoryLogger`,
    :class:`NullLogger`."""

    def log_scalar(self, name: str, value: float, step: int | None = None, **tags: Any) -> None: ...

    def log_metric(self, name: str, value: Any, step: int | None = None, **tags: Any) -> None: ...

    def log_image(self, name: str, step: int | None, image: Any, **tags: Any) -> Path | None: ...

    def log_status(self, message: str) -> None: ...

    def progress(self, step: int, total: int) -> None: ...


class NullLogger:
    """An :class:`EventLogger` that drops everything."""

    def log_scalar(self, name: str, value: float, step: int | None = None, **tags: Any) -> None:
        pass

    def log_metric(self, name: str, value: Any, step: int | None = None, **tags: Any) -> None:
        pass

    def log_image(self, name: str, step: int | None, image: Any, **tags: Any) -> Path | None:
        return None

    def log_status(self, message: str) -> None:
        pass

    def progress(self, step: int, total: int) -> None:
        pass


class MemoryLogger:
    """An :class:`EventLogger` that keeps events in ``self.events`` (images as objects under ``"image"``)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def _add(self, kind: str, name: str, step: int | None, tags: dict[str, Any], **fields: Any) -> None:
        event = {"kind": kind, "name": name, "step": step, **fields}
        if tags:
            event["tags"] = tags
        self.events.append(event)

    def log_scalar(self, name: str, value: float, step: int | None = None, **tags: Any) -> None:
        self._add("scalar", name, step, tags, value=jsonable(value))

    def log_metric(self, name: str, value: Any, step: int | None = None, **tags: Any) -> None:
        self._add("metric", name, step, tags, value=jsonable(value))

    def log_image(self, name: str, step: int | None, image: Any, **tags: Any) -> Path | None:
        self._add("image", name, step, tags, image=image)
        return None

    def log_status(self, message: str) -> None:
        self._add("status", "message", None, {}, value=message)

    def progress(self, step: int, total: int) -> None:
        self._add("progress", "progress", step, {}, value=step / total if total else 1.0, total=total)

    def scalars(self, name: str) -> list[float]:
        """Values of the scalar ``name``, in logging order."""
        return [e["value"] for e in self.events if e["kind"] == "scalar" and e["name"] == name]
