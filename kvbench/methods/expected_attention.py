"""Expected Attention: score each key by the attention FUTURE queries are expected to pay it, in closed form
(methods-2.md §2.15; Devoto, Jeblick, Jegou 2025, arXiv 2510.00636). The bare press, kvpress 0.5.5
`expected_attention_press.py` L55-165 with its defaults: n_f = 512, n_s = 4, covariance on, value norm on,
eps = 0.

Per layer and query head h, with q the pre-RoPE queries of the prefill positions n_s .. T-1 (LayerView's
`query_prerope`: RoPE undone with the model's own rotary embedding, q_norm included where the model has one):
1. mu_h = mean of q, Sigma_h = (1 / (T - n_s)) sum (q - mu)(q - mu)^T (biased);
2. R = mean over the future positions p = T .. T + n_f - 1 of the RoPE rotation R_p, from the model's rotary
   embedding (attention_scaling included, as the model applies it); mu' = R mu, Sigma' = R Sigma R^T;
3. for the cached (post-RoPE) keys k_j, j >= n_s, of the query head's KV head:
       z_hj = s k_j . mu' + (s^2 / 2) k_j^T Sigma' k_j
   (s = the layer's attention scaling: 1/sqrt(d) on Llama, Qwen, Mistral, which kvpress always uses)
   i.e. log E[exp(s q.k)] for q ~ N(mu', Sigma'); p_h = softmax_j z_h (over j >= n_s);
4. GQA: p reduced over the group with `gqa_reduce` (mean, as kvpress);
5. if use_vnorm: s_j = (p_j + eps) |v_j|_2;
6. the n_s sinks score max(s) + 1 (the layer's maximum), so they are kept first.
Keep the top C per KV head; ties go to the earlier token. No observation window. No compression when T <= C
or T <= n_s (kvpress asserts T > n_s). Everything in float32 (kvpress computes in the model dtype).

Query-aware in the statistical sense: every prefill query enters the moments (the question's too with
--scope full), no single query's attention row does. The kvpress leaderboard's "expected_attention" is this
press inside AdaKV with eps = 1e-2 (head-adaptive, a later part of issue #14); this is the bare press.
Needs a RoPE model whose frequencies do not depend on the length (kvbench.engine.rope refuses the others), and
every prefill query: with --prefill-chunk it is refused (the moments could be accumulated chunk by chunk; not done)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvbench.errors import InputError
from kvbench.methods.base import (
    HeadRanking,
    LayerView,
    Method,
    SelectContext,
    full_indices,
    reduce_groups,
    topk_sorted,
)
from kvbench.methods.snapkv import checked_scores


def mean_rotation_t(rerotator: Any, start: int, count: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """R^T [d, d] for R = the mean RoPE rotation over positions start .. start+count-1, attention_scaling
    included. RoPE is linear in (cos, sin), so the mean rotation is the rotation by the mean cos and sin; it is
    applied with the model's own rotation function to the identity (row j of the result is R e_j)."""
    positions = torch.arange(start, start + count, device=rerotator.rotary.inv_freq.device)[None]
    with torch.no_grad():
        cos, sin = rerotator.rotary(torch.zeros(1, dtype=torch.float32, device=positions.device), positions)
    cos = cos[0].float().mean(dim=0).to(device)
    sin = sin[0].float().mean(dim=0).to(device)
    eye = torch.eye(head_dim, dtype=torch.float32, device=device)[None, None]  # [batch, heads, rows, d]
    cos, sin = (x.expand(1, head_dim, x.shape[-1]) for x in (cos, sin))  # the same (cos, sin) for every row
    _, rotated = rerotator.apply(eye, eye, cos, sin)
    return rotated[0, 0].float()


def expected_attention_scores(view: LayerView, n_future: int, n_sink: int, use_covariance: bool,
                              use_vnorm: bool, epsilon: float, gqa_reduce: str, who: str) -> torch.Tensor:
    """[H_kv, T] float32 scores of the module docstring (T > n_sink)."""
    n_tokens, h_kv = view.n_tokens, view.keys.shape[0]
    queries = view.query_prerope(who)  # [H_q, T_q, d]; query i at position T - T_q + i
    first = max(0, n_sink - (n_tokens - queries.shape[1]))
    queries = queries[:, first:, :]
    mean = queries.mean(dim=1)  # [H_q, d]
    rot_t = mean_rotation_t(view.rerotator(who), n_tokens, n_future, queries.shape[-1], queries.device)
    keys = view.keys[:, n_sink:, :].float().repeat_interleave(view.group, dim=0)  # [H_q, T - n_s, d]
    logits = torch.matmul(keys, (mean @ rot_t)[:, :, None])[..., 0] * view.scaling
    if use_covariance:
        centered = queries - mean[:, None, :]
        cov = torch.matmul(centered.transpose(1, 2), centered) / queries.shape[1]  # [H_q, d, d]
        cov = rot_t.T @ cov @ rot_t  # R Sigma R^T
        logits = logits + 0.5 * view.scaling**2 * (torch.matmul(keys, cov) * keys).sum(dim=-1)
    scores = reduce_groups(torch.softmax(logits, dim=-1), h_kv, gqa_reduce)
    if use_vnorm:
        scores = (scores + epsilon) * view.values[:, n_sink:, :].float().norm(dim=-1)
    sinks = torch.full((h_kv, n_sink), scores.max().item() + 1, dtype=torch.float32, device=scores.device)
    return torch.cat([sinks, scores], dim=-1)


@dataclass
class ExpectedAttention(Method):
    name = "expected_attention"
    family = "query statistics"
    query_aware = True
    ranked = True  # select keeps the top C of the scores below (the sinks score above every other token)
    source = (
        "Devoto et al. 2025, Expected Attention, arXiv 2510.00636; kvpress 0.5.5 ExpectedAttentionPress "
        "(expected_attention_press.py L55-165) defaults; methods-2.md §2.15"
    )

    n_future_positions: int = 512  # n_f: future positions the RoPE rotation is averaged over
    n_sink: int = 4  # n_s: first tokens always kept and left out of the query statistics
    use_covariance: bool = True  # the second-moment term of the expected logit
    use_vnorm: bool = True  # weight by the value norm: (p + epsilon) |v|
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_future_positions < 1:
            raise InputError(f"expected_attention: n_future_positions must be >= 1, got {self.n_future_positions}")
        if self.n_sink < 0:
            raise InputError(f"expected_attention: n_sink must be >= 0, got {self.n_sink}")

    def scorer_key(self) -> tuple:
        return ("expected-attention", self.n_future_positions, self.n_sink, self.use_covariance, self.use_vnorm,
                self.epsilon, self.gqa_reduce)

    def prefill_needs(self) -> frozenset[str]:
        return frozenset({"all_queries"})  # the query moments: a chunked prefill is refused (kvbench.engine.prefill)

    def score(self, view: LayerView) -> torch.Tensor | None:
        if view.n_tokens <= self.n_sink:
            return None  # nothing to score; select keeps everything
        return expected_attention_scores(view, self.n_future_positions, self.n_sink, self.use_covariance,
                                         self.use_vnorm, self.epsilon, self.gqa_reduce, self.name)

    def select(self, ctx: SelectContext) -> torch.Tensor:
        if ctx.n_tokens <= ctx.kept or ctx.n_tokens <= self.n_sink:
            return full_indices(ctx.n_kv_heads, ctx.n_tokens, ctx.keys.device)
        return topk_sorted(checked_scores(ctx, self.name), ctx.kept)

    def ranking(self, ctx: SelectContext) -> HeadRanking | None:
        # the sinks are not protected but ranked first by their max + 1 score, as kvpress's AdaKVPress sees them
        if ctx.n_tokens <= self.n_sink:
            return None
        return HeadRanking.plain(checked_scores(ctx, self.name), ctx.kept)
