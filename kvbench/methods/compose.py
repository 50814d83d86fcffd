"""Building wrapper methods and compositions (`--method snapkv+kivi4`, methods-2.md §2.18, §4 item 6).

`A+B` is the transform B (think, kivi2, kivi4, or a preset of one) wrapping A, which may itself be a
composition: `snapkv+think+kivi4` is kivi4(think(snapkv)). The label is what the user typed; the row's
method is the outermost transform and its params name every part (`inner`, `inner_params`).

--method-arg keys go to the outermost part that has them (a wrapper's own fields first, then its inner
method's), so `snapkv+kivi4 --method-arg window_size=32 --method-arg bits=2` sets SnapKV's window and KIVI's
bits. A wrapper's own field names never collide with the methods it wraps."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvbench.errors import InputError
from kvbench.methods.base import Method
from kvbench.methods.wrapper import TransformWrapper, Wrapper


def split_composition(key: str) -> tuple[str, str]:
    """'a+b+c' -> ('a+b', 'c'); refuses empty parts."""
    parts = [p.strip() for p in key.split("+")]
    if any(not p for p in parts):
        raise InputError(f"--method {key}: empty part; compose as METHOD+TRANSFORM, e.g. snapkv+kivi4")
    return "+".join(parts[:-1]), parts[-1]


def build_wrapper(cls: type[Wrapper], label: str, preset: dict[str, Any], overrides: dict[str, str],
                  inner_label: str | None = None) -> Wrapper:
    """An instance of the wrapper class `cls` (as named by `label`, with a preset's parameters), wrapping
    `inner_label` (a composition's left part) or the `inner` of the overrides, the preset or the class."""
    from kvbench.methods import _coerce, build

    own = cls.own_fields()
    params = dict(preset)
    preset_inner = params.pop("inner", None)
    for key in params:
        if key not in own:
            raise InputError(f"kvbench/configs/methods.yaml: preset '{label}': {cls.name} has no parameter '{key}'")
    if inner_label is not None and (preset_inner is not None or "inner" in overrides):
        raise InputError(f"--method {inner_label}+{label}: {label} already names its inner method "
                         f"({overrides.get('inner', preset_inner)}); give it once")
    default_inner = next(f.default for f in dataclasses.fields(cls) if f.name == "inner")
    inner_label = inner_label or overrides.get("inner") or preset_inner or default_inner
    inner_default = build(inner_label).method
    accepted = {"inner", *own} | inner_default.parameter_names()
    for key in overrides:
        if key not in accepted:
            raise InputError(f"--method-arg {key}: {label} (over {inner_label}) has no parameter '{key}'; "
                             f"it has {', '.join(sorted(accepted))}")
    field_defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, value in overrides.items():
        if key in own:
            params[key] = _coerce(value, field_defaults[key], key, cls.name)
    inner_overrides = {k: v for k, v in overrides.items() if k not in own and k != "inner"}
    inner = build(inner_label, inner_overrides).method if inner_overrides else inner_default
    try:
        wrapper = cls(inner=inner_label, **params)
    except TypeError as exc:
        raise InputError(f"method {cls.name}: {exc}") from None
    return wrapper.with_inner(inner)


def build_composition(key: str, overrides: dict[str, str], resolve: Any) -> tuple[str, Method]:
    """(registered name of the outermost transform, the method) for 'a+b'. `resolve(name)` gives the
    (registered class, preset parameters) of a method or preset name."""
    inner_label, outer = split_composition(key)
    cls, preset = resolve(outer)
    if not (isinstance(cls, type) and issubclass(cls, TransformWrapper)):
        raise InputError(f"--method {key}: '{outer}' is not a transform; after '+' come transforms applied to "
                         f"the kept entries (think, kivi2, kivi4), e.g. snapkv+kivi4")
    return cls.name, build_wrapper(cls, outer, preset, overrides, inner_label)
