"""Methods that hold another method (methods-2.md §4 items 4 and 6).

A wrapper's `inner` field names the method it wraps: a registered method, a preset or a composition
("snapkv+think"). Everything the engine asks of a method (window, scorer, selection, budget use, transforms)
goes to the inner method unless the wrapper adds to it; its `scorer_key` is the inner one's unless it scores
something of its own, so score sharing between plans still works. The row's `params` hold the inner
method's resolved parameters (`inner_params`), so two wrappers of differently configured inner methods never
share a configuration fingerprint.

Transform wrappers (ThinK, KIVI) run after the inner method's selection, on the kept entries: select ->
channel mask -> quantize, in that order, each stage logged with the bytes it leaves (kvbench.methods.storage).
`X+Y` on the command line is the transform Y wrapping X (kvbench.methods.compose)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.errors import InputError
from kvbench.methods.base import LayerView, Method, SelectContext, Selection
from kvbench.methods.storage import LayerStorage, Lifecycle, TransformContext

# Fields every Method has; on a wrapper they are its inner method's (mirrored so the engine reads them).
INHERITED = ("gqa_reduce", "position_mode")


def build_inner(label: str) -> Method:
    from kvbench.methods import build  # the registry imports the wrappers

    return build(label).method


@dataclass
class Wrapper(Method):
    """Base class: `inner` is resolved when the wrapper is made; `with_inner` installs an already built one
    (a composition, or an inner method with --method-arg overrides)."""

    inner: str = "fullkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.inner, str) or not self.inner.strip():
            raise InputError(f"{self.name}: inner must name a method, got {self.inner!r}")
        self._inner = build_inner(self.inner)
        self._adopt()

    def with_inner(self, method: Method) -> "Wrapper":
        self._inner = method
        self._adopt()
        return self

    def _adopt(self) -> None:
        self.check_inner(self._inner)
        self.gqa_reduce = self._inner.gqa_reduce
        self.position_mode = self._inner.position_mode

    def check_inner(self, inner: Method) -> None:
        """Refuse inner methods this wrapper cannot wrap (raise InputError)."""

    @property
    def inner_method(self) -> Method:
        return self._inner

    @classmethod
    def own_fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in INHERITED and f.name != "inner"]

    # ---- description ---------------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        own = {name: getattr(self, name) for name in self.own_fields()}
        out = {"inner": self.inner, **own, "inner_params": self._inner.params()}
        version = self._inner.code_version()
        if version != 1:  # the inner method's code version is part of the configuration, as it is alone
            out["inner_version"] = version
        return out

    def parameter_names(self) -> set[str]:
        return {"inner", *self.own_fields()} | self._inner.parameter_names()

    def describe(self) -> str:
        own = ", ".join(f"{name}={getattr(self, name)}" for name in self.own_fields())
        return f"inner={self.inner} ({self._inner.describe()})" + (f", {own}" if own else "")

    @property
    def query_aware(self) -> bool:
        return bool(getattr(self._inner, "query_aware", False))

    @property
    def head_adaptive(self) -> bool:
        return bool(getattr(self._inner, "head_adaptive", False))

    # ---- what the engine asks: the inner method's answers -------------------------------------------------
    def window(self) -> int:
        return self._inner.window()

    def scorer_key(self) -> tuple | None:
        return self._inner.scorer_key()

    def prefill_needs(self) -> frozenset[str]:
        return self._inner.prefill_needs()

    def score(self, view: LayerView) -> Any:
        return self._inner.score(view)

    def query_head_selection(self) -> bool:
        return self._inner.query_head_selection()

    def bind_model(self, identity: str, model_name: str) -> None:
        self._inner.bind_model(identity, model_name)

    def artifacts(self) -> dict[str, str]:
        return self._inner.artifacts()

    def select(self, ctx: SelectContext) -> "torch.Tensor | Selection":
        return self._inner.select(ctx)

    @property
    def uses_budget(self) -> bool:
        return self._inner.uses_budget

    def stages(self) -> tuple[str, ...]:
        return self._inner.stages()

    def transform(self, ctx: TransformContext) -> None:
        self._inner.transform(ctx)

    def lifecycle(self, storages: list[LayerStorage]) -> Lifecycle | None:
        return self._inner.lifecycle(storages)


@dataclass
class TransformWrapper(Wrapper):
    """A transform of the inner method's kept entries (ThinK's channel mask, KIVI's quantization)."""

    stage: ClassVar[str] = ""  # "channel_mask" or "quantize": their order is fixed
    ORDER: ClassVar[tuple[str, ...]] = ("channel_mask", "quantize")

    def check_inner(self, inner: Method) -> None:
        if inner.continuous:
            raise InputError(
                f"{self.name} transforms the entries a method keeps once after the prefill, and {inner.name} "
                f"keeps evicting while decoding; wrap a prefill-once method (e.g. snapkv+{self.name})")
        for stage in _stage_kinds(inner):
            if stage == self.stage:
                raise InputError(f"{self.name}: the inner method already applies a {stage} transform")
            if self.ORDER.index(stage) > self.ORDER.index(self.stage):
                raise InputError(f"{self.name} ({self.stage}) must come before the {stage} transform: transforms "
                                 f"run as select -> channel mask -> quantize, e.g. snapkv+think+kivi4")

    def own_scores(self, scores: Any) -> Any:
        """This wrapper's part of the layer's scores; the inner method's part is `inner_scores`."""
        return None

    def inner_scores(self, scores: Any) -> Any:
        return scores

    def select(self, ctx: SelectContext) -> "torch.Tensor | Selection":
        return self._inner.select(dataclasses.replace(ctx, scores=self.inner_scores(ctx.scores)))

    def stages(self) -> tuple[str, ...]:
        return (*self._inner.stages(), self.name)

    def transform(self, ctx: TransformContext) -> None:
        scores = ctx.scores
        ctx.scores = self.inner_scores(scores)
        self._inner.transform(ctx)
        ctx.scores = scores
        self.apply(ctx, self.own_scores(scores))
        ctx.record(self.name)

    def apply(self, ctx: TransformContext, scores: Any) -> None:
        raise NotImplementedError


def _stage_kinds(method: Method) -> list[str]:
    kinds = []
    while isinstance(method, Wrapper):
        if isinstance(method, TransformWrapper):
            kinds.append(method.stage)
        method = method.inner_method
    return kinds
