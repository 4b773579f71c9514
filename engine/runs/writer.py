"""Write a run directory: :class:`RunWriter` for a running job, :func:`update_status` for a link added later.

Run ids sort by start time: ``20261127-215000-immunize-mima-g2-1-ab12`` (UTC time, kind, method, group,
random suffix).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from .files import atomic_write, jsonable, slug
from .reader import RunNotFound, read_status
from .status import EVENT_KINDS, EVENTS_FILE, PROFILE_FILE, STATUS_FIELDS, STATUS_FILE

__all__ = ["RunWriter", "new_run_id", "update_status"]


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def new_run_id(kind: str, method: str | None = None, group: str | None = None, *, now: float | None = None) -> str:
    """``YYYYMMDD-HHMMSS-kind-method-group-xxxx`` (UTC): sorts by start time."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    parts = [stamp, *(slug(p) for p in (kind, method, group) if p), secrets.token_hex(2)]
    return "-".join(p for p in parts if p)


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
            event["value"] = jsonable(value)
        event.update({k: jsonable(v) for k, v in fields.items()})
        if tags:
            event["tags"] = jsonable(tags)
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
        stem = "-".join(p for p in (slug(phase), slug(name)) if p) or "image"
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
                self._status["extra"].update(jsonable(extra))
            self._status.update({k: jsonable(v) for k, v in fields.items()})
            self._write_status()

    def _write_status(self) -> None:
        with self._lock:
            self._status["updated"] = time.time()
            _write_json(self.status_path, self._status)
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
    status.update({k: jsonable(v) for k, v in fields.items()})
    if extra:
        status["extra"] = {**(status.get("extra") or {}), **jsonable(extra)}
    status["updated"] = time.time()
    _write_json(run_dir / STATUS_FILE, status)
    return status
