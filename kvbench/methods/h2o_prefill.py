"""H2O, prefill-once variant (KVCache-Factory's H2OKVCluster), causal by default.

Per layer (methods.md §2.4): s[h, j] = sum over EVERY prefill query of its attention to key j, for the prefix
keys j < T - w, rounded to the model dtype as the official code sums in it; GQA: query heads reduced per KV
head with `gqa_reduce` (mean by default, "as SnapKV" in methods.md §7); no pooling; keep the top (C - w)
prefix tokens per KV head (ties: the earlier token) plus the last w tokens. No compression when T <= C; with
C <= w only the last C tokens.

`causal` chooses which attention the queries contribute:
- True (default): each query's causal row (LayerView.column_sums, computed in query blocks, fp32): the rule
  since KVCache-Factory commit 9f9aa2e ("Fix H2O causal masking", 2026-06-22).
- False (preset `h2o_factory_2024`): the rule before that fix, which produced the H2O baselines of the
  2024-25 papers built on KVCache-Factory (ChunkKV, PyramidKV). At ffac160 (pyramidkv/pyramidkv_utils.py
  L544-554) H2OKVCluster adds its causal mask to the last w x w block only and ignores the model's mask, so
  each of the first T - w queries takes a softmax over ALL T keys, future ones included, while the last w
  queries see every prefix key and the window causally. `noncausal_column_sums` computes exactly that, in
  query blocks (no T x T matrix).
Continuous H2O (accumulating during decoding) is the separate `h2o` method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.errors import InputError
from kvbench.methods.base import (
    HeadRanking,
    LayerView,
    Method,
    SelectContext,
    reduce_groups,
    split_budget,
    topk_sorted,
    with_window,
)
from kvbench.methods.snapkv import checked_scores, window_fallback


def noncausal_column_sums(view: LayerView, window: int, block: int = 512) -> torch.Tensor:
    """[H_q, T] float32: column sums of KVCache-Factory's pre-fix H2O attention (module docstring). Queries
    0 .. T_q - w - 1 are unmasked softmax rows over all T keys; the last w queries are the causal window rows.
    GQA: a KV head's g query heads share one matmul."""
    h_q, tq, d = view.query.shape
    h_kv, t, g = view.keys.shape[0], view.n_tokens, view.group
    w = min(window, tq)
    keys = view.keys.float().transpose(1, 2)
    total = torch.zeros(h_q, t, dtype=torch.float32, device=keys.device)
    for start in range(0, tq - w, block):
        stop = min(start + block, tq - w)
        q = view.query[:, start:stop, :].float().reshape(h_kv, g * (stop - start), d)
        logits = torch.matmul(q, keys).view(h_q, stop - start, t).mul_(view.scaling)
        total += torch.softmax(logits, dim=-1).sum(dim=1)
    if w > 0:
        total += view.window_attention(w).sum(dim=1)
    return total


@dataclass
class H2OPrefill(Method):
    name = "h2o_prefill"
    family = "accumulated attention"
    query_aware = True
    ranked = True
    source = (
        "Zhang et al. 2023, H2O, arXiv 2306.14048; prefill-once as KVCache-Factory H2OKVCluster (w=8, no pooling) "
        "with its causal-mask fix (commit 9f9aa2e); causal=false: the pre-fix scores (ffac160 L544-554)"
    )
    # 2: column sums from the attention kernel's log-sum-exp (equal to version 1's to float32 rounding);
    # 3: those sums in cache-sized tiles; 4: in base 2 (float32 rounding each time). Only the causal sums
    # changed: see code_version.
    version = 4
    added_params: ClassVar[dict[str, Any]] = {"causal": True}

    window_size: int = 8  # last w tokens always kept, excluded from the ranking (named as in the official code)
    causal: bool = True  # False: KVCache-Factory's pre-fix non-causal scores (2024-25 baselines)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 0:
            raise InputError(f"h2o_prefill: window_size must be >= 0, got {self.window_size}")

    def window(self) -> int:
        return 0 if self.causal else self.window_size

    def prefill_needs(self) -> frozenset[str]:
        # the pre-fix scores read every query against every key, future ones included: no chunked prefill
        return frozenset({"column_sums"} if self.causal else {"all_queries"})

    def scorer_key(self) -> tuple:
        if self.causal:
            return ("h2o-prefill-colsum", self.window_size, self.gqa_reduce)
        return ("h2o-prefill-noncausal", self.window_size, self.gqa_reduce)

    def code_version(self) -> int:
        return self.version if self.causal else 2  # the pre-fix, non-causal scores are as they were at version 2

    def score(self, view: LayerView) -> torch.Tensor:
        prefix = max(0, view.n_tokens - self.window_size)
        sums = view.column_sums() if self.causal else noncausal_column_sums(view, self.window_size)
        return reduce_groups(sums[:, :prefix].to(view.query.dtype).float(), view.keys.shape[0], self.gqa_reduce)

    def select(self, ctx: SelectContext) -> torch.Tensor:
        fallback = window_fallback(ctx, self.window_size)
        if fallback is not None:
            return fallback
        selected, w = split_budget(ctx.kept, self.window_size)
        scores = checked_scores(ctx, self.name)
        return with_window(topk_sorted(scores, selected), ctx.n_tokens, w)

    def ranking(self, ctx: SelectContext) -> HeadRanking:
        return HeadRanking.with_window(checked_scores(ctx, self.name), ctx.n_tokens, ctx.kept)
