"""Scissorhands (Liu et al., NeurIPS 2023, arXiv 2305.17118; methods.md §2.7): persistence of importance.

There is no official code and the main-text algorithm could not be read, so the rule below is the
recalled algorithm with every open choice made by us ([ours]; the paper's w_h, r, m and threshold are
UNVERIFIED):

- Event: at one attention row (one query step), a cached token is "important" when the attention it gets
  is >= 1 / (number of keys that query sees), i.e. at least the uniform level; a token that did not exist
  yet at that step (or is causally hidden from it) has no event.
- Importance of a token = the number of important events over the last `history` (w_h = 32) rows, per
  query head; with GQA the counts are reduced within each group by `gqa_reduce` (default sum: a KV head's
  importance counts the events of all its query heads).
- Whenever the cache holds more than B tokens, drop max(m, excess) tokens, m = `drop` or max(1, B // 16)
  when `drop` = 0, never among the `recent` (r = 8) newest tokens: the least important ones, ties
  dropping the older token first. Between steps the cache therefore holds between B + 1 - m and B tokens.
- Prompt adaptation: the prompt is cut to exactly B tokens using the events of the last w_h prompt queries
  (the causal window attention, no T x T matrix) with the same rule, and those events seed the history.
- B is the prompt's kept budget (Budget.kept), fixed from the prompt length. The decoder keeps, per
  cached token, the boolean events of the last w_h rows and gathers them with the cache on eviction.
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
)


def important_events(rows: torch.Tensor) -> torch.Tensor:
    """rows [H_q, q, L] causal softmax rows of the newest q queries over L keys -> bool [H_q, q, L]: attention
    >= 1/(keys that query sees); query i of q sees L - q + i + 1 keys."""
    q, length = rows.shape[1], rows.shape[2]
    visible = torch.arange(length - q + 1, length + 1, device=rows.device, dtype=torch.float32)
    return rows >= (1.0 / visible)[None, :, None]


def top_keep_newest_on_ties(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[H, n] -> [H, k] ascending indices of the k largest scores; on ties the newer token is kept."""
    n = scores.shape[-1]
    order = torch.argsort(scores.flip(-1).double(), dim=-1, descending=True, stable=True)[..., :k]
    return (n - 1 - order).sort(dim=-1).values


def scissorhands_keep(events: torch.Tensor, n_kv_heads: int, keep: int, recent: int, how: str) -> torch.Tensor:
    """events bool [H_q, w, L] -> [H_kv, keep] ascending kept indices: the `recent` newest plus the
    keep - recent most important of the others (requires recent <= keep <= L)."""
    length = events.shape[-1]
    importance = reduce_groups(events.sum(dim=1).float(), n_kv_heads, how)[:, : length - recent]
    picked = top_keep_newest_on_ties(importance, keep - recent)
    tail = torch.arange(length - recent, length, device=events.device).expand(n_kv_heads, recent)
    return torch.cat([picked, tail], dim=-1)


class ScissorhandsDecoder(LayerDecoder):
    def __init__(self, method: "Scissorhands", events: torch.Tensor, budget: int, n_kv_heads: int):
        self.method, self.events, self.budget, self.n_kv_heads = method, events, budget, n_kv_heads

    def step(self, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
        length = rows.shape[-1]
        old = torch.nn.functional.pad(self.events, (0, length - self.events.shape[-1]))  # new tokens: no events
        events = torch.cat([old, important_events(rows)], dim=1)[:, -self.method.history :, :]
        if length <= self.budget:
            self.events = events
            return None
        recent = min(self.method.recent, self.budget)
        n_drop = min(max(self.method.drop_amount(self.budget), length - self.budget), length - recent)
        keep = scissorhands_keep(events, self.n_kv_heads, length - n_drop, recent, self.method.gqa_reduce)
        index = keep.repeat_interleave(events.shape[0] // self.n_kv_heads, dim=0)
        self.events = events.gather(-1, index[:, None, :].expand(-1, events.shape[1], -1))
        return keep


@dataclass
class Scissorhands(Method):
    name: ClassVar[str] = "scissorhands"
    family: ClassVar[str] = "accumulated attention"
    query_aware: ClassVar[bool] = True
    source: ClassVar[str] = "Liu et al. 2023 (arXiv 2305.17118), recalled algorithm; w_h, r, m, threshold are ours"
    continuous: ClassVar[bool] = True
    gqa_reduce: str = "sum"
    history: int = 32  # w_h [ours]
    recent: int = 8  # r [ours]
    drop: int = 0  # m; 0: max(1, B // 16) [ours]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.history < 1 or self.recent < 0 or self.drop < 0:
            raise InputError("scissorhands: history must be >= 1, recent and drop >= 0")

    def drop_amount(self, budget: int) -> int:
        return self.drop if self.drop > 0 else max(1, budget // 16)

    def window(self) -> int:
        return self.history

    def scorer_key(self) -> tuple | None:
        return ("scissorhands_events", self.history)

    def score(self, view: LayerView) -> torch.Tensor | None:
        return important_events(view.window_attention(self.history))  # bool [H_q, w, T]

    def select(self, ctx: SelectContext) -> torch.Tensor:
        if ctx.n_tokens <= ctx.kept:
            return full_indices(ctx.n_kv_heads, ctx.n_tokens, ctx.keys.device)
        return scissorhands_keep(ctx.scores, ctx.n_kv_heads, ctx.kept, min(self.recent, ctx.kept), self.gqa_reduce)

    def decoder(self, ctx: DecodeContext) -> LayerDecoder | None:
        events = ctx.select.scores
        kept = ctx.kept_indices.to(events.device)
        index = kept.repeat_interleave(events.shape[0] // kept.shape[0], dim=0)
        events = events.gather(-1, index[:, None, :].expand(-1, events.shape[1], -1))
        return ScissorhandsDecoder(self, events, ctx.select.kept, ctx.select.n_kv_heads)
