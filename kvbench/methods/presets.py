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

from kvbench import resources
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


def check_params(cls: type[Method], params: Mapping[str, Any], where: Callable[[str], str]) -> dict[str, Any]:
    """Typed copies of a preset's `params` for `cls`; `where(key)` names the file, the preset and the key."""
    fields = defaults(cls)
    out = {}
    for key, value in params.items():
        if key not in fields:
            raise InputError(f"{where(key)}: {unknown_parameter(cls, key)}")
        try:
            out[key] = typed_value(value, fields[key], parse=False)
        except ValueError as exc:
            raise InputError(f"{where(key)}: must be {exc}, got {value!r}") from None
    return out


def load(path: Path, resolve: Callable[[str], type[Method]]) -> dict[str, Preset]:
    """The presets of one file, every one checked (`resolve` turns a method name into its class)."""
    data = resources.load_yaml(path)
    table = data.get("presets")
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise InputError(f"{path}: 'presets' must be a mapping of preset name -> settings")
    out = {}
    for name, entry in table.items():
        key = str(name).strip().lower()
        if not isinstance(entry, dict):
            raise InputError(f"{path}: preset '{name}': expected a mapping with 'method' and parameters")
        params = dict(entry)
        base = params.pop("method", None)
        if not isinstance(base, str) or not base.strip():
            raise InputError(f"{path}: preset '{name}': 'method' must name a method")
        try:
            cls = resolve(base)
        except InputError as exc:
            raise InputError(f"{path}: preset '{name}': {exc}") from None
        typed = check_params(cls, params, lambda k: f"{path}: preset '{name}': {k}")
        out[key] = Preset(key, base, typed, path)
    return out
