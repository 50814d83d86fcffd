"""DuoAttention (proxy): static retrieval and streaming heads (methods-2 §2.19; Xiao et al., arXiv 2410.10819).
Retrieval heads keep the whole prompt; streaming heads keep `sink` first + `recent` last prompt tokens.

PROXY: DuoAttention's head patterns are gates trained per model; kvpress downloads them for six models at run
time, and kvbench cannot download. `pattern=auto` reads the pattern `kvbench headscores --method
duo_attention` computed offline on the run's model with kvpress's on-the-fly estimate on local text
(kvbench.duo_patterns). Those results are `duo_attention (proxy)` and must never be compared with published
DuoAttention numbers. A pattern file in DuoAttention's own layout (`full_attention_heads.tsv`, one row per
layer, one value per KV head) may be given instead. The file's sha256 is in the config fingerprint.

Which heads stream (global across layers, as kvpress L86-90): the n lowest-scoring (layer, KV head) pairs
(ties: the lower flat index), with
- `allocation=budget` (default, ours): the fewest streaming heads whose cache fits the run's budget:
  n = ceil(L H (T - k) / (T - sink - recent)), at most L H, with k = the budget for T prompt tokens; so
  --ratio sets the kept fraction like every other method (all heads streaming may still keep more);
- `allocation=head_ratio`: n = round(L H head_ratio), kvpress's `head_compression_ratio` (Python's round).
Within a streaming head the prompt positions [sink, T - recent) are evicted, as kvpress masks them; nothing
is evicted when T <= sink + recent (kvpress's guard). The compression ratio kvpress reports is then
streaming share x (1 - (sink + recent) / T) = 1 - kept entries / (L H T).

Decoding: new tokens are appended to every head (kvpress: streaming heads grow); the official runtime also
streams during the prefill and keeps streaming heads at sink + recent while decoding, which kvbench does not.
Defaults sink 64, recent 256: the official README's deploy setting (kvpress reads the training values 128/256
from the pattern's config: preset duo_attention_kvpress). Query-free; per KV head at every granularity."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvbench.errors import InputError
from kvbench.headtables import HeadTableUser, check_shape
from kvbench.methods.base import Method, Selection, SelectContext, full_indices

ALLOCATIONS = ("budget", "head_ratio")


def streaming_heads(scores: torch.Tensor, count: int) -> torch.Tensor:
    """[L, H] bool: the `count` lowest-scoring (layer, head) pairs (ties: the lower flat index)."""
    order = torch.argsort(scores.reshape(-1).double(), stable=True)[: max(0, count)]
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(scores.shape)


def streaming_count(n_heads: int, n_tokens: int, kept: int, sink: int, recent: int) -> int:
    """Fewest streaming heads so that n_heads * kept entries hold the cache (allocation=budget)."""
    saved_per_head = n_tokens - sink - recent
    if saved_per_head <= 0 or kept >= n_tokens:
        return 0
    return min(n_heads, math.ceil(n_heads * (n_tokens - kept) / saved_per_head))


@dataclass
class DuoAttention(HeadTableUser, Method):
    name = "duo_attention"
    source = (
        "duo_attention (proxy): Xiao et al. 2024, DuoAttention, arXiv 2410.10819; masking rule as kvpress 0.5.5 "
        "DuoAttentionPress (duo_attention_press.py L65-213); head patterns from kvpress's on-the-fly proxy "
        "computed offline by kvbench (no trained gates); methods-2 §2.19"
    )
    family = "head-adaptive budgets"
    head_adaptive = True  # retrieval heads keep the prompt, streaming heads sink + recent; query-free
    table_kind = "duo_proxy"
    table_field = "pattern"

    pattern: str = "auto"  # full_attention_heads.tsv layout, or auto: kvbench headscores --method duo_attention
    sink: int = 64
    recent: int = 256
    allocation: str = "budget"  # budget | head_ratio
    head_ratio: float = 0.5  # streaming share of all (layer, KV head) pairs, for allocation=head_ratio

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sink < 0 or self.recent < 0:
            raise InputError(f"duo_attention: sink and recent must be >= 0, got {self.sink}, {self.recent}")
        if self.allocation not in ALLOCATIONS:
            raise InputError(f"duo_attention: allocation must be budget or head_ratio, got '{self.allocation}'")
        if not 0 <= self.head_ratio <= 1:
            raise InputError(f"duo_attention: head_ratio must be in [0, 1], got {self.head_ratio}")
        self._load_given_table()

    def query_head_selection(self) -> bool:
        return False  # one pattern per KV head

    def streaming(self, ctx: SelectContext) -> torch.Tensor:
        """[L, H_kv] bool for this sample."""
        table = self.table
        check_shape(table, ctx.n_layers, ctx.n_kv_heads, self.name)
        n = table.scores.numel()
        if self.allocation == "head_ratio":
            count = round(n * self.head_ratio)
        else:
            count = streaming_count(n, ctx.n_tokens, ctx.kept, self.sink, self.recent)
        return streaming_heads(table.scores, count)

    def select(self, ctx: SelectContext) -> torch.Tensor | Selection:
        device = ctx.keys.device
        full = full_indices(ctx.n_kv_heads, ctx.n_tokens, device)
        if ctx.n_tokens <= self.sink + self.recent:
            return full
        mask = self.streaming(ctx)[ctx.layer]
        if not bool(mask.any()):
            return full
        everything = torch.arange(ctx.n_tokens, device=device)
        local = torch.cat([everything[: self.sink], everything[ctx.n_tokens - self.recent:]])
        return Selection.from_rows([local if streaming else everything for streaming in mask.tolist()])
