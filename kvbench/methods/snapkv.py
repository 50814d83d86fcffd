"""SnapKV: keep the prefix tokens the last w prompt queries attend to most, plus those w tokens.

Per layer (methods.md §2.2, §1.1):
1. A = causal softmax of the last w = `window_size` queries over every key (LayerView.window_attention), fp32, rounded
   to the model dtype as the official code does (`softmax(..., dtype=float32).to(query.dtype)`);
2. s[h, j] = sum over the window queries of A[h, q, j], for the prefix keys j < T - w, summed in the
   model dtype and then taken to fp32;
3. GQA: the g query heads of each KV head are reduced with `gqa_reduce` (mean by default) BEFORE pooling, as
   KVCache-Factory's `--kv_cache_granularity kv_head` does; the cache stays at KV-head granularity;
4. 1-D pooling along the prefix (stride 1, padding kernel // 2; max, avg or none);
5. select: the top (C - w) prefix positions per KV head (ties go to the earlier token), plus the window.
   C = the budget, window included. No compression when T <= C. With C <= w only the last C tokens
   are kept (the official code asserts C > window instead).

The scores are budget independent, so one prefill serves every budget; PyramidKV and ChunkKV with the same
(window_size, kernel_size, pooling, gqa_reduce) reuse them (same scorer_key)."""

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
    pool1d,
    reduce_groups,
    split_budget,
    topk_sorted,
    with_window,
)

POOLING = ("max", "avg", "none")


def window_scores(view: LayerView, window: int, kernel: int, pooling: str, gqa_reduce: str) -> torch.Tensor:
    """SnapKV token scores of the prefix keys 0 .. T-window-1: [H_kv, T - window] float32 (steps 1-4 above)."""
    n_tokens = view.n_tokens
    w = min(window, n_tokens)
    if n_tokens - w == 0:
        return torch.zeros(view.keys.shape[0], 0, dtype=torch.float32, device=view.keys.device)
    attn = view.window_attention(w)[:, :, : n_tokens - w]  # [H_q, w, T - w]
    summed = attn.to(view.query.dtype).sum(dim=1).float()  # official: rounded to the model dtype, then summed
    per_kv = reduce_groups(summed, view.keys.shape[0], gqa_reduce)
    return pool1d(per_kv, kernel, pooling)


def keep_last(n_heads: int, n_tokens: int, k: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n_tokens - k, n_tokens, device=device).expand(n_heads, k)


def window_fallback(ctx: SelectContext, window: int) -> torch.Tensor | None:
    """The selection of a method with an observation window that needs no scores: every token when the prompt
    fits the budget, the last C tokens when the budget is no larger than the window; None otherwise."""
    if ctx.n_tokens <= ctx.kept:
        return full_indices(ctx.n_kv_heads, ctx.n_tokens, ctx.keys.device)
    if split_budget(ctx.kept, window)[1] < window:
        return keep_last(ctx.n_kv_heads, ctx.n_tokens, ctx.kept, ctx.keys.device)
    return None


def checked_scores(ctx: SelectContext, method: str) -> torch.Tensor:
    if ctx.scores is None:
        raise RuntimeError(f"{method}: no prefill scores for layer {ctx.layer} (the scorer did not observe it)")
    return ctx.scores


@dataclass
class SnapKV(Method):
    name = "snapkv"
    family = "window attention"
    query_aware = True
    ranked = True
    source = (
        "Li et al. 2024, SnapKV, arXiv 2404.14469; scoring as FasterDecoding/SnapKV snapkv_utils.py, "
        "defaults w=8 k=7 maxpool as KVCache-Factory run_longbench.py, GQA as its kv_head granularity"
    )

    # Named as in the official code (SnapKVCluster / KVCache-Factory / kvpress): a field called `window` would
    # shadow Method.window(), the hook through which the engine learns the observation window.
    window_size: int = 8  # observation window w: the last w prompt queries; their tokens are always kept
    kernel_size: int = 7  # pooling kernel
    pooling: str = "max"  # max | avg | none

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 1:
            raise InputError(f"{self.name}: window_size must be >= 1, got {self.window_size}")
        if self.kernel_size < 1:
            raise InputError(f"{self.name}: kernel_size must be >= 1, got {self.kernel_size}")
        if self.pooling not in POOLING:
            raise InputError(f"{self.name}: pooling must be one of {', '.join(POOLING)}, got '{self.pooling}'")

    def window(self) -> int:
        return self.window_size

    def scorer_key(self) -> tuple:
        return ("snapkv-window", self.window_size, self.kernel_size, self.pooling, self.gqa_reduce)

    def score(self, view: LayerView) -> torch.Tensor:
        return window_scores(view, self.window_size, self.kernel_size, self.pooling, self.gqa_reduce)

    def prefix_budget(self, ctx: SelectContext) -> int:
        """Selected prefix tokens for this layer (window excluded); called only when T > C."""
        return ctx.kept - self.window_size

    def select(self, ctx: SelectContext) -> torch.Tensor:
        fallback = window_fallback(ctx, self.window_size)
        if fallback is not None:
            return fallback
        _, w = split_budget(ctx.kept, self.window_size)
        scores = checked_scores(ctx, self.name)
        return with_window(topk_sorted(scores, self.prefix_budget(ctx)), ctx.n_tokens, w)

    def ranking(self, ctx: SelectContext) -> HeadRanking:
        return HeadRanking.with_window(checked_scores(ctx, self.name), ctx.n_tokens,
                                       self.prefix_budget(ctx) + self.window_size)
