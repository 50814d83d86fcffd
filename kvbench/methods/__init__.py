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
# --- end head-adaptive methods ---


@dataclass(frozen=True)
class MethodChoice:
    label: str  # what the user typed (method or preset name)
    base: str  # registered method name
    method: Method


_CHECKING: set[str] = set()  # preset files being checked right now


def presets() -> dict[str, dict[str, Any]]:
    path = resources.config_path("methods.yaml")
    shown = path.relative_to(resources.ROOT) if path.is_relative_to(resources.ROOT) else path
    data = resources.load_yaml(path)
    if str(path) in _CHECKING:
        # Checking a wrapper preset builds its inner method, which may itself be a preset of this file: that
        # entry is checked in its own turn, so the table is served as it stands instead of re-entering.
        table = data.get("presets") or {}
        return {str(k).strip().lower(): dict(v) for k, v in table.items() if isinstance(v, dict)}
    _CHECKING.add(str(path))
    try:
        return check_presets(data, str(shown))
    finally:
        _CHECKING.discard(str(path))


def check_presets(data: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """The `presets:` table of a methods YAML (already parsed), every entry checked before any is used: a
    mapping of new names (a preset never hides a method) to a registered `method` plus fields of that method,
    each of the field's type and accepted by the method, and optionally a `source` line. Errors name the file, the preset and the key."""
    table = data.get("presets")
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise InputError(f"{source}: 'presets:' must map preset names to settings, got {_kind(table)}")
    out: dict[str, dict[str, Any]] = {}
    for name, entry in table.items():
        key, where = str(name).strip().lower(), f"{source}: preset '{name}'"
        if key in METHODS:
            raise InputError(f"{where} has the name of a method ({METHODS.canonical(key)}); give the preset another name")
        if key in out:
            raise InputError(f"{where} is defined twice (names are not case-sensitive)")
        if not isinstance(entry, dict):
            raise InputError(f"{where} must be a mapping ({{method: NAME, field: value, ...}}), got {_kind(entry)}")
        base = entry.get("method")
        if not isinstance(base, str) or base.strip().lower() not in METHODS:
            known = f"{did_you_mean(str(base), METHODS.names())}; known: {', '.join(METHODS.names())}"
            raise InputError(f"{where}: 'method' must name a registered method, got {base!r}" + known)
        cls = METHODS.get(base)
        defaults = cls()
        fields = [f.name for f in dataclasses.fields(cls)]
        params = {}
        for pkey, value in entry.items():
            if pkey == "method":
                continue
            if pkey == "source":  # what the preset follows, shown by `kvbench methods`; not a hyper-parameter
                if not isinstance(value, str) or not value.strip():
                    raise InputError(f"{where}, key 'source': expected a non-empty string, got {_kind(value)} {value!r}")
                continue
            if pkey not in fields:
                raise InputError(f"{where}: {cls.name} has no parameter '{pkey}'{did_you_mean(str(pkey), fields)}")
            expected = _expected(getattr(defaults, pkey))
            if expected is not None and not expected[1](value):
                raise InputError(f"{where}, key '{pkey}': expected {expected[0]}, got {_kind(value)} {value!r}")
            params[pkey] = tuple(value) if isinstance(value, list) else value
        try:
            cls(**params)
        except (InputError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: {exc}") from None
        out[key] = dict(entry)
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


def _resolve(key: str) -> tuple[type[Method], dict[str, Any]]:
    """(registered class, preset parameters) of a registered method or preset name."""
    table = presets()
    if key in table:
        entry = dict(table[key])
        entry.pop("source", None)  # what the preset follows: shown by `kvbench methods`, not a hyper-parameter
        base = entry.pop("method", None)
        if base is None:
            raise InputError(f"configs/methods.yaml: preset '{key}' has no 'method'")
        return METHODS.get(base), entry
    if key not in METHODS:
        raise unknown("method", key, all_names())
    return METHODS.get(key), {}


def build(name: str, overrides: dict[str, str] | None = None) -> MethodChoice:
    """A method instance from a registry name or a preset, with --method-arg overrides applied. Overrides
    that do not apply to this method are an error (the caller filters per method when several are run)."""
    overrides = overrides or {}
    key = name.strip().lower()
    if "+" in key and key not in METHODS and key not in presets():  # a composition (kvbench.methods.compose)
        base_name, composed = compose.build_composition(key, overrides, _resolve)
        return MethodChoice(label=key, base=base_name, method=composed)
    cls, params = _resolve(key)
    base = cls.name
    if issubclass(cls, Wrapper):
        return MethodChoice(label=key, base=base, method=compose.build_wrapper(cls, key, params, overrides))
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
