"""KNorm (L2 norm): keep the C cached keys with the LOWEST L2 norm, per KV head.

Keys are the cached ones (post-RoPE, as KVCache-Factory's L2NormCluster and kvpress's KnormPress read them);
norms in fp32; ties go to the earlier token; no window is protected (as L2NormCluster, which sorts ascending and
keeps the first C). No compression when T <= C. Layers in `skip_layers` are kept whole: KVCache-Factory skips
layers 0 and 1 (preset `knorm_factory`), which holds more than the budget; the default () keeps the budget
honest. No attention weights needed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.errors import InputError
from kvbench.methods.base import HeadRanking, Method, SelectContext, full_indices, topk_sorted


@dataclass
class KNorm(Method):
    name = "knorm"
    family = "key/value geometry"
    ranked = True
    source = (
        "Devoto et al. 2024, A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression, "
        "arXiv 2406.11430; selection as KVCache-Factory L2NormCluster / kvpress KnormPress"
    )

    skip_layers: tuple[int, ...] = ()  # layers kept whole (KVCache-Factory: (0, 1))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.skip_layers = tuple(int(layer) for layer in self.skip_layers)
        if any(layer < 0 for layer in self.skip_layers):
            raise InputError(f"knorm: skip_layers must be layer indices >= 0, got {self.skip_layers}")

    def query_head_selection(self) -> bool:
        return False  # scored from the keys alone: a group's query heads would keep identical sets

    def select(self, ctx: SelectContext) -> torch.Tensor:
        if ctx.n_tokens <= ctx.kept or ctx.layer in self.skip_layers:
            return full_indices(ctx.n_kv_heads, ctx.n_tokens, ctx.keys.device)
        norms = ctx.keys.float().norm(dim=-1)  # [H_kv, T]
        return topk_sorted(-norms, ctx.kept)

    def ranking(self, ctx: SelectContext) -> HeadRanking | None:
        if ctx.layer in self.skip_layers:
            return None
        norms = ctx.keys.float().norm(dim=-1)
        return HeadRanking(-norms, torch.zeros(ctx.n_tokens, dtype=torch.bool, device=norms.device), ctx.kept)
