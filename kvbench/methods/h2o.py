"""H2O, heavy-hitter oracle (Zhang et al., NeurIPS 2023, arXiv 2306.14048; methods.md §2.4), the faithful
continuous variant of FMInference/H2O `h2o_hf/utils_real_drop/modify_llama.py` `H2OKVCache_LayerWise`.

- Score: the attention each cached key has received, accumulated (a sum, not a mean) over every query so
  far: the prompt's causal column sums (computed in query blocks, never a T x T matrix), then the new rows
  of every later attention call (the new tokens' own columns start from their first row).
- Eviction, whenever the cache holds more than B tokens (after the prompt and after every later step):
  keep the last `recent` tokens plus the top `heavy` among the others by score; evicted tokens' scores are
  dropped with them. heavy = int(B * heavy_fraction), recent = B - heavy (heavy = recent = B/2 by default).
- B is the prompt's kept budget (Budget.kept), fixed from the prompt length as in H2O's ratio variant.
- GQA [ours, §2.4]: accumulators are kept per query head and reduced within each group at every eviction
  with `gqa_reduce` (default sum, so a KV head's score is the total attention its group gave the key);
  the official code is MHA-only. Ties go to the earlier token (the official torch.topk is unordered).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.errors import InputError
from kvbench.methods.base import (
    DecodeContext,
    LayerDecoder,
    LayerView,
    Method,
    SelectContext,
    full_indices,
    reduce_groups,
    topk_sorted,
)


def heavy_recent_keep(acc: torch.Tensor, n_kv_heads: int, heavy: int, recent: int, how: str) -> torch.Tensor:
    """acc [H_q, L] accumulated scores -> [H_kv, heavy + recent] ascending indices (requires L > heavy + recent)."""
    length = acc.shape[-1]
    n_old = length - recent
    scores = reduce_groups(acc, n_kv_heads, how)[:, :n_old]
    picked = topk_sorted(scores, heavy)
    tail = torch.arange(n_old, length, device=acc.device).expand(n_kv_heads, recent)
    return torch.cat([picked, tail], dim=-1)


def expand_to_query_heads(indices: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    return indices.repeat_interleave(n_q_heads // indices.shape[0], dim=0)


class H2ODecoder(LayerDecoder):
    def __init__(self, method: "H2O", acc: torch.Tensor, budget: int, n_kv_heads: int):
        self.method, self.acc, self.budget, self.n_kv_heads = method, acc, budget, n_kv_heads

    def step(self, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
        length = rows.shape[-1]
        new = length - self.acc.shape[-1]
        acc = torch.nn.functional.pad(self.acc, (0, new)) + rows.sum(dim=1)
        if length <= self.budget:
            self.acc = acc
            return None
        heavy, recent = self.method.split(self.budget)
        keep = heavy_recent_keep(acc, self.n_kv_heads, heavy, recent, self.method.gqa_reduce)
        self.acc = acc.gather(-1, expand_to_query_heads(keep, acc.shape[0]))
        return keep


@dataclass
class H2O(Method):
    name: ClassVar[str] = "h2o"
    family: ClassVar[str] = "accumulated attention"
    query_aware: ClassVar[bool] = True
    source: ClassVar[str] = (
        "Zhang et al. 2023 (arXiv 2306.14048); FMInference/H2O@ac75c2a h2o_hf/utils_real_drop H2OKVCache_LayerWise"
    )
    continuous: ClassVar[bool] = True
    # 2: prompt column sums from the attention kernel's log-sum-exp; 3: in cache-sized tiles; 4: in base 2
    # (each float32 rounding)
    version: ClassVar[int] = 4
    gqa_reduce: str = "sum"
    heavy_fraction: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.heavy_fraction <= 1.0:
            raise InputError(f"h2o: heavy_fraction must be in [0, 1], got {self.heavy_fraction}")

    def split(self, budget: int) -> tuple[int, int]:
        heavy = int(budget * self.heavy_fraction)
        return heavy, budget - heavy

    def prefill_needs(self) -> frozenset[str]:
        return frozenset({"column_sums"})

    def scorer_key(self) -> tuple | None:
        return ("h2o_column_sums",)

    def score(self, view: LayerView) -> torch.Tensor | None:
        return view.column_sums()  # [H_q, T]: causal, blockwise

    def select(self, ctx: SelectContext) -> torch.Tensor:
        if ctx.n_tokens <= ctx.kept:
            return full_indices(ctx.n_kv_heads, ctx.n_tokens, ctx.keys.device)
        heavy, recent = self.split(ctx.kept)
        return heavy_recent_keep(ctx.scores, ctx.n_kv_heads, heavy, recent, self.gqa_reduce)

    def decoder(self, ctx: DecodeContext) -> LayerDecoder | None:
        scores = ctx.select.scores
        acc = scores.gather(-1, expand_to_query_heads(ctx.kept_indices.to(scores.device), scores.shape[0]))
        return H2ODecoder(self, acc.float(), ctx.select.kept, ctx.select.n_kv_heads)
