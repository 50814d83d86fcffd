"""The method registry: one file per method, one line per method here; named presets in
configs/methods.yaml (a base method plus hyper-parameter overrides)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kvbench import resources
from kvbench.errors import InputError
from kvbench.methods.base import Method
from kvbench.methods.fullkv import FullKV
from kvbench.registry import Registry, did_you_mean, unknown

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
    label: str  # what the user typed (method or preset name)
    base: str  # registered method name
    method: Method


def presets() -> dict[str, dict[str, Any]]:
    data = resources.load_yaml(resources.config_path("methods.yaml"))
    return data.get("presets", {}) or {}


def all_names() -> list[str]:
    return METHODS.names() + [p for p in presets() if p not in METHODS]


def _coerce(value: str, current: Any, key: str, method: str) -> Any:
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise InputError(f"--method-arg {key}={value}: {method}.{key} expects true or false")
    for kind in (int, float):
        if isinstance(current, kind):
            try:
                return kind(value)
            except ValueError:
                raise InputError(f"--method-arg {key}={value}: {method}.{key} expects {kind.__name__}") from None
    if isinstance(current, tuple):
        return tuple(int(v) for v in value.split(":") if v) if value else ()
    return value


def build(name: str, overrides: dict[str, str] | None = None) -> MethodChoice:
    """A method instance from a registry name or a preset, with --method-arg overrides applied. Overrides
    that do not apply to this method are an error (the caller filters per method when several are run)."""
    overrides = overrides or {}
    key = name.strip().lower()
    table = presets()
    if key in table:
        entry = dict(table[key])
        entry.pop("source", None)  # what the preset follows: shown by `kvbench methods`, not a hyper-parameter
        base = entry.pop("method", None)
        if base is None:
            raise InputError(f"configs/methods.yaml: preset '{key}' has no 'method'")
        params: dict[str, Any] = entry
    else:
        if key not in METHODS:
            raise unknown("method", name, all_names())
        base, params = key, {}
    cls = METHODS.get(base)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    for pkey in params:
        if pkey not in fields:
            raise InputError(f"configs/methods.yaml: preset '{key}': {base} has no parameter '{pkey}'")
    for okey, value in overrides.items():
        if okey not in fields:
            raise InputError(
                f"--method-arg {okey}: {base} has no parameter '{okey}'{did_you_mean(okey, list(fields))}"
                f"; it has {', '.join(fields)}"
            )
        params[okey] = _coerce(value, getattr(defaults, okey), okey, base)
    try:
        method = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
    except TypeError as exc:
        raise InputError(f"method {base}: {exc}") from None
    return MethodChoice(label=key, base=cls.name, method=method)


def parse_method_list(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise InputError("--method is empty")
    if names == ["all"]:
        return METHODS.names()
    return names
