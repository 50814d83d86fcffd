"""Ada-KV: one layer budget shared by the layer's heads, allocated by the wrapped method's own scores
(methods-2 §2.13; Feng et al., arXiv 2407.11550). Wraps any method that selects the top of a per-token
ranking (snapkv, pyramidkv, h2o_prefill, knorm, expected_attention, ...: `inner`, a method or preset;
--method-arg keys other than adakv's own go to it, kvbench.methods.compose).

Per layer, with k the inner method's per-head budget for the layer (window included; PyramidKV's layer
budget for pyramidkv), H the stored heads and w its protected tokens (window, sinks):

- `variant=kvpress` (kvpress 0.5.5 AdaKVPress, adakv_press.py L54-81): every head's n_safe = int(alpha k)
  best tokens (at least 1) and its protected tokens are forced in; then the layer keeps its H k best
  (head, token) entries under one common threshold. Head h keeps b_h >= n_safe tokens, sum b_h = H k exactly:
  the layer holds the same bytes as the inner method at the same budget.
- `variant=official` (FFY0/AdaKV AdaptiveSnapKVCluster, snapkv_utils.py L297-619; KCF AdaKVCluster with
  normalize on): the window is outside the allocation: B = k - w per head; c_h = head h's share of the
  layer's H B best prefix scores (scores scaled per head by (sum of its B best) / (sum of all) when
  `normalize`); cap_h = round((1 - alpha) c_h + int(alpha B)) (convex mix, float32, half to even: the
  caps' sum may miss H B by the rounding); head h keeps its cap_h best prefix tokens plus the w.
  No compression when B > T - w, as the official code.

Heads keep different numbers of tokens: select returns a ragged Selection and the engine stores each head's
real length (padding is masked and reported apart; nothing is masked instead of evicted). No compression when
T <= k; a budget at most the protected tokens falls back to the inner method's own select. Ties go to the
earlier (head, token). Query-aware exactly when the inner method is. The official `skip` layers option is not
offered (its LongBench script leaves it at 0)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.errors import InputError
from kvbench.methods.base import Method, Selection, SelectContext, full_indices
from kvbench.methods.head_budgets import keep_top_caps, kvpress_allocation, official_caps
from kvbench.methods.wrapper import Wrapper

VARIANTS = ("kvpress", "official")


@dataclass
class AdaKV(Wrapper):
    name = "adakv"
    source = (
        "Feng et al. 2024, Ada-KV, arXiv 2407.11550; kvpress 0.5.5 AdaKVPress (adakv_press.py L54-81) and "
        "official FFY0/AdaKV efe4e2e AdaptiveSnapKVCluster (snapkv_utils.py L297-619); methods-2 §2.13"
    )
    family = "head-adaptive budgets"

    inner: str = "snapkv"
    alpha: float = 0.2  # safeguard: kvpress's per-head floor share, the official convex-mix weight
    variant: str = "kvpress"  # kvpress | official
    normalize: bool = False  # official only: scale each head's scores by its top-B share (KCF's default)

    @property
    def head_adaptive(self) -> bool:
        return True  # whatever the inner method: the allocation gives heads different lengths

    def check_inner(self, inner: Method) -> None:
        if not type(inner).ranked:
            from kvbench.methods import METHODS

            ranked = ", ".join(name for name, cls in METHODS.items() if cls.ranked)
            raise InputError(f"adakv: inner method {inner.name} does not keep the top of a per-token ranking; "
                             f"wrap one that does ({ranked}) or a preset of one")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise InputError(f"adakv: alpha must be in [0, 1], got {self.alpha}")
        if self.variant not in VARIANTS:
            raise InputError(f"adakv: variant must be kvpress or official, got '{self.variant}'")
        if self.normalize and self.variant != "official":
            raise InputError("adakv: normalize applies to variant=official only")

    def select(self, ctx: SelectContext) -> torch.Tensor | Selection:
        if ctx.n_tokens <= ctx.kept:
            return full_indices(ctx.n_kv_heads, ctx.n_tokens, ctx.keys.device)
        ranking = self.inner_method.ranking(ctx)
        if ranking is None or int(ranking.protected.sum()) >= ranking.kept:
            return self.inner_method.select(ctx)  # a layer the inner method keeps whole, or a budget inside the window
        if ranking.kept >= ctx.n_tokens:
            return full_indices(ctx.n_kv_heads, ctx.n_tokens, ctx.keys.device)
        if self.variant == "kvpress":
            return kvpress_allocation(ranking, self.alpha)
        free = ~ranking.protected
        budget = ranking.kept - int(ranking.protected.sum())
        if budget > int(free.sum()):
            return full_indices(ctx.n_kv_heads, ctx.n_tokens, ctx.keys.device)
        return keep_top_caps(ranking, official_caps(ranking.scores[:, free], budget, self.alpha, self.normalize))
