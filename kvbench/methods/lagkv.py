"""LagKV: score a token by how much it stands out against the NEXT ("lag") partition of the sequence
(methods-2.md §2.20; Liang et al. 2025, arXiv 2504.04704). This is kvpress's variant (0.5.5 `lagkv_press.py`
L40-97), one-shot after the prefill.

Per KV head, with n_s = `n_sink`, L = `lag_size`, T prompt tokens:
- T >= n_s + 2L: positions [n_s, end), end = n_s + floor((T - n_s) / L) L, are cut into partitions of L tokens.
  Each partition but the last full one is scored against the partition after it, for keys and for values:
      x~_j = (x_j - min) / (max - min + eps)   (per channel; min and max over the NEXT partition's L tokens)
      score_j = softmax over the partition's L tokens of std over channels of x~_j (unbiased std)
  s = (key score + value score) / 2. Unless `cross_scoring`, s becomes the token's rank within its partition
  divided by L (0 .. (L-1)/L; ties: the earlier token ranks higher), so every partition keeps about the same
  share. The n_s sinks and the tail (last full partition + remainder, L <= tail < 2L) score 1.
- T < n_s + 2L: sinks score 1, token j >= n_s scores (j - n_s) / (T - n_s): sinks plus the most recent
  tokens, i.e. StreamingLLM (kvpress's comment says "no compression"; its code does this).
Keep the top C per KV head over all positions (the global rank threshold). Ties go to the earlier token;
kvpress leaves them to torch.topk's order. Ties are the rule here, not the exception: every rank value is shared
by one token of each partition, and the sinks and tail all score 1. So whenever C does not end on a whole rank
(or C < n_s + tail), the two keep different tokens among those at the boundary score: kvbench the earlier
partitions' (or the sinks, then the earliest tail tokens), kvpress whichever topk returns (on the tiny model of
methods-2 §5.1: not the sinks). tests/test_kvpress_parity_2025.py pins this. No compression when T <= C. Scores in float32; `eps` = 0
reproduces kvpress exactly, including the NaN a channel constant over a reference partition produces there.

The official LagKV (AI-Lab-China-Merchants-Bank/LagKV `lag_kv.py`) differs: it is a continuous cache that
compresses each newly completed partition during decoding too, keeps the top floor(ratio L) of EVERY partition
(ratio = the kept fraction per partition, sinks and tail on top of it, so it keeps more than the ratio), sums
key and value scores (score_v_ratio 1), and defaults to 16 sinks and L = 1024. Not implemented here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.errors import InputError
from kvbench.methods.base import HeadRanking, LayerView, Method, SelectContext, full_indices, topk_sorted
from kvbench.methods.snapkv import checked_scores


def lag_scores(parts: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """parts [H, P, L, d] (P >= 2 partitions) -> [H, P - 1, L]: each partition scored against the next."""
    reference, current = parts[:, 1:], parts[:, :-1]
    low = reference.amin(dim=2, keepdim=True)
    high = reference.amax(dim=2, keepdim=True)
    return ((current - low) / (high - low + eps)).std(dim=-1).softmax(dim=-1)


def rank_within(scores: torch.Tensor) -> torch.Tensor:
    """[..., L] -> rank / L in [0, (L-1)/L], the best token (L-1)/L; equal scores: the earlier token higher."""
    length = scores.shape[-1]
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    place = torch.argsort(order, dim=-1)  # 0 for the best token
    return (length - 1 - place).float() / length


def lagkv_scores(keys: torch.Tensor, values: torch.Tensor, n_sink: int, lag: int, cross_scoring: bool,
                 eps: float = 0.0) -> torch.Tensor:
    """keys, values [H, T, d] -> [H, T] float32 LagKV scores (module docstring)."""
    heads, n_tokens, dim = keys.shape
    if n_tokens < n_sink + 2 * lag:  # too short to have a scored partition: sinks + most recent
        scores = torch.ones(heads, n_tokens, dtype=torch.float32, device=keys.device)
        if n_tokens > n_sink:
            recent = torch.arange(n_tokens - n_sink, device=keys.device, dtype=torch.float32)
            scores[:, n_sink:] = recent / (n_tokens - n_sink)
        return scores
    end = n_sink + (n_tokens - n_sink) // lag * lag
    key_part = keys[:, n_sink:end].float().reshape(heads, -1, lag, dim)
    value_part = values[:, n_sink:end].float().reshape(heads, -1, lag, dim)
    scores = (lag_scores(key_part, eps) + lag_scores(value_part, eps)) / 2
    if not cross_scoring:
        scores = rank_within(scores)
    ones = torch.ones(heads, n_sink, dtype=torch.float32, device=keys.device)
    tail = torch.ones(heads, n_tokens - end + lag, dtype=torch.float32, device=keys.device)
    return torch.cat([ones, scores.reshape(heads, -1), tail], dim=-1)


@dataclass
class LagKV(Method):
    name = "lagkv"
    family = "key/value geometry"
    ranked = True  # its ties (shared ranks, sinks and tail at 1) go to the earlier (head, token) under Ada-KV too
    source = (
        "Liang et al. 2025, LagKV, arXiv 2504.04704; kvpress 0.5.5 LagKVPress (lagkv_press.py L40-97) variant, "
        "n_sink 4, lag 128; methods-2.md §2.20"
    )

    n_sink: int = 4  # first tokens always kept
    lag_size: int = 128  # partition length L
    cross_scoring: bool = False  # raw softmax scores across partitions instead of within-partition ranks
    eps: float = 0.0  # added to each reference channel's range (0: kvpress, no guard against max = min)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_sink < 0:
            raise InputError(f"lagkv: n_sink must be >= 0, got {self.n_sink}")
        if self.lag_size < 2:
            raise InputError(f"lagkv: lag_size must be >= 2, got {self.lag_size}")
        if self.eps < 0:
            raise InputError(f"lagkv: eps must be >= 0, got {self.eps}")

    def query_head_selection(self) -> bool:
        return False  # scored from the keys (and values) alone: a group's query heads would keep identical sets

    def scorer_key(self) -> tuple:
        return ("lagkv", self.n_sink, self.lag_size, self.cross_scoring, self.eps)

    def score(self, view: LayerView) -> torch.Tensor:
        return lagkv_scores(view.keys, view.values, self.n_sink, self.lag_size, self.cross_scoring, self.eps)

    def select(self, ctx: SelectContext) -> torch.Tensor:
        if ctx.n_tokens <= ctx.kept:
            return full_indices(ctx.n_kv_heads, ctx.n_tokens, ctx.keys.device)
        return topk_sorted(checked_scores(ctx, self.name), ctx.kept)

    def ranking(self, ctx: SelectContext) -> HeadRanking:
        return HeadRanking.plain(checked_scores(ctx, self.name), ctx.kept)
