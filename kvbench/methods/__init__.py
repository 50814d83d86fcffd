"""The method registry: one file per method, one line per method here; named presets in
kvbench/configs/methods.yaml (a base method plus hyper-parameter overrides) and in a user's --presets file.
Methods from outside kvbench: `register_method`, `package.module:Class`, entry points (methods.plugins)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbench import resources
from kvbench.errors import InputError
from kvbench.methods import plugins
from kvbench.methods import presets as presets_mod
from kvbench.methods.base import Method
from kvbench.methods.fullkv import FullKV
from kvbench.registry import Registry, unknown
from kvbench.results.store import digest

METHODS: Registry[type[Method]] = Registry("method")
METHODS.register("fullkv", FullKV, aliases=("full",))
# --- prefill-once methods (one registry line each) ---
from kvbench.methods.snapkv import SnapKV  # noqa: E402
from kvbench.methods.pyramidkv import PyramidKV  # noqa: E402
from kvbench.methods.chunkkv import ChunkKV  # noqa: E402
from kvbench.methods.h2o_prefill import H2OPrefill  # noqa: E402
from kvbench.methods.random import RandomKeep  # noqa: E402
from kvbench.methods.knorm import KNorm  # noqa: E402

METHODS.register("snapkv", SnapKV)
METHODS.register("pyramidkv", PyramidKV)
METHODS.register("chunkkv", ChunkKV)
METHODS.register("h2o_prefill", H2OPrefill)
METHODS.register("random", RandomKeep)
METHODS.register("knorm", KNorm, aliases=("l2norm",))
# --- end prefill-once methods ---
# --- continuous methods (one registry line each) ---
from kvbench.methods.h2o import H2O  # noqa: E402
from kvbench.methods.tova import TOVA  # noqa: E402
from kvbench.methods.scissorhands import Scissorhands  # noqa: E402
from kvbench.methods.streamingllm import StreamingLLM  # noqa: E402
from kvbench.methods.sliding import Sliding  # noqa: E402
from kvbench.methods.sink_recent import SinkRecent  # noqa: E402

METHODS.register("h2o", H2O)
METHODS.register("tova", TOVA)
METHODS.register("scissorhands", Scissorhands)
METHODS.register("streamingllm", StreamingLLM, aliases=("streaming_llm", "slm"))
METHODS.register("sliding", Sliding, aliases=("local", "sliding_window"))
METHODS.register("sink_recent", SinkRecent, aliases=("sink+recent",))
# --- end continuous methods ---


@dataclass(frozen=True)
class MethodChoice:
    label: str  # what the user typed (method or preset name), or the name of a Method instance
    base: str  # registered method name
    method: Method


def register_method(name: str | type[Method] | None = None, *, aliases: tuple[str, ...] = ()):
    """Class decorator adding a Method subclass to the registry: `@register_method` (under its `name`, or its
    class name lower-cased) or `@register_method("name")`. Registering the same class again (a re-run
    notebook cell, a reloaded module) replaces it; another class under a taken name is an error."""

    def add(cls: type[Method], key: str | None) -> type[Method]:
        plugins.checked_class(cls, f"register_method({cls.__qualname__})")
        own = cls.__dict__.get("name") or ""
        key = (key or own or cls.__name__).strip().lower()
        if own and own != key:
            raise ValueError(f"register_method('{key}'): {cls.__qualname__}.name is '{own}'; use one name")
        if key in METHODS:
            old = METHODS.get(key)
            if (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(f"method '{key}' is already registered ({old.__module__}.{old.__qualname__})")
            METHODS.unregister(key)
        cls.name = key
        METHODS.register(key, cls, aliases)
        return cls

    if isinstance(name, type):
        return add(name, None)
    return lambda cls: add(cls, name)


def _named(cls: type[Method], name: str) -> type[Method]:
    """A class from outside the registry keeps its own `name`, or is named as the user named it."""
    if not cls.__dict__.get("name"):
        cls.name = name
    return cls


def method_class(name: str) -> tuple[str, type[Method]]:
    """(canonical name, class) of a registered name or alias, a package.module:Class reference, or the name of
    an installed entry point (group kvbench.methods), in that order."""
    if plugins.is_reference(name):
        cls = plugins.load_reference(name)
        return cls.__dict__.get("name") or name.strip(), _named(cls, name.strip())
    key = name.strip().lower()
    if key in METHODS:
        return METHODS.canonical(key), METHODS.get(key)
    cls = plugins.load_entry_point(key)
    if cls is None:
        raise unknown("method", name, all_names())
    return key, _named(cls, key)


def presets(user: Path | None = None) -> dict[str, presets_mod.Preset]:
    """The package's presets, then the user's (--presets FILE), each checked."""
    table = presets_mod.load(resources.config_path("methods.yaml"), lambda m: method_class(m)[1])
    if user is None:
        return table
    mine = presets_mod.load(user, lambda m: method_class(m)[1])
    for key in mine:
        if key in table or key in METHODS:
            kind = "package preset" if key in table else "method"
            raise InputError(f"{user}: preset '{key}' has the name of a kvbench {kind}; give it another name")
    return {**table, **mine}


def all_names(user_presets: Path | None = None) -> list[str]:
    names = METHODS.names() + sorted(plugins.entry_points())
    return names + [p for p in presets(user_presets) if p not in names]


def build(spec: str | Method, overrides: Mapping[str, Any] | None = None,
          user_presets: Path | None = None) -> MethodChoice:
    """A method instance from a registry name, a preset, a package.module:Class reference, an entry point, or
    a Method instance, with hyper-parameter overrides applied (strings are parsed: --method-arg). Overrides
    that do not apply to this method are an error (the caller filters per method when several are run)."""
    overrides = overrides or {}
    if isinstance(spec, Method):
        reference = f"{type(spec).__module__}:{type(spec).__qualname__}"
        cls = _named(plugins.checked_class(type(spec), reference), reference)
        label, params, instance = cls.name, {}, spec
    else:
        table = presets(user_presets)
        label = spec.strip() if plugins.is_reference(spec) else spec.strip().lower()
        if label in table:
            preset = table[label]
            _, cls = method_class(preset.method)
            params = dict(preset.params)
        else:
            label, cls = method_class(spec)
            params = {}
        instance = None
    fields = presets_mod.defaults(cls)
    for key, value in overrides.items():
        if key not in fields:
            raise InputError(f"{{method_args}} {key}: {presets_mod.unknown_parameter(cls, key)}",
                             options=("method_args",))
        try:
            params[key] = presets_mod.typed_value(value, fields[key], parse=True)
        except ValueError as exc:
            raise InputError(f"{{method_args}} {key}={value}: {cls.name}.{key} expects {exc}",
                             options=("method_args",)) from None
    try:
        method = dataclasses.replace(instance, **params) if instance is not None else cls(**params)
    except TypeError as exc:
        raise InputError(f"method {cls.name}: {exc}") from None
    if instance is not None and method.params() != _default_params(cls):
        label = f"{cls.name}-{digest(method.params(), 6)}"  # two configured instances never share a label
    return MethodChoice(label=label, base=cls.name, method=method)


def _default_params(cls: type[Method]) -> dict[str, Any] | None:
    try:
        return cls().params()
    except TypeError:  # a field without a default
        return None
