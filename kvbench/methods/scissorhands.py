"""Scissorhands (Liu et al., NeurIPS 2023, arXiv 2305.17118; methods.md §2.7): persistence of importance.

kvbench's default rule (every open choice ours, made before the authors' code was found):
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

The authors' code (lzcemma/Scissorhands d0bf444, Decentralized_FM_alpha/modules/hf_opt_dropkv.py L298-357;
settings in run_infer_opt_66b_sparse_c4.sh) differs; preset `scissorhands_authors` takes what carries over:
- `threshold = "quantile"`: a token's attention in a row is an event when it is STRICTLY above the row's
  value at ascending rank int(0.9 x n), n = the row's length including its causally hidden (zero) entries
  (`attn.sort().values[..., int(0.9 * src_len)]`, L313-316);
- history 100 rows (LRU_WINDOW=100) and the last 10 tokens always kept (POSITION_WINDOW=10): a query at
  position i sees keys i-10 .. i-1 and itself whatever their events (L331-337);
- drop = 1: the set is re-decided at every step (the authors re-mask at every query).
What does not carry over, and is kvbench's: the authors keep EVERY token with at least one event (no fixed
budget; compression starts at length 100) and mask instead of evicting, so a token can return once it
scores again; kvbench keeps the budget B and evicts for good (the B - r tokens with the most events).
They compress only layers 5-35 of OPT-66B's 64 (L458; `skip_layers` keeps layers whole, but that choice is
specific to OPT-66B) and only while reading the prompt (teacher-forced perplexity), with history rows
computed over the already-masked context; kvbench prefills with full attention, evicts after the prompt
and keeps evicting while decoding. OPT is multi-head; GQA is reduced with `gqa_reduce` as above.

`normalize = True` (option): importance = events / (history rows that could see the token), so a token
younger than the history window is not ranked down for having had fewer rows to score in (methods-audit.md;
cold-compress divides by the rows recorded). Every cached token has been seen by at least its own row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

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

THRESHOLDS = ("uniform", "quantile")


def visible_keys(q: int, length: int, device: torch.device) -> torch.Tensor:
    """bool [q, length]: which keys the newest q queries see (query i of q sees length - q + i + 1 keys)."""
    last = torch.arange(length - q, length, device=device)[:, None]
    return torch.arange(length, device=device)[None, :] <= last


def important_events(rows: torch.Tensor, threshold: str = "uniform", quantile: float = 0.9) -> torch.Tensor:
    """rows [H_q, q, L] causal softmax rows of the newest q queries over L keys -> bool [H_q, q, L].
    uniform: attention >= 1/(keys that query sees). quantile: attention > the row's value at ascending rank
    int(quantile * L), the row's hidden zeros included (the authors' rule)."""
    q, length = rows.shape[1], rows.shape[2]
    if threshold == "quantile":
        cut = rows.sort(dim=-1).values[..., int(quantile * length)]
        return rows > cut[..., None]
    visible = torch.arange(length - q + 1, length + 1, device=rows.device, dtype=torch.float32)
    return rows >= (1.0 / visible)[None, :, None]


def top_keep_newest_on_ties(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[H, n] -> [H, k] ascending indices of the k largest scores; on ties the newer token is kept."""
    n = scores.shape[-1]
    order = torch.argsort(scores.flip(-1).double(), dim=-1, descending=True, stable=True)[..., :k]
    return (n - 1 - order).sort(dim=-1).values


def scissorhands_keep(events: torch.Tensor, n_kv_heads: int, keep: int, recent: int, how: str,
                      seen: torch.Tensor | None = None) -> torch.Tensor:
    """events bool [H_q, w, L] -> [H_kv, keep] ascending kept indices: the `recent` newest plus the
    keep - recent most important of the others (requires recent <= keep <= L). seen bool [H_q, w, L] (which
    history rows could see each token) turns counts into per-age rates."""
    length = events.shape[-1]
    importance = reduce_groups(events.sum(dim=1).float(), n_kv_heads, how)
    if seen is not None:  # a group's query heads share their KV head's tokens, so their seen counts agree
        group = seen.shape[0] // n_kv_heads
        importance = importance / seen[::group].sum(dim=1).clamp(min=1).float()
    picked = top_keep_newest_on_ties(importance[:, : length - recent], keep - recent)
    tail = torch.arange(length - recent, length, device=events.device).expand(n_kv_heads, recent)
    return torch.cat([picked, tail], dim=-1)


def _gather(history: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """history [H_q, w, L] -> the kept tokens' columns [H_q, w, k]; keep [H_kv, k] (query head h uses h // g)."""
    index = keep.to(history.device).repeat_interleave(history.shape[0] // keep.shape[0], dim=0)
    return history.gather(-1, index[:, None, :].expand(-1, history.shape[1], -1))


class ScissorhandsDecoder(LayerDecoder):
    def __init__(self, method: "Scissorhands", events: torch.Tensor, seen: torch.Tensor | None, budget: int,
                 n_kv_heads: int):
        self.method, self.events, self.seen, self.budget, self.n_kv_heads = method, events, seen, budget, n_kv_heads

    def step(self, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
        method, length = self.method, rows.shape[-1]

        def append(history: torch.Tensor, new: torch.Tensor) -> torch.Tensor:  # new tokens: nothing recorded yet
            padded = torch.nn.functional.pad(history, (0, length - history.shape[-1]))
            return torch.cat([padded, new], dim=1)[:, -method.history :, :]

        events = append(self.events, important_events(rows, method.threshold, method.quantile))
        seen = None
        if self.seen is not None:
            seen = append(self.seen, visible_keys(rows.shape[1], length, rows.device).expand(rows.shape[0], -1, -1))
        if length <= self.budget:
            self.events, self.seen = events, seen
            return None
        recent = min(method.recent, self.budget)
        n_drop = min(max(method.drop_amount(self.budget), length - self.budget), length - recent)
        keep = scissorhands_keep(events, self.n_kv_heads, length - n_drop, recent, method.gqa_reduce, seen)
        self.events = _gather(events, keep)
        self.seen = _gather(seen, keep) if seen is not None else None
        return keep


@dataclass
class Scissorhands(Method):
    name: ClassVar[str] = "scissorhands"
    family: ClassVar[str] = "accumulated attention"
    query_aware: ClassVar[bool] = True
    source: ClassVar[str] = (
        "Liu et al. 2023 (arXiv 2305.17118): default rule ours (w_h, r, m, 1/visible threshold); "
        "threshold=quantile: the authors' event rule, lzcemma/Scissorhands hf_opt_dropkv.py"
    )
    continuous: ClassVar[bool] = True
    added_params: ClassVar[dict[str, Any]] = {"threshold": "uniform", "quantile": 0.9, "normalize": False,
                                              "skip_layers": ()}
    gqa_reduce: str = "sum"
    history: int = 32  # w_h [ours]; the authors: 100
    recent: int = 8  # r [ours]; the authors: 10
    drop: int = 0  # m; 0: max(1, B // 16) [ours]
    threshold: str = "uniform"  # uniform: >= 1/visible [ours] | quantile: > the row's quantile (authors)
    quantile: float = 0.9  # the row rank of the quantile threshold (authors: 0.9)
    normalize: bool = False  # divide event counts by the history rows that could see the token
    skip_layers: tuple[int, ...] = ()  # layers kept whole (the authors compress only 5-35 of OPT-66B's 64)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.history < 1 or self.recent < 0 or self.drop < 0:
            raise InputError("scissorhands: history must be >= 1, recent and drop >= 0")
        if self.threshold not in THRESHOLDS:
            raise InputError(f"scissorhands: threshold must be uniform or quantile, got '{self.threshold}'")
        if not 0.0 <= self.quantile < 1.0:
            raise InputError(f"scissorhands: quantile must be in [0, 1), got {self.quantile}")
        self.skip_layers = tuple(int(layer) for layer in self.skip_layers)
        if any(layer < 0 for layer in self.skip_layers):
            raise InputError(f"scissorhands: skip_layers must be layer indices >= 0, got {self.skip_layers}")

    def drop_amount(self, budget: int) -> int:
        return self.drop if self.drop > 0 else max(1, budget // 16)

    def window(self) -> int:
        return self.history

    def scorer_key(self) -> tuple | None:
        if self.threshold == "uniform":
            return ("scissorhands_events", self.history)
        return ("scissorhands_events", self.history, self.threshold, self.quantile)

    def score(self, view: LayerView) -> torch.Tensor | None:
        return important_events(view.window_attention(self.history), self.threshold, self.quantile)  # [H_q, w, T]

    def _seen(self, events: torch.Tensor) -> torch.Tensor | None:
        """Which of the last w prompt rows could see each prompt token (normalize only): [H_q, w, T]."""
        if not self.normalize:
            return None
        return visible_keys(events.shape[1], events.shape[2], events.device).expand(events.shape[0], -1, -1)

    def select(self, ctx: SelectContext) -> torch.Tensor:
        if ctx.n_tokens <= ctx.kept or ctx.layer in self.skip_layers:
            return full_indices(ctx.n_kv_heads, ctx.n_tokens, ctx.keys.device)
        return scissorhands_keep(ctx.scores, ctx.n_kv_heads, ctx.kept, min(self.recent, ctx.kept), self.gqa_reduce,
                                 self._seen(ctx.scores))

    def decoder(self, ctx: DecodeContext) -> LayerDecoder | None:
        if ctx.select.layer in self.skip_layers:
            return None
        events, kept = ctx.select.scores, ctx.kept_indices
        seen = self._seen(events)
        return ScissorhandsDecoder(self, _gather(events, kept), None if seen is None else _gather(seen, kept),
                                   ctx.select.kept, ctx.select.n_kv_heads)
