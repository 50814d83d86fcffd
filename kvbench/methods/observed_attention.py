"""ObservedAttention: keep the keys with the highest MEAN attention received during the prefill
(methods-2.md §2.23; kvpress 0.5.5 `observed_attention_press.py` L34-49).

Per layer, with A the causal prefill attention [H_q, T_q, T]:
  s[h, j] = (sum over the queries i of A[h, i, j]) / (number of queries that see key j)
(the numerator is LayerView.column_sums, computed in query blocks, float32, never a T x T matrix; with a
prefill of the whole prompt the count is T - j). GQA: query heads reduced per KV head with `gqa_reduce` (mean
by default, as kvpress). Keep the top C per KV head; no window, no pooling; ties go to the earlier token; no
compression when T <= C.

H2O (`h2o_prefill`) sums the same column, which favours early keys (more queries see them); dividing by the
count lifts late keys instead: key T-1 is seen by one query only.
kvpress needs eager attention for the full matrix and follows eager's dtypes (probabilities rounded to the
model dtype, then summed and divided in it); kvbench sums float32 probabilities, so on bf16 models the two can
order near-equal keys differently. kvpress cannot wrap it in AdaKV (its eager assertion); kvbench's scores are
explicit, so a later head-adaptive wrapper can."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.methods.base import (
    HeadRanking,
    LayerView,
    Method,
    SelectContext,
    full_indices,
    reduce_groups,
    topk_sorted,
)
from kvbench.methods.snapkv import checked_scores


def observed_counts(n_tokens: int, n_queries: int, device: torch.device) -> torch.Tensor:
    """[T] float32: how many of the last n_queries queries see key j (query i sits at T - n_queries + i)."""
    return (n_tokens - torch.arange(n_tokens, device=device)).clamp(max=n_queries).float()


@dataclass
class ObservedAttention(Method):
    name = "observed_attention"
    family = "accumulated attention"
    query_aware = True
    ranked = True
    source = (
        "kvpress 0.5.5 ObservedAttentionPress (observed_attention_press.py L34-49), mean-attention relative "
        "of H2O (Zhang et al. 2023, arXiv 2306.14048); methods-2.md §2.23"
    )
    # 2: the causal column sums in cache-sized tiles (LayerView.column_sums); 3: in base 2 (float32 rounding each)
    version = 3

    def scorer_key(self) -> tuple:
        return ("observed-attention", self.gqa_reduce)

    def prefill_needs(self) -> frozenset[str]:
        return frozenset({"column_sums"})

    def score(self, view: LayerView) -> torch.Tensor:
        # a chunked prefill seeds column sums over every query, 0 .. T-1, while `query` holds only the last ones
        n_queries = view.n_tokens if view.partial_queries else view.query.shape[1]
        counts = observed_counts(view.n_tokens, n_queries, view.keys.device)
        return reduce_groups(view.column_sums() / counts, view.keys.shape[0], self.gqa_reduce)

    def select(self, ctx: SelectContext) -> torch.Tensor:
        if ctx.n_tokens <= ctx.kept:
            return full_indices(ctx.n_kv_heads, ctx.n_tokens, ctx.keys.device)
        return topk_sorted(checked_scores(ctx, self.name), ctx.kept)

    def ranking(self, ctx: SelectContext) -> HeadRanking:
        return HeadRanking.plain(checked_scores(ctx, self.name), ctx.kept)
