"""ChunkKV: keep whole chunks of consecutive prefix tokens, chosen by their SnapKV scores, plus the window.

Per layer, with C the budget (window included), w the window and c the chunk size:
1. token scores: SnapKV's window scores of the prefix keys j < T - w (same scorer, so shared with snapkv and
   pyramidkv of equal window_size/kernel_size/pooling/gqa_reduce; pooling "none" gives Algorithm 1's raw sum);
2. layer-shared (default, as kvpress ChunkKVPress): token scores summed over the KV heads, one chunk set for
   every head; `per_head`: each KV head ranks its own chunks;
3. the prefix is cut into ceil((T - w) / c) chunks [i c, (i+1) c); the last one may be shorter. Chunk score =
   sum of its token scores (paper, `chunk_agg=sum`) or their mean over its actual length (kvpress, `mean`);
4. exact budget [ours]: chunks are taken in descending score (ties: the earlier chunk) until they cover
   C - w tokens. Every chosen chunk is kept whole except the last one chosen (the lowest-ranked), which is
   truncated to its leading tokens so that exactly C - w prefix tokens are kept. With c | (C - w) and no
   short tail chunk chosen that is exactly floor((C - w) / c) whole chunks. The kept tokens stay in their
   original order, and the w window tokens follow.
   The paper instead keeps floor(C / c) chunks of the whole sequence and lets the window overwrite the tail of
   their concatenation (K''[0 : C - w] + window); kvpress keeps max(1, int(n_chunks x ratio)) whole chunks
   including the window's, so neither keeps exactly C tokens.
5. `reuse_layers` = N (paper Algorithm 2, N = 2 in its experiments): layers with l % N != 0 keep the indices
   of the layer below when their shape fits (same heads, same count, all inside the prompt); otherwise they
   select afresh. Scores are still computed for every layer (one prefill serves all methods), so this changes
   what is kept, not the prefill cost.
No compression when T <= C; with C <= w only the last C tokens are kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.errors import InputError
from kvbench.methods.base import SelectContext, full_indices, split_budget, with_window
from kvbench.methods.snapkv import SnapKV, checked_scores, keep_last

CHUNK_AGG = ("sum", "mean")


def chunk_selection(token_scores: torch.Tensor, chunk_size: int, budget: int, agg: str) -> torch.Tensor:
    """Positions (ascending) of `budget` tokens of a 1-D score vector, chosen chunk by chunk (rule 3-4 above)."""
    n = token_scores.shape[0]
    budget = max(0, min(budget, n))
    n_chunks = -(-n // chunk_size)
    padded = torch.zeros(n_chunks * chunk_size, dtype=torch.float64, device=token_scores.device)
    padded[:n] = token_scores.double()
    sums = padded.view(n_chunks, chunk_size).sum(dim=1)
    if agg == "mean":
        lengths = torch.full((n_chunks,), chunk_size, dtype=torch.float64, device=token_scores.device)
        lengths[-1] = n - (n_chunks - 1) * chunk_size
        sums = sums / lengths
    order = torch.argsort(sums, descending=True, stable=True).tolist()
    keep = torch.zeros(n, dtype=torch.bool, device=token_scores.device)
    left = budget
    for chunk in order:
        if left == 0:
            break
        start = chunk * chunk_size
        take = min(left, min(n, start + chunk_size) - start)
        keep[start : start + take] = True
        left -= take
    return keep.nonzero().flatten()


@dataclass
class ChunkKV(SnapKV):
    name = "chunkkv"
    source = (
        "Liu et al. 2025, ChunkKV, arXiv 2502.00299 (Algorithms 1-2, c=10, sum); SnapKV scorer w=8 k=7 maxpool "
        "as the KVCache-Factory baselines; layer-shared chunks as kvpress ChunkKVPress; exact-budget rule ours"
    )

    chunk_size: int = 10  # c: paper default (kvpress: 20)
    chunk_agg: str = "sum"  # sum (paper) | mean (kvpress, over the chunk's actual length)
    per_head: bool = False  # False: one chunk set per layer, scores summed over KV heads (kvpress)
    reuse_layers: int = 1  # N_reuse: 1 = off; 2 = paper's layer-wise index reuse
    ranked = False  # keeps whole chunks, not the top of SnapKV's per-token ranking

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_size < 1:
            raise InputError(f"chunkkv: chunk_size must be >= 1, got {self.chunk_size}")
        if self.chunk_agg not in CHUNK_AGG:
            raise InputError(f"chunkkv: chunk_agg must be sum or mean, got '{self.chunk_agg}'")
        if self.reuse_layers < 1:
            raise InputError(f"chunkkv: reuse_layers must be >= 1, got {self.reuse_layers}")

    def query_head_selection(self) -> bool:
        return self.per_head  # layer-shared chunks (the default) are the same for every head

    def select(self, ctx: SelectContext) -> torch.Tensor:
        device = ctx.keys.device
        if ctx.n_tokens <= ctx.kept:
            return full_indices(ctx.n_kv_heads, ctx.n_tokens, device)
        if ctx.layer % self.reuse_layers != 0 and self._reusable(ctx):
            return ctx.previous  # type: ignore[return-value]
        selected, w = split_budget(ctx.kept, self.window_size)
        if w < self.window_size:
            return keep_last(ctx.n_kv_heads, ctx.n_tokens, ctx.kept, device)
        scores = checked_scores(ctx, self.name)
        if self.per_head:
            rows = [chunk_selection(row, self.chunk_size, selected, self.chunk_agg) for row in scores]
            prefix = torch.stack(rows) if rows else scores.new_zeros(0, selected, dtype=torch.long)
        else:
            shared = chunk_selection(scores.sum(dim=0), self.chunk_size, selected, self.chunk_agg)
            prefix = shared.expand(ctx.n_kv_heads, -1)
        return with_window(prefix.to(device), ctx.n_tokens, w)

    @staticmethod
    def _reusable(ctx: SelectContext) -> bool:
        prev = ctx.previous
        return (
            prev is not None
            and prev.shape == (ctx.n_kv_heads, ctx.kept)
            and prev.numel() > 0
            and int(prev.max()) < ctx.n_tokens
        )
