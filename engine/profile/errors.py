"""Profile errors: :class:`ProfileError` (one line, ``FILE: FIELD: what is wrong``) and the translation of pydantic's
validation errors into it (the key or value expected, the closest known name)."""

from __future__ import annotations

import difflib
import os
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel

from engine.errors import UsageError

__all__ = ["ProfileError"]


class ProfileError(UsageError):
    """A problem with a profile, as one line: ``FILE: FIELD: what is wrong``.

    ``path`` is the profile file (or name) when known, ``field`` the dotted field path (e.g.
    ``immunize.steps``), ``detail`` the explanation.
    """

    def __init__(self, detail: str, *, path: str | os.PathLike | None = None, field: str | None = None):
        self.detail = " ".join(str(detail).split())
        self.path = str(path) if path is not None else None
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        return ": ".join(part for part in (self.path, self.field, self.detail) if part)

    def with_path(self, path: str | os.PathLike | None) -> ProfileError:
        return ProfileError(self.detail, path=path if self.path is None else self.path, field=self.field)


def _suggest(word: str, choices: Iterable[str]) -> str:
    """``did you mean 'x'?`` for the closest choice, else the list of choices ('' when none)."""
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return f"choose from {', '.join(repr(c) for c in choices)}" if choices else ""


def _unknown(what: str, word: str, choices: Iterable[str]) -> str:
    hint = _suggest(word, choices)
    return f"unknown {what} '{word}'" + (f"; {hint}" if hint else "")


_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean (true or false)",
    "list_type": "an array",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}

_TOML_TYPES = [
    (bool, "boolean"),
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (list, "array"),
    (dict, "table"),
]


def _toml_type(value: Any) -> str:
    for py, name in _TOML_TYPES:
        if isinstance(value, py):
            return name
    return type(value).__name__


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unwrap(tp: Any) -> Any:
    """Strip ``Annotated`` and ``Optional`` (a union with None and one other type)."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin is Union or origin is types.UnionType:
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp


def _annotation_at(loc: Sequence[Any]) -> Any:
    """The type expected at a location of a raw profile (None when unknown)."""
    from .concepts import _IMAGE_SET_TAGS
    from .schema import Profile

    tp: Any = Profile
    for part in loc:
        if isinstance(part, str) and part in _IMAGE_SET_TAGS:
            tp = _IMAGE_SET_TAGS[part]
            continue
        tp = _unwrap(tp)
        origin = get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None:
                return None
            tp = field.annotation
        elif origin is list:
            tp = get_args(tp)[0]
        elif origin is dict:
            tp = get_args(tp)[1]
        else:
            return None
    return _unwrap(tp)


def _field_name(loc: Sequence[Any]) -> str:
    from .concepts import _IMAGE_SET_TAGS

    return ".".join(str(p) for p in loc if not (isinstance(p, str) and (p in _IMAGE_SET_TAGS or p == "[key]")))


def _describe(error: Mapping[str, Any], data: Mapping[str, Any]) -> tuple[str, str]:
    loc = tuple(error["loc"])
    kind = error["type"]
    value = error.get("input")
    field = _field_name(loc)
    # name the concept of a [[concepts]] entry
    if len(loc) >= 2 and loc[0] == "concepts" and isinstance(loc[1], int):
        try:
            name = data["concepts"][loc[1]].get("name")
        except (KeyError, IndexError, TypeError, AttributeError):
            name = None
        if isinstance(name, str):
            field += f" (concept '{name}')"
    if kind == "extra_forbidden":
        model = _annotation_at(loc[:-1])
        choices = list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
        return field, _unknown("key", str(loc[-1]), choices)
    if kind == "missing":
        return field, "missing required key"
    if kind == "literal_error":
        choices = [str(a) for a in get_args(_annotation_at(loc))] if "[key]" not in loc else []
        hint = _suggest(str(value), choices) if choices else ""
        if hint.startswith("did you"):
            return field, f"unknown value {_short(value)}; {hint} (choose from {error['ctx']['expected']})"
        return field, f"expected one of {error['ctx']['expected']}, got {_short(value)}"
    if kind in _EXPECTED:
        return field, f"expected {_EXPECTED[kind]}, got {_toml_type(value)} {_short(value)}"
    msg = str(error.get("msg", kind))
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if msg.startswith("Input should"):
        msg = "expected " + msg[len("Input should ") :].removeprefix("be ")
        msg += f", got {_short(value)}"
    elif msg.startswith("String should"):
        msg = "expected a string that should " + msg[len("String should ") :] + f", got {_short(value)}"
    return field, msg
