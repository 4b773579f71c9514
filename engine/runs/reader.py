"""Read run directories: :class:`RunReader`, :class:`EventFollower` (a growing ``events.jsonl``), :func:`read_status`,
:func:`list_runs` and :func:`find_run` (a run by id, prefix, path or ``latest``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .status import EVENTS_FILE, PROFILE_FILE, STATUS_FILE, RunStatus

__all__ = ["EventFollower", "RunReader", "RunNotFound", "read_status", "load_status", "list_runs", "find_run"]


class EventFollower:
    """Follow a growing ``events.jsonl`` by byte offset.

    :meth:`poll` returns the events of the complete lines added since the last call. An incomplete last
    line (the writer is mid-write) is left for the next poll; a complete line that is not valid JSON is
    skipped and counted in ``skipped``. If the file shrinks (replaced), reading restarts at 0.
    """

    def __init__(self, path: str | os.PathLike, offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset
        self.skipped = 0

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset:
                    self.offset = 0
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        events = []
        for line in data[: end + 1].splitlines():
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.skipped += 1
                continue
            if isinstance(event, dict):
                events.append(event)
            else:
                self.skipped += 1
        self.offset += end + 1
        return events

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The events available now (one poll)."""
        return iter(self.poll())


def read_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``status.json`` of a run; never raises for a damaged or missing file.

    A missing or unreadable status gives ``state = "unknown"`` and an ``error`` saying why.
    """
    run_dir = Path(run_dir)
    base = {"id": run_dir.name, "state": "unknown", "progress": 0.0, "error": None}
    try:
        status = json.loads((run_dir / STATUS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {**base, "error": "no status.json"}
    except (OSError, ValueError) as e:
        return {**base, "error": f"unreadable status.json: {e}"}
    if not isinstance(status, dict):
        return {**base, "error": "status.json is not a JSON object"}
    status.setdefault("id", run_dir.name)
    return status


def load_status(run_dir: str | os.PathLike) -> RunStatus:
    """:func:`read_status`, typed (:class:`~engine.runs.RunStatus`, ``dir`` set); never raises either."""
    return RunStatus.of({**read_status(run_dir), "dir": str(run_dir)})


class RunReader:
    """Read a run directory written by :class:`RunWriter`."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.dir = Path(run_dir)
        self.id = self.dir.name

    @property
    def events_path(self) -> Path:
        return self.dir / EVENTS_FILE

    def status(self) -> dict[str, Any]:
        return read_status(self.dir)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """All complete events so far (optionally of one kind)."""
        events = EventFollower(self.events_path).poll()
        return [e for e in events if e.get("kind") == kind] if kind else events

    def follow(self) -> EventFollower:
        return EventFollower(self.events_path)

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last scalar/metric event of each ``phase:name`` (plus tags), in first-seen order."""
        latest: dict[str, dict[str, Any]] = {}
        for event in self.events():
            if event.get("kind") not in ("scalar", "metric"):
                continue
            key = f"{event.get('phase')}:{event.get('name')}"
            tags = event.get("tags")
            if tags:
                key += " " + " ".join(f"{k}={v}" for k, v in sorted(tags.items()))
            latest[key] = event
        return latest

    def profile_text(self) -> str | None:
        try:
            return (self.dir / PROFILE_FILE).read_text(encoding="utf-8")
        except OSError:
            return None

    def profile(self) -> Any:
        """The run's resolved profile (``engine.profile.Profile``)."""
        from engine.profile import load_profile

        return load_profile(self.dir / PROFILE_FILE)

    def samples(self) -> list[Path]:
        try:
            return sorted(self.dir.joinpath("samples").glob("*.png"))
        except OSError:
            return []


class RunNotFound(LookupError, UsageError):
    """No run (or more than one) matches a reference."""


def _is_run_dir(path: Path) -> bool:
    try:
        return path.is_dir() and ((path / STATUS_FILE).exists() or (path / EVENTS_FILE).exists())
    except OSError:
        return False


def list_runs(runs_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Status of every run under ``runs_dir``, oldest first (ids sort by start time).

    Tolerates a missing ``runs_dir``, damaged status files (``state = "unknown"``) and runs deleted
    while listing. Each status has ``dir`` (the run directory) added.
    """
    try:
        entries = sorted(os.scandir(runs_dir), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    runs = []
    for entry in entries:
        path = Path(entry.path)
        if not _is_run_dir(path):
            continue
        status = read_status(path)
        if status.get("state") == "unknown" and not path.exists():
            continue  # deleted underneath us
        status["dir"] = str(path)
        runs.append(status)
    return runs


def find_run(runs_dir: str | os.PathLike, ref: str) -> Path:
    """The run directory ``ref`` names: a path, an id, ``latest``, or a unique part of an id."""
    path = Path(ref)
    if _is_run_dir(path):
        return path
    runs = [Path(r["dir"]) for r in list_runs(runs_dir)]
    if not runs:
        raise RunNotFound(f"no runs in {runs_dir}")
    if ref in ("latest", "last"):
        return runs[-1]
    for run in runs:
        if run.name == ref:
            return run
    matches = [r for r in runs if r.name.startswith(ref)] or [r for r in runs if ref in r.name]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise RunNotFound(f"no run matches '{ref}' in {runs_dir}")
    names = ", ".join(m.name for m in matches[:5]) + (", ..." if len(matches) > 5 else "")
    raise RunNotFound(f"'{ref}' matches {len(matches)} runs: {names}")
