"""Block-wise KeyDiff: the paper's setting, as kvpress's BlockPress(KeyDiffPress) (methods-2.md §2.16).

Per KV head, with C the budget and B = `block_size` (kvpress 0.5.5 `block_press.py` L34-98; its registry's
`block_keydiff` uses B = 128):
  kept = positions 0 .. C-1
  for each block [i, i+B) of the following positions (i = C, C+B, ...):
      candidates = kept + the block
      kept = the C candidates with the highest KeyDiff score, the anchor recomputed over the candidates only
Selection only: every key and value comes from one full-attention prefill (kvpress's docstring says the same);
a true chunked prefill, whose later tokens attend to an already-evicted cache, is not what this is.
Scores in float32; ties go to the earlier token (kvpress: torch.topk's order); no compression when T <= C."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.errors import InputError
from kvbench.methods.base import Method, SelectContext, full_indices, topk_sorted
from kvbench.methods.keydiff import keydiff_scores


def block_keydiff_keep(keys: torch.Tensor, kept: int, block: int) -> torch.Tensor:
    """keys [H, T, d] -> [H, kept] ascending positions chosen by the block loop above (T > kept >= 1)."""
    heads, n_tokens, dim = keys.shape
    chosen = torch.arange(kept, device=keys.device).expand(heads, kept)
    for start in range(kept, n_tokens, block):
        block_positions = torch.arange(start, min(start + block, n_tokens), device=keys.device)
        # kept positions all precede the block, so candidates stay in ascending position order and
        # topk_sorted's earlier-candidate tie rule is the earlier-token rule
        candidates = torch.cat([chosen, block_positions.expand(heads, -1)], dim=-1)
        candidate_keys = keys.gather(1, candidates[..., None].expand(-1, -1, dim))
        chosen = candidates.gather(1, topk_sorted(keydiff_scores(candidate_keys), kept))
    return chosen


@dataclass
class BlockKeyDiff(Method):
    name = "block_keydiff"
    family = "key/value geometry"
    source = (
        "Park et al. 2025, KeyDiff, arXiv 2504.15364; block loop as kvpress 0.5.5 BlockPress(KeyDiffPress) "
        "(block_press.py L34-98), block 128 as its registry; methods-2.md §2.16"
    )

    block_size: int = 128  # positions added per step of the selection loop

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1:
            raise InputError(f"block_keydiff: block_size must be >= 1, got {self.block_size}")

    def query_head_selection(self) -> bool:
        return False  # scored from the keys (and values) alone: a group's query heads would keep identical sets

    def select(self, ctx: SelectContext) -> torch.Tensor:
        if ctx.n_tokens <= ctx.kept:
            return full_indices(ctx.n_kv_heads, ctx.n_tokens, ctx.keys.device)
        return block_keydiff_keep(ctx.keys, ctx.kept, min(self.block_size, ctx.n_tokens))
