"""H2O, prefill-once variant (KVCache-Factory's H2OKVCluster) with the causal mask fixed.

Per layer (methods.md §2.4): s[h, j] = sum over EVERY prefill query of its causal attention to key j
(LayerView.column_sums, computed in query blocks, fp32), for the prefix keys j < T - w, rounded to the model
dtype as the official code sums in it; GQA: query heads reduced per KV head with `gqa_reduce` (mean by
default, "as SnapKV" in methods.md §7); no pooling; keep the top (C - w) prefix tokens per KV head (ties: the
earlier token) plus the last w tokens. No compression when T <= C; with C <= w only the last C tokens.

KVCache-Factory before commit 9f9aa2e masked only the last w x w block, so earlier queries attended to future
keys while scoring; published 2024-25 numbers used those non-causal scores. This is the fixed, causal rule.
Continuous H2O (accumulating during decoding) is the separate `h2o` method."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.errors import InputError
from kvbench.methods.base import (
    HeadRanking,
    LayerView,
    Method,
    SelectContext,
    full_indices,
    reduce_groups,
    split_budget,
    topk_sorted,
    with_window,
)
from kvbench.methods.snapkv import checked_scores, keep_last


@dataclass
class H2OPrefill(Method):
    name = "h2o_prefill"
    family = "accumulated attention"
    query_aware = True
    ranked = True
    source = (
        "Zhang et al. 2023, H2O, arXiv 2306.14048; prefill-once as KVCache-Factory H2OKVCluster (w=8, no pooling) "
        "with its causal-mask fix (commit 9f9aa2e)"
    )
    version = 2  # 2: column sums from the attention kernel's log-sum-exp (equal to version 1's to float32 rounding)

    window_size: int = 8  # last w tokens always kept, excluded from the ranking (named as in the official code)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 0:
            raise InputError(f"h2o_prefill: window_size must be >= 0, got {self.window_size}")

    def prefill_needs(self) -> frozenset[str]:
        return frozenset({"column_sums"})

    def scorer_key(self) -> tuple:
        return ("h2o-prefill-colsum", self.window_size, self.gqa_reduce)

    def score(self, view: LayerView) -> torch.Tensor:
        prefix = max(0, view.n_tokens - self.window_size)
        sums = view.column_sums()[:, :prefix].to(view.query.dtype).float()
        return reduce_groups(sums, view.keys.shape[0], self.gqa_reduce)

    def select(self, ctx: SelectContext) -> torch.Tensor:
        device = ctx.keys.device
        if ctx.n_tokens <= ctx.kept:
            return full_indices(ctx.n_kv_heads, ctx.n_tokens, device)
        selected, w = split_budget(ctx.kept, self.window_size)
        if w < self.window_size:
            return keep_last(ctx.n_kv_heads, ctx.n_tokens, ctx.kept, device)
        scores = checked_scores(ctx, self.name)
        return with_window(topk_sorted(scores, selected), ctx.n_tokens, w)

    def ranking(self, ctx: SelectContext) -> HeadRanking:
        return HeadRanking.with_window(checked_scores(ctx, self.name), ctx.n_tokens, ctx.kept)
