"""CriticalKV over SnapKV, non-adaptive: half of the budget by attention, the other half by attention times
the value's projected norm (methods-2.md §2.14; Feng et al. 2025, arXiv 2502.03805; the authors' code is
kvpress's CriticalKVPress, 0.5.5 `criticalkv_press.py` L38, L59-97, with epsilon 1e-4 and first_stage_ratio
0.5).

Evicting entry j changes the attention output by about a_j v_j W_O, so its importance is the attention a_j
times |v_j W_O|_1. Per layer and KV head, with C the budget (window included), w the SnapKV window:
1. s_j = SnapKV's score of prefix token j < T - w (window attention, GQA reduction, pooling: kvbench's snapkv),
   as the MEAN over the window queries (kvpress's scale, on which epsilon was chosen; kvbench's snapkv sums);
2. u_j = mean over the KV head's g query heads h of |v_j W_O^(h)|_1 (LayerView.value_output_norms): the mean
   of the L1 norms, not the norm of a mean;
3. stage 1: n1 = floor(rho C) (at least 1 when rho > 0); the window is kept and counts against n1, the top
   n1 - w prefix tokens by s are forced in;
4. stage 2: the rest of the C - w prefix slots go to the highest (s + epsilon) u among the other prefix tokens.
Ties go to the earlier token. No compression when T <= C; with C <= w only the last C tokens (as snapkv).

Differences from kvpress, both at the edges: kvpress's n1 is floor(rho (1 - cr) T) from the unrounded budget
(the same as floor(rho C) when 1/rho is an integer, e.g. the default 0.5); and when n1 < w kvpress forces only
n1 of the window tokens (picked by topk's order among equal scores) and lets the others compete in stage 2,
where kvbench keeps the whole window, as its SnapKV always does. u is query-free; the method is query-aware
through s only. Cost: H_q T d hidden multiply-adds per layer for u."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvbench.errors import InputError
from kvbench.methods.base import LayerView, SelectContext, split_budget, topk_sorted, with_window
from kvbench.methods.snapkv import SnapKV, checked_scores, window_fallback, window_scores


@dataclass
class CriticalKV(SnapKV):
    name = "criticalkv"
    # Its selection is two rankings (attention, then attention x projected value norm), not the top of one:
    # Ada-KV must not reallocate SnapKV's ranking under its name. The head-adaptive form is critical_adakv.
    ranked = False
    source = (
        "Feng et al. 2025, CriticalKV, arXiv 2502.03805; kvpress 0.5.5 CriticalKVPress(SnapKVPress) "
        "(criticalkv_press.py L38, L59-97), non-adaptive; methods-2.md §2.14"
    )

    epsilon: float = 1e-4  # added to the attention score before weighting by the projected value norm
    first_stage_ratio: float = 0.5  # rho: share of the budget chosen by attention alone (window included)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.first_stage_ratio <= 1:
            raise InputError(f"criticalkv: first_stage_ratio must be in [0, 1], got {self.first_stage_ratio}")

    def scorer_key(self) -> tuple:
        return ("criticalkv", self.window_size, self.kernel_size, self.pooling, self.gqa_reduce)

    def score(self, view: LayerView) -> torch.Tensor:
        """[2, H_kv, T - w]: SnapKV's mean-over-window scores s, and the group-mean projected value norms u."""
        w = min(self.window_size, view.n_tokens)
        attention = window_scores(view, self.window_size, self.kernel_size, self.pooling, self.gqa_reduce) / w
        norms = view.value_output_norms(self.name)[:, : view.n_tokens - w]
        per_kv = norms.reshape(view.keys.shape[0], view.group, -1).mean(dim=1)
        return torch.stack([attention, per_kv])

    def ranking(self, ctx: SelectContext) -> None:
        return None  # not one ranking (see `ranked`); SnapKV's would read this method's stacked scores

    def select(self, ctx: SelectContext) -> torch.Tensor:
        fallback = window_fallback(ctx, self.window_size)
        if fallback is not None:
            return fallback
        selected, w = split_budget(ctx.kept, self.window_size)
        attention, norms = checked_scores(ctx, self.name)
        first_stage = math.floor(self.first_stage_ratio * ctx.kept)
        if self.first_stage_ratio > 0:
            first_stage = max(1, first_stage)
        forced = topk_sorted(attention, min(selected, max(0, first_stage - w)))
        weighted = (attention + self.epsilon) * norms
        weighted = weighted.scatter(-1, forced, float("inf"))
        return with_window(topk_sorted(weighted, selected), ctx.n_tokens, w)
