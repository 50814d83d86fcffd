"""TOVA, token omission via attention (Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024,
arXiv 2401.06104; methods.md §2.8), following schwartz-lab-NLP/TOVA `src/tova_cache.py`.

Whenever the cache holds more than B tokens (after the prompt and after every later step): average the
newest query's attention row over ALL query heads of the layer and keep the top B keys (in position
order), one set per layer shared by every KV head. The current token is not protected (as official).
B is the prompt's kept budget (Budget.kept). `gqa_reduce` is ignored: the set is layer-shared by design.
Ties go to the earlier token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.methods.base import (
    DecodeContext,
    LayerDecoder,
    LayerView,
    Method,
    SelectContext,
    full_indices,
    topk_sorted,
)


def tova_keep(mean_row: torch.Tensor, budget: int, n_kv_heads: int) -> torch.Tensor:
    """mean_row [L] -> [H_kv, budget] ascending indices shared by every KV head."""
    return topk_sorted(mean_row[None], budget).expand(n_kv_heads, budget)


class TOVADecoder(LayerDecoder):
    def __init__(self, budget: int, n_kv_heads: int):
        self.budget, self.n_kv_heads = budget, n_kv_heads

    def step(self, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
        if rows.shape[-1] <= self.budget:
            return None
        return tova_keep(rows[:, -1, :].mean(dim=0), self.budget, self.n_kv_heads)


@dataclass
class TOVA(Method):
    name: ClassVar[str] = "tova"
    family: ClassVar[str] = "window attention"
    query_aware: ClassVar[bool] = True
    source: ClassVar[str] = "Oren et al. 2024 (arXiv 2401.06104); schwartz-lab-NLP/TOVA@9c7d09b src/tova_cache.py"
    continuous: ClassVar[bool] = True

    def window(self) -> int:
        return 1

    def scorer_key(self) -> tuple | None:
        return ("tova_last_row_head_mean",)

    def score(self, view: LayerView) -> torch.Tensor | None:
        return view.last_row().mean(dim=0)  # [T]

    def query_head_selection(self) -> bool:
        return False  # one set per layer, from the mean over every query head

    def select(self, ctx: SelectContext) -> torch.Tensor:
        if ctx.n_tokens <= ctx.kept:
            return full_indices(ctx.n_kv_heads, ctx.n_tokens, ctx.keys.device)
        return tova_keep(ctx.scores, ctx.kept, ctx.n_kv_heads)

    def decoder(self, ctx: DecodeContext) -> LayerDecoder | None:
        return TOVADecoder(ctx.select.kept, ctx.select.n_kv_heads)
