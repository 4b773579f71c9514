"""Immunization methods, registered by name: ``mima``, ``jt``, ``cp``, ``imma`` and ``alternating``.

A method is a :class:`MethodSpec`: which parameters the lower and upper levels touch, how the lower-level tasks are
formed (one per concept, one joint task, or a single concept), whether the adapted copies are merged, and which step
algorithm runs (the bi-level step of :mod:`engine.immunize.core`, or the released code's alternating scheme). Adding a
method is one new module that calls :func:`register`. :func:`engine.immunize.runner.immunize` runs any of them.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Literal

from ..errors import UsageError

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


class UnknownMethod(ValueError, UsageError):
    """An immunization method that is not registered (the message suggests the closest name)."""


def get_method(name: str) -> MethodSpec:
    if name == "none":
        raise UnknownMethod("immunization method 'none' is no immunization, so there is nothing to run: the report's "
                            "'none' row attacks the unimmunized model twice (`mima attack --control`, which `mima "
                            f"reproduce` runs); choose from {', '.join(sorted(METHODS))}")
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose from {', '.join(sorted(METHODS))}"
        raise UnknownMethod(f"unknown immunization method '{name}'; {hint}")
    return METHODS[name]


for _module in ("mima", "jt", "cp", "imma", "alternating"):
    importlib.import_module(f"{__name__}.{_module}")
