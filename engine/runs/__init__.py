"""Run directories: what every job writes and what the TUI and reports read.

Layout of ``runs/<id>/``::

    profile.toml    the resolved profile (every default filled in); the run is reproducible from it
    events.jsonl    one JSON object per line, flushed per line (schema below)
    status.json     the run's current state and links, replaced atomically (:mod:`engine.runs.status`)
    samples/        PNG images logged during the run
    eval/           an attack run's evaluation images as arrays (:mod:`engine.runs.images`)
    checkpoints/    weights (safetensors / diffusers folders)

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

Modules: :mod:`~engine.runs.writer` (:class:`RunWriter`, :func:`update_status`), :mod:`~engine.runs.reader`
(:class:`RunReader`, :class:`EventFollower`, :func:`read_status`, :func:`list_runs`, :func:`find_run`),
:mod:`~engine.runs.status` (the typed status and links), :mod:`~engine.runs.query` (:func:`newest`,
:func:`children`, :func:`pairs`), :mod:`~engine.runs.images` (evaluation images), :mod:`~engine.runs.logger`
(the :class:`EventLogger` Protocol the training loops call) and :mod:`~engine.runs.files` (:func:`atomic_write`).
"""

from __future__ import annotations

from .files import atomic_savez, atomic_write, jsonable
from .images import (
    EvalImages,
    concept_dir,
    copy_eval_images,
    eval_path,
    eval_steps,
    load_eval_images,
    save_eval_images,
    weights_dir,
)
from .logger import EventLogger, MemoryLogger, NullLogger
from .query import CACHE_STATES, Pair, Runs, children, newest, pair_of, pairs, select
from .reader import EventFollower, RunNotFound, RunReader, find_run, list_runs, load_status, read_status
from .status import (
    EVENT_KINDS,
    EVENTS_FILE,
    PROFILE_FILE,
    RUN_STATES,
    STATUS_FIELDS,
    STATUS_FILE,
    AttackLinks,
    EvaluateLinks,
    ModelLinks,
    RunStatus,
    UtilitySummary,
)
from .writer import RunWriter, new_run_id, update_status

__all__ = [
    "EVENT_KINDS", "RUN_STATES", "STATUS_FIELDS", "PROFILE_FILE", "EVENTS_FILE", "STATUS_FILE",
    "EventLogger", "NullLogger", "MemoryLogger", "RunWriter", "RunReader", "EventFollower", "RunNotFound",
    "new_run_id", "list_runs", "find_run", "read_status", "load_status", "update_status",
    "RunStatus", "AttackLinks", "ModelLinks", "EvaluateLinks", "UtilitySummary",
    "Runs", "Pair", "newest", "select", "children", "pairs", "pair_of", "CACHE_STATES",
    "EvalImages", "concept_dir", "eval_path", "eval_steps", "load_eval_images", "save_eval_images",
    "copy_eval_images", "weights_dir", "atomic_write", "atomic_savez", "jsonable",
]
