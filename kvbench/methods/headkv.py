"""HeadKV: static per-head budgets from offline head-importance scores, drawn from one pool shared by every
layer and head, with SnapKV's selection inside each head (methods-2 §2.21; Fu, Cai et al., arXiv 2410.19258).

Scores: a per-(layer, query head) table in HeadKV's JSON layout (`scores`: a file, or "auto" = the one
`kvbench headscores --method headkv` computed on the run's model from retrieval-reasoning needles;
kvbench.headscores). Its sha256 is part of the row's config fingerprint and of the manifest.

Capacities (official FYYFU/HeadKV `ReasonSnapKVCluster`, headkv/snapkv_utils.py; KCF run_longbench.py
L272-281), with C the budget (window included), w the window, L layers, H query heads:
1. s_lh = mean of the head's accepted-test values, normalised to sum 1; s <- s^tau, renormalised;
2. B = C - w (`variant=official`) or B = C (`variant=kcf`, which thus keeps w more tokens per head);
3. pool P = floor(B / beta) L H, minimum m = B - floor(B / beta);
4. cap_lh = round(s_lh P + m) (float64, half to even);
5. head (l, h) keeps its cap_lh best prefix tokens by SnapKV's score (window attention, pooling) plus the
   w window tokens. Caps above the T - w prefix tokens are truncated and the excess is lost, not
   redistributed (the reference behaviour).
GQA: with --granularity query_head every query head keeps its own cap of its own scores (the reference
setting); at kv_head (kvbench's default) each KV head keeps the rounded mean of its query heads' caps
(KCF `HeadKVCluster`, L1196-1199) of the group-reduced scores.

C is the sample's budget (round(ratio T) for --ratio), so ratio runs work (KCF's table breaks with
--max_capacity_prompts_ratio). No compression when T <= C (the official code compresses at C = T already);
with C <= w the last C tokens. Defaults: w = 8, kernel 7, max pooling (both references); beta = 1.01 (KCF's
script; the official argparse default is 1.5, its README sweeps 1.005 .. 10); tau = 1."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvbench.errors import InputError
from kvbench.headtables import HeadTableUser, check_shape
from kvbench.methods.base import HeadRanking, Selection, SelectContext
from kvbench.methods.head_budgets import keep_top_caps
from kvbench.methods.snapkv import SnapKV, checked_scores, window_fallback

VARIANTS = ("official", "kcf")


def headkv_caps(importance: torch.Tensor, budget: int, beta: float, tau: float = 1.0) -> torch.Tensor:
    """[L, H] prefix capacities for importance [L, H] (mean scores) and the per-head base budget B (steps 1
    and 3-4 of the module docstring)."""
    share = importance.double() / importance.double().sum()
    share = share.pow(tau)
    share = share / share.sum()
    heads = share.numel()
    per_head_pool = budget // beta  # Python floor division of a float: what both references compute
    pool = per_head_pool * heads
    minimum = budget - per_head_pool
    return torch.round(share * pool + minimum).to(torch.long)


def group_mean_caps(caps: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """[H_q] per-query-head caps -> [H_kv]: the rounded mean of each KV head's group (KCF, float32)."""
    return caps.reshape(n_kv_heads, -1).float().mean(dim=-1).round().to(torch.long)


@dataclass
class HeadKV(HeadTableUser, SnapKV):
    name = "headkv"
    source = (
        "Fu, Cai et al. 2024, HeadKV, arXiv 2410.19258; capacities as FYYFU/HeadKV 0862a09 ReasonSnapKVCluster "
        "(official) and KVCache-Factory c97f9d7 run_longbench.py / HeadKVCluster (kcf); head scores computed "
        "by kvbench (kvbench headscores); methods-2 §2.21"
    )
    family = "head-adaptive budgets"
    head_adaptive = True
    ranked = False  # keeps per-head caps, not one top-k
    table_kind = "retrieval_reasoning"
    table_field = "scores"

    scores: str = "auto"  # HeadKV-layout JSON of per-(layer, query head) scores, or auto
    beta: float = 1.01  # pool share: floor(B / beta) per head goes to the pool
    tau: float = 1.0  # temperature on the normalised scores (official only exposes it; 1 = none)
    variant: str = "official"  # official: B = C - w | kcf: B = C

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise InputError(f"headkv: beta must be >= 1, got {self.beta}")
        if self.tau <= 0 or not math.isfinite(self.tau):
            raise InputError(f"headkv: tau must be positive, got {self.tau}")
        if self.variant not in VARIANTS:
            raise InputError(f"headkv: variant must be official or kcf, got '{self.variant}'")
        self._load_given_table()

    def caps(self, ctx: SelectContext) -> torch.Tensor:
        """This layer's prefix capacities, one per stored head."""
        table = self.table
        query_heads = ctx.n_kv_heads * ctx.group
        check_shape(table, ctx.n_layers, query_heads, self.name)
        budget = ctx.kept - self.window_size if self.variant == "official" else ctx.kept
        row = headkv_caps(table.scores, budget, self.beta, self.tau)[ctx.layer]
        return group_mean_caps(row, ctx.n_kv_heads) if ctx.group > 1 else row

    def select(self, ctx: SelectContext) -> torch.Tensor | Selection:
        fallback = window_fallback(ctx, self.window_size)
        if fallback is not None:
            return fallback
        ranking = HeadRanking.with_window(checked_scores(ctx, self.name), ctx.n_tokens, ctx.kept)
        return keep_top_caps(ranking, self.caps(ctx))
