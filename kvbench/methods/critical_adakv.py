"""CriticalAdaKV: CriticalKV's two-stage selection inside Ada-KV's head-adaptive budgets (methods-2.md §2.14;
Feng et al. 2025, arXiv 2502.03805; kvpress 0.5.5 CriticalAdaKVPress(SnapKVPress), criticalkv_press.py
L101-201, the registry's `critical_adakv_snapkv`; alpha 0.2, epsilon 1e-4, first_stage_ratio 0.5).

Per layer, with s SnapKV's mean-over-window prefix scores and u the group-mean projected value norms (both
exactly as criticalkv computes them), C the budget (window included), H the stored heads, w the window:
1. every head's window and its n_safe = int(alpha C) best tokens (at least 1) are forced in; head h's budget
   b_h is its share of the layer's H C best entries under those forced scores (Ada-KV, kvpress variant);
2. stage 1: head h keeps its best int(rho b_h) tokens by s, the forced ones first;
3. stage 2: its remaining slots up to b_h go to the highest (s + epsilon) u (kvbench.methods.head_budgets
   `critical_allocation`).
Heads keep different numbers of tokens, sum b_h = H C exactly: the layer holds the bytes of snapkv at the same
budget, stored at each head's real length (a ragged Selection; nothing masked instead of evicted).
No compression when T <= C; with C <= w the last C tokens (as snapkv). Ties go to the earlier (head, token).

Difference from kvpress, at small budgets only: kvpress gives the window max + 1 instead of forcing it, so when
both n_safe and int(rho b_h) fall below w some window tokens compete in stage 2 there; kvbench always keeps the
whole window, as every SnapKV-based method of kvbench does (criticalkv documents the same edge)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.errors import InputError
from kvbench.methods.base import HeadRanking, Selection, SelectContext
from kvbench.methods.criticalkv import CriticalKV
from kvbench.methods.head_budgets import critical_allocation
from kvbench.methods.snapkv import checked_scores, window_fallback


@dataclass
class CriticalAdaKV(CriticalKV):
    name = "critical_adakv"
    family = "head-adaptive budgets"
    head_adaptive = True
    source = (
        "Feng et al. 2025, CriticalKV, arXiv 2502.03805; kvpress 0.5.5 CriticalAdaKVPress(SnapKVPress) "
        "(criticalkv_press.py L101-201); methods-2 §2.14"
    )

    alpha: float = 0.2  # Ada-KV's safeguard: every head keeps at least int(alpha C) of its best tokens

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise InputError(f"critical_adakv: alpha must be in [0, 1], got {self.alpha}")

    def select(self, ctx: SelectContext) -> torch.Tensor | Selection:
        fallback = window_fallback(ctx, self.window_size)
        if fallback is not None:
            return fallback
        attention, norms = checked_scores(ctx, self.name)
        ranking = HeadRanking.with_window(attention, ctx.n_tokens, ctx.kept)
        weights = torch.ones_like(ranking.scores)
        weights[:, : norms.shape[-1]] = norms  # the window's weights are never read: it is forced in
        return critical_allocation(ranking, weights, self.alpha, self.epsilon, self.first_stage_ratio)
