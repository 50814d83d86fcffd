"""KeyDiff: keep the keys least like the layer's average key direction (methods-2.md §2.16).

Per KV head, over the cached (post-RoPE) keys k_1..k_T (Park et al. 2025, arXiv 2504.15364; formula as kvpress
0.5.5 `keydiff_press.py` L36-46):
  anchor a = mean_i k_i / max(|k_i|, 1e-12)        (the mean of the unit keys)
  s_j     = -cos(k_j, a)                          (torch's cosine_similarity, norms clamped at 1e-8)
and the C keys with the highest s are kept: the most distinctive ones. No queries, no attention, no window,
no training. Scores in float32; ties go to the earlier token; no compression when T <= C.

The paper's block-wise processing is the separate `block_keydiff` method."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.methods.base import HeadRanking, Method, SelectContext, full_indices, topk_sorted


def keydiff_scores(keys: torch.Tensor) -> torch.Tensor:
    """keys [H, n, d] -> [H, n] float32: minus each key's cosine to the mean of the unit keys of its head."""
    k = keys.float()
    anchor = F.normalize(k, p=2, dim=-1).mean(dim=1, keepdim=True)
    return -F.cosine_similarity(k, anchor, dim=-1)


@dataclass
class KeyDiff(Method):
    name = "keydiff"
    family = "key/value geometry"
    ranked = True
    source = (
        "Park et al. 2025, KeyDiff, arXiv 2504.15364; one-shot scoring as kvpress 0.5.5 KeyDiffPress "
        "(keydiff_press.py L36-46); methods-2.md §2.16"
    )

    def query_head_selection(self) -> bool:
        return False  # scored from the keys (and values) alone: a group's query heads would keep identical sets

    def select(self, ctx: SelectContext) -> torch.Tensor:
        if ctx.n_tokens <= ctx.kept:
            return full_indices(ctx.n_kv_heads, ctx.n_tokens, ctx.keys.device)
        return topk_sorted(keydiff_scores(ctx.keys), ctx.kept)

    def ranking(self, ctx: SelectContext) -> HeadRanking:
        return HeadRanking.plain(keydiff_scores(ctx.keys), ctx.kept)
