"""FullKV: no compression, the reference every gap is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.methods.base import Method, SelectContext, full_indices


@dataclass
class FullKV(Method):
    name = "fullkv"
    family = "reference"
    source = "no compression (reference)"

    def query_head_selection(self) -> bool:
        return False  # nothing is selected; KVCache-Factory leaves FullKV's cache at H_kv too

    def select(self, ctx: SelectContext) -> torch.Tensor:
        return full_indices(ctx.n_kv_heads, ctx.n_tokens, ctx.keys.device)
