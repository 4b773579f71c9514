"""Follow a runs directory from a worker thread and post typed messages to the UI.

The watcher only reads: ``status.json`` (re-read when its mtime or size changes) and ``events.jsonl``
(by byte offset with :class:`engine.runs.EventFollower`, so each byte is read once and a half-written
last line waits for the next poll). It never locks or writes anything in a run directory, so the jobs
it watches are not slowed down.

Two depths of following:

* every run: the last ``tail_bytes`` of its events (progress and messages, for steps/s, ETA and the
  last message) -> :class:`RunsScanned`, posted only when something changed;
* the runs the UI asks for with :meth:`RunsWatcher.watch` (the open run and its twin): every event from
  the start -> :class:`RunEvents`, one message per run and poll (a burst of lines is one message),
  split into chunks of ``chunk`` events so a long history never blocks the UI for long.

Messages are posted with ``post`` (``App.post_message``, which is thread-safe).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual.message import Message

from engine.runs import EVENTS_FILE, STATUS_FILE, EventFollower, read_status
from mima_cli.tui.data import RateMeter, RunSummary

__all__ = ["RunsScanned", "RunEvents", "RunGone", "WatchError", "RunsWatcher"]


class RunsScanned(Message):
    """The runs under the runs directory now (oldest first). A newer scan replaces a pending one."""

    def __init__(self, runs: list[RunSummary]) -> None:
        super().__init__()
        self.runs = runs

    def can_replace(self, message: Message) -> bool:
        # Textual drops this (older) message when the next pending one is also a full scan.
        return isinstance(message, RunsScanned)


class RunEvents(Message):
    """New events of a watched run; ``reset``: forget what was read before (file replaced or re-watched)."""

    def __init__(self, run_id: str, run_dir: str, events: list[dict[str, Any]], reset: bool = False) -> None:
        super().__init__()
        self.run_id = run_id
        self.run_dir = run_dir
        self.events = events
        self.reset = reset


class RunGone(Message):
    """A run directory disappeared (deleted or moved)."""

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id


class WatchError(Message):
    """An unexpected error in one poll; the watcher keeps going."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


@dataclass
class _Tracked:
    dir: Path
    status: dict[str, Any]
    status_sig: tuple[int, int] | None
    tail: EventFollower
    meter: RateMeter
    events_size: int = -1
    last_message: str | None = None


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


class RunsWatcher:
    """Poll ``runs_dir`` every ``interval`` seconds on a daemon thread; see the module docstring."""

    def __init__(
        self,
        runs_dir: str | os.PathLike,
        post: Callable[[Message], Any],
        *,
        interval: float = 0.5,
        tail_bytes: int = 64 * 1024,
        chunk: int = 5000,
    ) -> None:
        self.runs_dir = Path(runs_dir)
        self.post = post
        self.interval = interval
        self.tail_bytes = tail_bytes
        self.chunk = chunk
        self._runs: dict[str, _Tracked] = {}
        self._full: dict[str, EventFollower] = {}
        self._wanted: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_scan: tuple[Any, ...] | None = None
        self.polls = 0

    # -- control (any thread) -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mima-tui-watcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def wake(self) -> None:
        """Poll now instead of at the end of the current interval."""
        self._wake.set()

    def watch(self, run_ids: Iterable[str]) -> None:
        """Follow every event of these runs (replaces the previous set; new ones start from byte 0)."""
        with self._lock:
            self._wanted = {r for r in run_ids if r}
        self.wake()

    # -- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as e:  # keep watching whatever happens to one poll
                self.post(WatchError(f"{type(e).__name__}: {e}"))
            self._wake.wait(self.interval)
            self._wake.clear()

    def poll_once(self) -> None:
        """One poll: scan the runs directory, then read new events of the watched runs."""
        self.polls += 1
        self._scan()
        with self._lock:
            wanted = set(self._wanted)
        for run_id in list(self._full):
            if run_id not in wanted or run_id not in self._runs:
                del self._full[run_id]
        for run_id in sorted(wanted):
            tracked = self._runs.get(run_id)
            if tracked is None:
                continue
            follower = self._full.get(run_id)
            reset = follower is None
            if follower is None:
                follower = self._full[run_id] = EventFollower(tracked.dir / EVENTS_FILE)
            elif 0 <= _size(follower.path) < follower.offset:
                reset = True  # replaced by a shorter file: EventFollower starts again at 0 (missing: being deleted)
            events = follower.poll()
            if not events and not reset:
                continue
            for start in range(0, max(len(events), 1), self.chunk):
                part = events[start : start + self.chunk]
                self.post(RunEvents(run_id, str(tracked.dir), part, reset=reset and start == 0))

    def _scan(self) -> None:
        try:
            entries = sorted(os.scandir(self.runs_dir), key=lambda e: e.name)
        except OSError:  # missing (not created yet, or deleted), not a directory, unreadable
            entries = []
        seen: set[str] = set()
        for entry in entries:
            try:
                if not entry.is_dir():
                    continue
            except OSError:
                continue
            path = Path(entry.path)
            status_sig = _signature(path / STATUS_FILE)
            events_size = _size(path / EVENTS_FILE)
            if status_sig is None and events_size < 0:
                continue  # not a run directory (or not one yet)
            seen.add(entry.name)
            tracked = self._runs.get(entry.name)
            if tracked is None:
                tail_start = max(0, events_size - self.tail_bytes)
                tracked = self._runs[entry.name] = _Tracked(
                    path, read_status(path), status_sig, EventFollower(path / EVENTS_FILE, tail_start), RateMeter()
                )
            elif status_sig != tracked.status_sig:
                tracked.status, tracked.status_sig = read_status(path), status_sig
            if events_size != tracked.events_size:
                if 0 <= events_size < tracked.tail.offset:
                    tracked.meter = RateMeter()  # replaced by a shorter file
                tracked.events_size = events_size
                for event in tracked.tail.poll():
                    kind = event.get("kind")
                    if kind == "progress":
                        tracked.meter.add(event)
                    elif kind == "status" and event.get("name") == "message":
                        tracked.last_message = str(event.get("value"))
        for run_id in [r for r in self._runs if r not in seen]:
            del self._runs[run_id]
            self._full.pop(run_id, None)
            self.post(RunGone(run_id))
        summaries = [self._summary(run_id, t) for run_id, t in sorted(self._runs.items())]
        signature = tuple(
            (s.id, tuple(sorted((k, repr(v)) for k, v in s.status.items())), s.step, s.total, s.last_message)
            for s in summaries
        )
        if signature != self._last_scan:
            self._last_scan = signature
            self.post(RunsScanned(summaries))

    @staticmethod
    def _summary(run_id: str, tracked: _Tracked) -> RunSummary:
        meter = tracked.meter
        running = tracked.status.get("state") == "running"
        return RunSummary(
            id=run_id,
            dir=str(tracked.dir),
            status=dict(tracked.status),
            step=meter.step,
            total=meter.total,
            rate=meter.rate,
            eta=meter.eta if running else None,
            last_message=tracked.last_message,
        )

