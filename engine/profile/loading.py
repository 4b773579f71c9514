"""Loading a profile: shipped profiles, TOML, ``--set`` overrides (one typed parser, :func:`parse_assignment`, that
``mima testbed build --set`` uses too; ``inf`` and ``nan`` refused), validation, flags and dumping."""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import ValidationError

from .captions import PACKAGE_DIR
from .errors import ProfileError, _describe
from .schema import Profile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["load_profile", "parse_profile", "validate_profile", "apply_overrides", "apply_flags", "dump_profile",
           "parse_value", "parse_assignment", "resolve_profile_path", "shipped_profiles_dir", "shipped_profiles"]


def shipped_profiles_dir() -> Path | None:
    """``profiles/`` of a source checkout / editable install, or the copy shipped inside a wheel."""
    for candidate in (PACKAGE_DIR / "_shipped" / "profiles", PACKAGE_DIR.parent / "profiles"):
        if candidate.is_dir():
            return candidate
    return None


def shipped_profiles() -> dict[str, Path]:
    """Name -> path of every shipped profile, sorted by name."""
    directory = shipped_profiles_dir()
    if directory is None:
        return {}
    return {p.stem: p for p in sorted(directory.glob("*.toml"))}


def resolve_profile_path(source: str | os.PathLike) -> Path:
    """An existing file, else the shipped profile of that name (``styles`` or ``styles.toml``)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ProfileError("is a directory, not a profile file", path=source)
    text = str(source)
    shipped = shipped_profiles()
    if os.sep not in text and "/" not in text:
        name = text[: -len(".toml")] if text.endswith(".toml") else text
        if name in shipped:
            return shipped[name]
        names = ", ".join(shipped) or "none"
        raise ProfileError(f"no such file, and no shipped profile of that name (shipped: {names})", path=source)
    raise ProfileError("no such file", path=source)


_TOML_LINE = re.compile(r"\(at line (\d+), column (\d+)\)")


def _parse_toml(text: str, path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = _TOML_LINE.search(msg)
        where = f"{path}:{m.group(1)}" if m else path
        msg = _TOML_LINE.sub("", msg).strip()
        raise ProfileError(f"TOML syntax error: {msg} (column {m.group(2)})" if m else f"TOML syntax error: {msg}", path=where) from None


def parse_value(text: str) -> Any:
    """A TOML value (``3``, ``1e-5``, ``true``, ``["a", "b"]``, ``"s"``), else the text itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _non_finite(value: Any) -> float | None:
    """The first ``inf``/``nan`` in a TOML value (looking into arrays and tables), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((bad for bad in map(_non_finite, items) if bad is not None), None)


def parse_assignment(item: str, example: str = "immunize.steps=10") -> tuple[str, Any]:
    """``(key, value)`` of a ``--set KEY=VALUE`` (the value by :func:`parse_value`); ``ValueError`` for an item
    without ``=`` or a value holding ``inf`` or ``nan``. Profiles and ``mima testbed build`` parse ``--set`` here."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, e.g. {example}")
    value = parse_value(text.strip())
    bad = _non_finite(value)
    if bad is not None:
        raise ValueError(f"{key}: expected a finite number, got {bad}")
    return key, value


def _key_path(key: str) -> list[str]:
    """Split a dotted TOML key (``groups."g 1"`` -> ['groups', 'g 1'])."""
    parsed = tomllib.loads(f"{key} = 0")
    parts: list[str] = []
    node: Any = parsed
    while isinstance(node, dict):
        (k, node), = node.items()
        parts.append(k)
    return parts


def _set_path(data: dict[str, Any], parts: Sequence[str], value: Any, origin: str) -> None:
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ProfileError(f"'{where}' is not an index of a list of {len(node)}", path=origin)
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ProfileError(f"'{'.'.join(parts[:i])}' is not a table", path=origin)


def _override_parts(item: str) -> list[str] | None:
    """The key path an override sets (None when it does not parse)."""
    try:
        return _key_path(item.partition("=")[0].strip())
    except (tomllib.TOMLDecodeError, ValueError):
        return None


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw profile dict (in place; also returned).

    The value is parsed as a TOML value, falling back to the plain string (``model.base=CompVis/x``); ``inf`` and
    ``nan`` are refused. Errors are :class:`ProfileError` naming the ``--set`` item.
    """
    for item in overrides:
        origin = f"--set {item}"
        try:
            key, value = parse_assignment(item)
        except ValueError as e:
            raise ProfileError(str(e), path=origin) from None
        parts = _override_parts(item)
        if parts is None:
            raise ProfileError(f"'{key}' is not a dotted key", path=origin)
        _set_path(data, parts, value, origin)
    return data


def parse_profile(text: str, *, path: str | os.PathLike = "<profile>", overrides: Iterable[str] = ()) -> Profile:
    """Parse and validate the TOML text of a profile (``path`` only names it in errors). An error in a field that
    an override set names the ``--set`` item instead of the file."""
    data = _parse_toml(text, str(path))
    overrides = list(overrides)
    apply_overrides(data, overrides)
    try:
        return validate_profile(data, path=path)
    except ProfileError as e:
        field = (e.field or "").split(" (")[0]
        for item in reversed(overrides):
            parts = _override_parts(item)
            key = ".".join(parts) if parts else None
            if field and key and (field == key or field.startswith(key + ".") or key.startswith(field + ".")):
                raise ProfileError(e.detail, path=f"--set {item}", field=e.field) from None
        raise


def load_profile(source: str | os.PathLike, overrides: Iterable[str] = ()) -> Profile:
    """Load a profile file, or the shipped profile of that name, with ``--set`` style overrides."""
    path = resolve_profile_path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"cannot read: {getattr(e, 'strerror', None) or e}", path=source) from None
    return parse_profile(text, path=source if Path(source).expanduser().is_file() else path, overrides=overrides)


def validate_profile(data: Mapping[str, Any], *, path: str | os.PathLike | None = None) -> Profile:
    """Validate a raw profile dict; errors become one-line :class:`ProfileError`."""
    try:
        return Profile.model_validate(data)
    except ProfileError as e:
        raise e.with_path(path) from None
    except ValidationError as e:
        errors = e.errors(include_url=False)
        field, detail = _describe(errors[0], data)
        if len(errors) > 1:
            detail += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
        raise ProfileError(detail, path=path, field=field) from None


def apply_flags(profile: Profile, flags: Mapping[str, Any]) -> Profile:
    """A copy of ``profile`` with explicit command-line flags applied (highest precedence).

    ``flags`` maps dotted field paths to values, e.g. ``{"immunize.steps": 10}``; a value of None means
    the flag was not given and leaves the profile alone. The result is validated again.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return profile
    data = profile.model_dump(mode="python", exclude_none=True)
    for key, value in given.items():
        _set_path(data, _key_path(key), value, f"flag {key}")
    return validate_profile(data, path="command line")


def dump_profile(profile: Profile, *, header: str | None = None) -> str:
    """The profile as TOML, every default filled in; ``load_profile`` reads it back unchanged."""
    text = tomli_w.dumps(profile.model_dump(mode="json", exclude_none=True))
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + "\n" + text
    return text
