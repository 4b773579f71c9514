"""Run directories: what every job writes and what the TUI and reports read.

Layout of ``runs/<id>/``::

    profile.toml    the resolved profile (every default filled in); the run is reproducible from it
    events.jsonl    one JSON object per line, flushed per line (schema below)
    status.json     the run's current state, replaced atomically (temp file + os.replace)
    samples/        PNG images logged during the run
    checkpoints/    weights (safetensors / diffusers folders)

Run ids sort by start time: ``20261127-215000-immunize-mima-g2-1-ab12`` (UTC time, kind, method, group,
random suffix).

Event schema (``events.jsonl``)::

    t       float   unix time of the event
    run     str     run id
    phase   str     what part of the job emitted it ("immunize", "attack/lora", "eval", ...)
    step    int | null
    kind    "scalar" | "image" | "metric" | "status" | "progress"
    name    str     e.g. "loss/upper", "sample/Van Gogh", "msgr/clip", "state", "progress"
    value   scalar: number; metric: number, string or table; status: string
            (name "state": running|finished|failed|interrupted, name "message": free text);
            progress: fraction done in [0, 1]
    path    image only: PNG path relative to the run directory
    total   progress only: the step count the fraction refers to
    tags    optional table of labels, e.g. {"concept": "Van Gogh", "attack": "lora"}

Non-finite floats are written as ``NaN`` / ``Infinity`` (Python's ``json`` reads them back).

``status.json``::

    id, state (running|finished|failed|interrupted), progress (0..1), started, updated (unix times),
    error (message or null), kind (erase|immunize|attack|evaluate|...), method, profile, group,
    concepts (list), parent (run id this run started from), twin (run id of the matching run, e.g. the
    attack on the unimmunized model), base_model_hash, pid, extra (free table)

Training loops take an :class:`EventLogger` (a :class:`RunWriter`, :class:`MemoryLogger` in tests, or
:class:`NullLogger`) and never print.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .errors import UsageError

__all__ = [
    "EVENT_KINDS",
    "RUN_STATES",
    "EventLogger",
    "NullLogger",
    "MemoryLogger",
    "RunWriter",
    "RunReader",
    "EventFollower",
    "RunNotFound",
    "new_run_id",
    "list_runs",
    "find_run",
    "read_status",
    "update_status",
]

EVENT_KINDS = ("scalar", "image", "metric", "status", "progress")
RUN_STATES = ("running", "finished", "failed", "interrupted")
STATUS_FIELDS = (
    "id",
    "state",
    "progress",
    "started",
    "updated",
    "error",
    "kind",
    "method",
    "profile",
    "group",
    "concepts",
    "parent",
    "twin",
    "base_model_hash",
    "pid",
    "extra",
)
PROFILE_FILE = "profile.toml"
EVENTS_FILE = "events.jsonl"
STATUS_FILE = "status.json"


# ------------------------------------------------------------------------------------ logger protocol


@runtime_checkable
class EventLogger(Protocol):
    """What training loops call. Implemented by :class:`RunWriter`, :class:`MemoryLogger`, :class:`NullLogger`."""

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
        self._add("scalar", name, step, tags, value=_jsonable(value))

    def log_metric(self, name: str, value: Any, step: int | None = None, **tags: Any) -> None:
        self._add("metric", name, step, tags, value=_jsonable(value))

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


# ------------------------------------------------------------------------------------------- helpers


def _jsonable(value: Any) -> Any:
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
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def new_run_id(kind: str, method: str | None = None, group: str | None = None, *, now: float | None = None) -> str:
    """``YYYYMMDD-HHMMSS-kind-method-group-xxxx`` (UTC): sorts by start time."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    parts = [stamp, *(_slug(p) for p in (kind, method, group) if p), secrets.token_hex(2)]
    return "-".join(p for p in parts if p)


# -------------------------------------------------------------------------------------------- writer


class RunWriter:
    """Create ``runs_dir/<id>/`` and write its events, images and status.

    Use it as a context manager: an exception marks the run failed (with its message), Ctrl-C marks it
    interrupted, a clean exit finishes it. ``profile`` (an ``engine.profile.Profile``) is saved resolved
    as ``profile.toml``; ``profile_name`` is the name or path it came from (status field ``profile``).

        with RunWriter("runs", "immunize", method="mima", group="g2-1", profile=p) as run:
            for step in range(1, total + 1):
                run.log_scalar("loss/upper", loss, step)
                run.progress(step, total)
    """

    def __init__(
        self,
        runs_dir: str | os.PathLike,
        kind: str,
        *,
        method: str | None = None,
        profile: Any = None,
        profile_name: str | None = None,
        group: str | None = None,
        concepts: list[str] | tuple[str, ...] = (),
        parent: str | None = None,
        twin: str | None = None,
        base_model_hash: str | None = None,
        extra: dict[str, Any] | None = None,
        run_id: str | None = None,
        phase: str | None = None,
        status_interval: float = 0.5,
        resume: bool = False,
    ) -> None:
        if not kind or not re.fullmatch(r"[a-z0-9][a-z0-9-]*", kind):
            raise ValueError(f"run kind must be lowercase letters, digits and '-', got {kind!r}")
        runs_dir = Path(runs_dir)
        runs_dir.mkdir(parents=True, exist_ok=True)
        previous: dict[str, Any] = {}
        if resume:  # reopen an existing run: append to its events, keep its start time and links
            if run_id is None or not (runs_dir / run_id).is_dir():
                raise RunNotFound(f"no run {run_id!r} under {runs_dir} to resume")
            previous = read_status(runs_dir / run_id)
        while not resume:
            self.id = run_id or new_run_id(kind, method, group)
            self.dir = runs_dir / self.id
            try:
                self.dir.mkdir()
                break
            except FileExistsError:
                if run_id is not None:
                    raise
        if resume:
            self.id, self.dir = str(run_id), runs_dir / str(run_id)
        self.samples_dir = self.dir / "samples"
        self.checkpoints_dir = self.dir / "checkpoints"
        self.samples_dir.mkdir(exist_ok=resume)
        self.checkpoints_dir.mkdir(exist_ok=resume)
        self.phase = phase or kind
        self._lock = threading.RLock()
        self._status_interval = status_interval
        self._last_status_write = 0.0
        if profile is not None and not resume:
            from engine.profile import dump_profile

            (self.dir / PROFILE_FILE).write_text(
                dump_profile(profile, header=f"resolved profile of run {self.id}"), encoding="utf-8"
            )
        self._events = open(self.dir / EVENTS_FILE, "a", encoding="utf-8")
        now = time.time()
        self._status: dict[str, Any] = {
            "id": self.id,
            "state": "running",
            "progress": 0.0,
            "started": now,
            "updated": now,
            "error": None,
            "kind": kind,
            "method": method,
            "profile": profile_name,
            "group": group,
            "concepts": list(concepts),
            "parent": parent,
            "twin": twin,
            "base_model_hash": base_model_hash,
            "pid": os.getpid(),
            "extra": dict(extra or {}),
        }
        if resume:
            keep = ("started", "kind", "method", "profile", "group", "concepts", "parent", "twin", "base_model_hash")
            self._status.update({k: previous[k] for k in keep if previous.get(k) is not None})
            self._status["extra"] = {**previous.get("extra", {}), **self._status["extra"]}
        self._write_status()
        self.log("status", "state", "running")

    # -- context manager ------------------------------------------------------------------------

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc_type is None:
            if self.state == "running":
                self.finish()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.interrupt()
        else:
            self.fail(f"{exc_type.__name__}: {exc}" if str(exc) else exc_type.__name__)
        self.close()
        return False

    # -- properties -----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._status["state"]

    @property
    def status(self) -> dict[str, Any]:
        """A copy of the current ``status.json`` content."""
        with self._lock:
            return json.loads(json.dumps(self._status))

    @property
    def events_path(self) -> Path:
        return self.dir / EVENTS_FILE

    @property
    def status_path(self) -> Path:
        return self.dir / STATUS_FILE

    # -- events ---------------------------------------------------------------------------------

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def log(
        self,
        kind: str,
        name: str,
        value: Any = None,
        *,
        step: int | None = None,
        phase: str | None = None,
        tags: dict[str, Any] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Append one event (see the module docstring) and flush it."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"event kind must be one of {EVENT_KINDS}, got {kind!r}")
        event: dict[str, Any] = {
            "t": round(time.time(), 3),
            "run": self.id,
            "phase": phase or self.phase,
            "step": None if step is None else int(step),
            "kind": kind,
            "name": name,
        }
        if value is not None or kind != "image":
            event["value"] = _jsonable(value)
        event.update({k: _jsonable(v) for k, v in fields.items()})
        if tags:
            event["tags"] = _jsonable(tags)
        line = json.dumps(event, ensure_ascii=False) + "\n"
        with self._lock:
            if self._events.closed:
                raise ValueError(f"run {self.id} is closed")
            self._events.write(line)
            self._events.flush()
        return event

    def log_scalar(self, name: str, value: float, step: int | None = None, *, phase: str | None = None, **tags: Any) -> None:
        self.log("scalar", name, value, step=step, phase=phase, tags=tags)

    def log_metric(self, name: str, value: Any, step: int | None = None, *, phase: str | None = None, **tags: Any) -> None:
        self.log("metric", name, value, step=step, phase=phase, tags=tags)

    def log_status(self, message: str, *, phase: str | None = None) -> None:
        self.log("status", "message", message, phase=phase)

    def log_image(
        self, name: str, step: int | None, image: Any, *, phase: str | None = None, **tags: Any
    ) -> Path:
        """Save a PIL image (or copy an image file) as PNG under ``samples/`` and log its path."""
        phase = phase or self.phase
        stem = "-".join(p for p in (_slug(phase), _slug(name)) if p) or "image"
        stem += f"-{int(step):06d}" if step is not None else ""
        with self._lock:
            target = self.samples_dir / f"{stem}.png"
            n = 1
            while target.exists():
                target = self.samples_dir / f"{stem}-{n}.png"
                n += 1
            if isinstance(image, (str, os.PathLike)):
                source = Path(image)
                if source.suffix.lower() == ".png":
                    shutil.copyfile(source, target)
                else:
                    from PIL import Image

                    with Image.open(source) as im:
                        im.save(target, format="PNG")
            else:
                image.save(target, format="PNG")
        rel = target.relative_to(self.dir).as_posix()
        self.log("image", name, step=step, phase=phase, tags=tags, path=rel)
        return target

    def progress(self, step: int, total: int, *, phase: str | None = None) -> None:
        """Log a progress event and update ``status.json`` (at most every ``status_interval`` s)."""
        fraction = min(max(step / total, 0.0), 1.0) if total else 1.0
        self.log("progress", "progress", fraction, step=step, phase=phase, total=total)
        with self._lock:
            self._status["progress"] = fraction
            now = time.time()
            if step >= total or now - self._last_status_write >= self._status_interval:
                self._write_status()

    # -- status ---------------------------------------------------------------------------------

    def set_status(self, **fields: Any) -> None:
        """Update ``status.json`` fields (``extra=`` is merged into the free ``extra`` table)."""
        unknown = set(fields) - set(STATUS_FIELDS) - {"extra"}
        if unknown:
            raise TypeError(f"unknown status field(s): {', '.join(sorted(unknown))} (use extra={{...}})")
        with self._lock:
            extra = fields.pop("extra", None)
            if extra:
                self._status["extra"].update(_jsonable(extra))
            self._status.update({k: _jsonable(v) for k, v in fields.items()})
            self._write_status()

    def _write_status(self) -> None:
        with self._lock:
            self._status["updated"] = time.time()
            _write_json_atomic(self.status_path, self._status)
            self._last_status_write = self._status["updated"]

    def _end(self, state: str, error: str | None = None, **fields: Any) -> None:
        with self._lock:
            if state == "finished":
                self._status["progress"] = 1.0
            self.set_status(state=state, error=error, **fields)
            if not self._events.closed:
                self.log("status", "state", state, **({"error": error} if error else {}))

    def finish(self, **fields: Any) -> None:
        """Mark the run finished (progress 1); ``fields`` as for :meth:`set_status`."""
        self._end("finished", None, **fields)

    def fail(self, error: str) -> None:
        self._end("failed", " ".join(str(error).split()) or "failed")

    def interrupt(self) -> None:
        self._end("interrupted", "interrupted")

    def close(self) -> None:
        with self._lock:
            if not self._events.closed:
                self._events.close()


# -------------------------------------------------------------------------------------------- reader


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


def update_status(run_dir: str | os.PathLike, *, extra: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """Change fields of a run's ``status.json`` without reopening the run (its state, progress and events stay
    as they are); ``extra`` is merged into the ``extra`` table. For links added to a finished run later (e.g. a
    shared attack run that another attack is compared with). Returns the new status."""
    unknown = set(fields) - set(STATUS_FIELDS)
    if unknown:
        raise TypeError(f"unknown status field(s): {', '.join(sorted(unknown))} (use extra={{...}})")
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    if status.get("state") == "unknown" and status.get("error"):
        raise RunNotFound(f"{run_dir}: {status['error']}")
    status.update({k: _jsonable(v) for k, v in fields.items()})
    if extra:
        status["extra"] = {**(status.get("extra") or {}), **_jsonable(extra)}
    status["updated"] = time.time()
    _write_json_atomic(run_dir / STATUS_FILE, status)
    return status


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
