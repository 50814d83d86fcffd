"""Budgets allocated across the heads of a layer, as pure functions of one layer's `HeadRanking` (shared by
Ada-KV, CriticalAdaKV and HeadKV; methods-2 §2.13, §2.14, §2.21).

Order rule everywhere: scores descending, ties to the lower flat index (head-major, then position), i.e.
kvbench's stable (score desc, position asc) rule extended across heads. The references use torch.topk, whose
order among exact ties is unspecified; parity tests use untied scores."""

from __future__ import annotations

import torch

from kvbench.methods.base import HeadRanking, Selection


def stable_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of a 1-D tensor (ties: the lower index first)."""
    order = torch.argsort(values.double(), descending=True, stable=True)
    return order[: max(0, k)]


def safeguard_floor(kept: int, alpha: float) -> int:
    """kvpress 0.5.5 AdaKVPress: n_safe = int(n_kept * alpha), at least 1 when alpha > 0 and n_kept > 0."""
    n_safe = int(kept * alpha)
    if alpha > 0:
        n_safe = max(1, n_safe) if kept > 0 else 0
    return n_safe


def kvpress_allocation(ranking: HeadRanking, alpha: float) -> Selection:
    """kvpress AdaKVPress (adakv_press.py L54-81): every head's n_safe best tokens and the protected tokens
    are forced in, then the layer keeps its H * kept best (head, token) entries by one common threshold. Head
    h keeps b_h tokens with sum b_h = H * kept and b_h >= max(n_safe, protected)."""
    scores = forced_scores(ranking, alpha)
    heads, n_tokens = scores.shape
    keep = torch.zeros(heads * n_tokens, dtype=torch.bool, device=scores.device)
    keep[stable_top(scores.reshape(-1), heads * ranking.kept)] = True
    return Selection.from_rows([row.nonzero().flatten() for row in keep.view(heads, n_tokens)])


def forced_scores(ranking: HeadRanking, alpha: float) -> torch.Tensor:
    """[H, T] float64 scores with the protected tokens and every head's n_safe best set to +inf (kvpress sets
    finfo.max and gives its window max + 1: both above every real score, so the same tokens are forced)."""
    scores = ranking.scores.double().clone()
    scores[:, ranking.protected] = float("inf")
    n_safe = safeguard_floor(ranking.kept, alpha)
    if n_safe:
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)[:, :n_safe]
        scores.scatter_(-1, order, float("inf"))
    return scores


def head_counts(scores: torch.Tensor, total: int) -> torch.Tensor:
    """[H] long: how many of the layer's `total` best entries of scores [H, N] each head holds."""
    heads, width = scores.shape
    picked = stable_top(scores.reshape(-1), total)
    return torch.bincount(picked // width, minlength=heads)


def official_caps(prefix_scores: torch.Tensor, budget: int, alpha: float, normalize: bool) -> torch.Tensor:
    """Official Ada-KV's per-head prefix capacities (FFY0/AdaKV `AdaptiveSnapKVCluster.update_kv`,
    snapkv_utils.py L297-619; KCF `AdaKVCluster` is the same with normalize on), for prefix_scores [H, P]
    (window excluded) and the per-head base budget B = C - w:

    1. if `normalize`, head h's scores are scaled by r_h = (sum of its B largest) / (sum of all);
    2. c_h = how many of the layer's H * B largest scores head h holds;
    3. cap_h = round((1 - alpha) c_h + floor(alpha B)), computed as the official code does: c_h times (1 -
       alpha) in float32, then round half to even (torch.round).
    The caps need not sum to H * B (the rounding); no cap exceeds P when B <= P."""
    scores = prefix_scores.double()
    if normalize:
        ordered = scores.sort(dim=-1, descending=True).values
        scores = scores * (ordered[:, :budget].sum(dim=-1, keepdim=True) / ordered.sum(dim=-1, keepdim=True))
    counts = head_counts(scores, scores.shape[0] * budget)
    floor = int(budget * alpha)  # Python float -> int truncation, as the official `int(base_capacity * floor_alpha)`
    caps = torch.round(counts.to(torch.float32) * (1 - alpha) + floor).to(torch.long)
    return caps.clamp(0, prefix_scores.shape[-1])


def keep_top_caps(ranking: HeadRanking, caps: torch.Tensor) -> Selection:
    """Head h keeps its caps[h] best unprotected tokens (ties: the earlier token) plus every protected token.
    Caps above the unprotected count are truncated to it (nothing is redistributed)."""
    free = (~ranking.protected).nonzero().flatten()
    always = ranking.protected.nonzero().flatten()
    rows = []
    for head, cap in enumerate(caps.tolist()):
        best = free[stable_top(ranking.scores[head, free], min(int(cap), free.numel()))]
        rows.append(torch.cat([best, always]).sort().values)
    return Selection.from_rows(rows)


def critical_allocation(ranking: HeadRanking, weights: torch.Tensor, alpha: float, epsilon: float,
                        first_stage_ratio: float) -> Selection:
    """kvpress CriticalAdaKVPress (0.5.5 criticalkv_press.py L101-201; methods-2 §2.14), for the attention
    ranking [H, T] and the projected value norms `weights` [H, T] (read only at unprotected tokens):

    1. head budgets b_h: how many of the layer's H * kept best entries head h holds once the protected tokens
       and every head's n_safe best are forced in (the Ada-KV allocation of `kvpress_allocation`);
    2. stage 1: head h keeps its forced tokens and its best int(b_h rho) tokens by attention (the forced ones
       rank first, so they count against int(b_h rho));
    3. stage 2: the rest of its b_h slots go to the highest (s + epsilon) u among its other tokens.
    Head h keeps exactly b_h tokens, sum b_h = H * kept."""
    forced = forced_scores(ranking, alpha)
    heads = forced.shape[0]
    budgets = head_counts(forced, heads * ranking.kept)
    # kvpress: (head_budgets * first_stage_ratio).to(torch.int64), a float32 product truncated
    first_stage = (budgets * first_stage_ratio).to(torch.long).tolist()
    weighted = (ranking.scores.double() + epsilon) * weights.double()
    rows = []
    for head, budget in enumerate(budgets.tolist()):
        n_forced = int(torch.isinf(forced[head]).sum())
        stage_one = stable_top(forced[head], max(n_forced, first_stage[head]))
        second = weighted[head].clone()
        second[stage_one] = float("inf")
        rows.append(stable_top(second, budget).sort().values)
    return Selection.from_rows(rows)
