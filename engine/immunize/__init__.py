"""Immunization methods, registered by name: ``mima``, ``jt``, ``cp``, ``imma`` and ``alternating``.

A method is a :class:`MethodSpec`: which parameters the lower and upper levels touch, how the lower-level tasks are
formed (one per concept, one joint task, or a single concept), whether the adapted copies are merged, and which step
algorithm runs (the bi-level step of :mod:`engine.immunize.core`, or the released code's alternating scheme). Adding a
method is one new module that calls :func:`register`. :func:`engine.immunize.runner.immunize` runs any of them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

METHODS: dict[str, MethodSpec] = {}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    tasks: Literal["per-concept", "joint", "single"] = "per-concept"
    merge: bool = True
    lower: str | None = None  # None: from the profile ([immunize] lower)
    upper: str | None = None
    algorithm: Literal["bilevel", "alternating"] = "bilevel"


def register(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown immunization method {name!r}; expected one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


for _module in ("mima", "jt", "cp", "imma", "alternating"):
    importlib.import_module(f"{__name__}.{_module}")
