"""The method registry: one file per method, one line per method here; named presets in
kvbench/configs/methods.yaml (a base method plus hyper-parameter overrides) and in a user's --presets file.
Methods from outside kvbench: `register_method`, `package.module:Class`, entry points (methods.plugins)."""

from __future__ import annotations

import contextvars
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
# --- 2024-2025 prefill-once methods, same kept count in every head (issue #14, methods-2.md) ---
from kvbench.methods.keydiff import KeyDiff  # noqa: E402
from kvbench.methods.block_keydiff import BlockKeyDiff  # noqa: E402
from kvbench.methods.expected_attention import ExpectedAttention  # noqa: E402
from kvbench.methods.lagkv import LagKV  # noqa: E402
from kvbench.methods.observed_attention import ObservedAttention  # noqa: E402
from kvbench.methods.criticalkv import CriticalKV  # noqa: E402

METHODS.register("keydiff", KeyDiff)
METHODS.register("block_keydiff", BlockKeyDiff)
METHODS.register("expected_attention", ExpectedAttention)
METHODS.register("lagkv", LagKV)
METHODS.register("observed_attention", ObservedAttention)
METHODS.register("criticalkv", CriticalKV)
# --- end 2024-2025 prefill-once methods ---
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
# --- transforms after selection and decoding-time wrappers (issue #14, methods-2.md §2.17, §2.18, §2.22) ---
from kvbench.methods import compose  # noqa: E402
from kvbench.methods.wrapper import Wrapper  # noqa: E402
from kvbench.methods.think import ThinK  # noqa: E402
from kvbench.methods.kivi import KIVI2, KIVI4  # noqa: E402
from kvbench.methods.decoding import Decoding  # noqa: E402

METHODS.register("think", ThinK)
METHODS.register("kivi2", KIVI2)
METHODS.register("kivi4", KIVI4)
METHODS.register("decoding", Decoding)
# --- end transforms and decoding-time wrappers ---
# --- head-adaptive methods: heads of a layer keep different numbers of tokens (methods-2 §2.13-2.21) ---
from kvbench.methods.adakv import AdaKV  # noqa: E402
from kvbench.methods.headkv import HeadKV  # noqa: E402
from kvbench.methods.duo_attention import DuoAttention  # noqa: E402

METHODS.register("adakv", AdaKV, aliases=("ada_kv",))
METHODS.register("headkv", HeadKV)
METHODS.register("duo_attention", DuoAttention, aliases=("duoattention",))
from kvbench.methods.critical_adakv import CriticalAdaKV  # noqa: E402

METHODS.register("critical_adakv", CriticalAdaKV, aliases=("criticaladakv",))
# --- end head-adaptive methods ---


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


_CHECKING: set[str] = set()  # preset files being checked right now
# The user's presets file of the build in progress: a wrapper builds its inner method by name (Wrapper.
# __post_init__, compose.build_wrapper), and that name may be one of the user's presets.
_USER_PRESETS: contextvars.ContextVar[Path | None] = contextvars.ContextVar("user_presets", default=None)


def _load(path: Path, reserved: Any, user: Path | None = None) -> dict[str, presets_mod.Preset]:
    """One presets file, checked. Checking a wrapper preset builds its inner method, which may itself be a
    preset of this file: that entry is checked in its own turn, so the table is served as it stands instead of
    re-entering the check."""
    data = resources.load_yaml(path)
    if str(path) in _CHECKING:
        return presets_mod.unchecked(data, path)
    top = resources.package_path().parent  # the package's own file reads kvbench/configs/methods.yaml
    shown = path.relative_to(top) if path.is_relative_to(top) else path
    _CHECKING.add(str(path))
    token = _USER_PRESETS.set(user)  # the package's presets never name the user's; the user's may name their own
    try:
        return presets_mod.check(data, path, str(shown), lambda m: method_class(m)[1], reserved,
                                 lambda: METHODS.names() + sorted(plugins.entry_points()))
    finally:
        _USER_PRESETS.reset(token)
        _CHECKING.discard(str(path))


def _method_named(key: str) -> str | None:
    return f"a method ({METHODS.canonical(key)})" if key in METHODS else None


def presets(user: Path | None = None) -> dict[str, presets_mod.Preset]:
    """The package's presets, then the user's (--presets FILE), each checked."""
    table = _load(resources.config_path("methods.yaml"), _method_named)
    if user is None:
        return table
    mine = _load(user, lambda key: _method_named(key) or (f"a kvbench package preset ({key})" if key in table else None),
                 user)
    return {**table, **mine}


def check_presets(data: dict[str, Any], source: str) -> dict[str, presets_mod.Preset]:
    """The `presets:` table of a methods YAML (already parsed), every entry checked (see presets.check)."""
    return presets_mod.check(data, Path(source), source, lambda m: method_class(m)[1], _method_named,
                             METHODS.names)


def all_names(user_presets: Path | None = None) -> list[str]:
    names = METHODS.names() + sorted(plugins.entry_points())
    return names + [p for p in presets(user_presets) if p not in names]


def _coerce(value: Any, current: Any, key: str, method: str) -> Any:
    """A --method-arg value (a string, or a typed value from the Python API) as the type of `current`."""
    try:
        return presets_mod.typed_value(value, current, parse=True)
    except ValueError as exc:
        raise InputError(f"{{method_args}} {key}={value}: {method}.{key} expects {exc}",
                         options=("method_args",)) from None


def _resolve(key: str) -> tuple[type[Method], dict[str, Any]]:
    """(class, preset parameters) of a method, preset, package.module:Class or entry-point name."""
    table = presets(_USER_PRESETS.get())
    if key in table:
        preset = table[key]
        return method_class(preset.method)[1], dict(preset.params)
    return method_class(key)[1], {}


def build(spec: str | Method, overrides: Mapping[str, Any] | None = None,
          user_presets: Path | None = None) -> MethodChoice:
    """A method instance from a registry name, a preset, a composition (`snapkv+kivi4`), a package.module:Class
    reference, an entry point, or a Method instance, with hyper-parameter overrides applied (strings are
    parsed: --method-arg). Overrides that do not apply to this method are an error (the caller filters per
    method when several are run)."""
    token = _USER_PRESETS.set(user_presets or _USER_PRESETS.get())
    try:
        return _build(spec, dict(overrides or {}))
    finally:
        _USER_PRESETS.reset(token)


def _build(spec: str | Method, overrides: dict[str, Any]) -> MethodChoice:
    if isinstance(spec, Method):
        reference = f"{type(spec).__module__}:{type(spec).__qualname__}"
        cls = _named(plugins.checked_class(type(spec), reference), reference)
        label, params, instance = cls.name, {}, spec
    else:
        table = presets(_USER_PRESETS.get())
        label = spec.strip() if plugins.is_reference(spec) else spec.strip().lower()
        if "+" in label and label not in METHODS and label not in table and not plugins.is_reference(label):
            base_name, composed = compose.build_composition(label, overrides, _resolve)  # kvbench.methods.compose
            return MethodChoice(label=label, base=base_name, method=composed)
        if label in table:
            preset = table[label]
            _, cls = method_class(preset.method)
            params = dict(preset.params)
        else:
            label, cls = method_class(spec)
            params = {}
        if issubclass(cls, Wrapper):
            return MethodChoice(label=label, base=cls.name,
                                method=compose.build_wrapper(cls, label, params, overrides))
        instance = None
    fields = presets_mod.defaults(cls)
    for key, value in overrides.items():
        if key not in fields:
            raise InputError(f"{{method_args}} {key}: {presets_mod.unknown_parameter(cls, key)}",
                             options=("method_args",))
        params[key] = _coerce(value, fields[key], key, cls.name)
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
