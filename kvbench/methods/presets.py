"""Named presets (a method plus hyper-parameter values) and the typing of hyper-parameter values.

The package's presets are kvbench/configs/methods.yaml; a user's own come from `--presets FILE` (same format,
see configs/presets.example.yaml) and may not reuse a method's or a package preset's name. Both files are
checked the same way before any model loads: every preset names a known method, every key is a field of that
method, and every value has the field's type; an error names the file, the preset and the key."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbench.errors import InputError
from kvbench.methods.base import Method

_KINDS = {bool: "true or false", int: "int", float: "float", str: "str", tuple: "a list"}


@dataclass(frozen=True)
class Preset:
    name: str
    method: str  # a registered name, an entry point, or package.module:Class
    params: dict[str, Any]  # typed, checked against the method's fields
    file: Path


def defaults(cls: type[Method]) -> dict[str, Any]:
    """Default value of each field (dataclasses.MISSING where a field has none)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = dataclasses.MISSING
    return out


def typed_value(value: Any, default: Any, parse: bool) -> Any:
    """`value` as the type of the field whose default is `default`. With `parse`, a string is read as that type
    (--method-arg values are strings); a YAML preset must give the type itself. Raises ValueError(the type
    wanted) when the value does not fit. A field without a default of these types takes any value."""
    kind = type(default)
    if kind not in _KINDS:
        return value
    text = parse and isinstance(value, str)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
    elif kind in (int, float):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and (kind is float or isinstance(value, int)):
            return kind(value)
        if text:
            try:
                return kind(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    elif text:  # a tuple field: --method-arg skip_layers=0:1
        try:
            return tuple(int(v) for v in value.split(":") if v)
        except ValueError:
            pass
    elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) and not isinstance(v, bool)
                                                   for v in value):
        return tuple(value)
    raise ValueError(_KINDS[kind])


def unknown_parameter(cls: type[Method], key: str) -> str:
    from kvbench.registry import did_you_mean

    fields = list(defaults(cls))
    return f"{cls.name or cls.__name__} has no parameter '{key}'{did_you_mean(key, fields)}; it has {', '.join(fields)}"


def unchecked(data: Mapping[str, Any], path: Path) -> dict[str, Preset]:
    """The table as it stands, for a file whose check is in progress (methods.presets' re-entrancy guard)."""
    table = data.get("presets") or {}
    return {str(k).strip().lower(): Preset(str(k).strip().lower(), str(v.get("method")), _plain(v), path)
            for k, v in (table.items() if isinstance(table, dict) else ()) if isinstance(v, dict)}


def _plain(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items() if k != "method"}


def check(data: Mapping[str, Any], path: Path, source: str, resolve: Callable[[str], type[Method]],
          reserved: Callable[[str], str | None], known: Callable[[], list[str]]) -> dict[str, Preset]:
    """The `presets:` table of a methods YAML (already parsed), every entry checked before any is used: a
    mapping of new names (`reserved(name)` says what a taken name is) to a known `method` (`resolve` gives its
    class) plus fields of that method, each of the field's type and accepted by the method. Errors name the
    file (`source`), the preset and the key."""
    from kvbench.registry import did_you_mean

    table = data.get("presets")
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise InputError(f"{source}: 'presets:' must map preset names to settings, got {_kind(table)}")
    out: dict[str, Preset] = {}
    for name, entry in table.items():
        key, where = str(name).strip().lower(), f"{source}: preset '{name}'"
        taken = reserved(key)
        if taken:
            raise InputError(f"{where} has the name of {taken}; give the preset another name")
        if key in out:
            raise InputError(f"{where} is defined twice (names are not case-sensitive)")
        if not isinstance(entry, dict):
            raise InputError(f"{where} must be a mapping ({{method: NAME, field: value, ...}}), got {_kind(entry)}")
        base = entry.get("method")
        try:
            cls = resolve(base) if isinstance(base, str) and base.strip() else None
        except InputError:
            cls = None
        if cls is None:
            names = known()
            raise InputError(f"{where}: 'method' must name a registered method, got {base!r}"
                             f"{did_you_mean(str(base), names)}; known: {', '.join(names)}")
        fields = defaults(cls)
        params = _plain(entry)
        for pkey, value in entry.items():
            if pkey == "method":
                continue
            if pkey not in fields:
                raise InputError(f"{where}: {cls.name} has no parameter '{pkey}'{did_you_mean(str(pkey), list(fields))}")
            expected = _expected(fields[pkey])
            if expected is not None and not expected[1](value):
                raise InputError(f"{where}, key '{pkey}': expected {expected[0]}, got {_kind(value)} {value!r}")
        try:
            cls(**params)  # the method's own checks (__post_init__): a wrapper builds its inner method here
        except (InputError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: {exc}") from None
        out[key] = Preset(key, base.strip(), params, path)  # type: ignore[union-attr]
    return out


def _expected(default: Any) -> tuple[str, Any] | None:
    """(description, test) of the values a field with this default takes; None: not checked."""
    if isinstance(default, bool):
        return "true or false", lambda v: isinstance(v, bool)
    if isinstance(default, int):
        return "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)
    if isinstance(default, float):
        return "a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if isinstance(default, str):
        return "a string", lambda v: isinstance(v, str)
    if isinstance(default, tuple):
        return "a list of integers", lambda v: isinstance(v, (list, tuple)) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in v)
    return None


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)
