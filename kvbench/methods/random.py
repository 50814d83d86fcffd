"""Random retention: the control of the truncation study (methods.md §2.9, §6).

Per layer, with C the budget: a uniform random subset of C - 1 of the first T - 1 prompt positions, plus the
last prompt token, always kept. The draw is reproducible: a torch.Generator (CPU) seeded with
crc32(f"{ctx.seed}:{layer}") draws torch.randperm(T - 1) and keeps its first C - 1 entries (sorted). With
`share=layer_shared` (default) every KV head of the layer keeps that set; with `per_head` KV head h takes the
h-th randperm drawn from the same generator, so heads differ (kvpress RandomPress draws per head).
ctx.seed is the engine's per-sample seed (sample id and --seed), so repeats differ by --seed only.
No compression when T <= C."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from kvbench.errors import InputError
from kvbench.methods.base import Method, SelectContext, full_indices

SHARE = ("layer_shared", "per_head")


def layer_generator(seed: int, layer: int) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(zlib.crc32(f"{seed}:{layer}".encode()))
    return generator


@dataclass
class RandomKeep(Method):
    name = "random"
    family = "control"
    source = "uniform random retention with the last token kept (methods.md §2.9, ours; kvpress RandomPress per head)"

    share: str = "layer_shared"  # layer_shared | per_head

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.share not in SHARE:
            raise InputError(f"random: share must be layer_shared or per_head, got '{self.share}'")

    def query_head_selection(self) -> bool:
        return self.share == "per_head"  # layer_shared: one draw for every head

    def select(self, ctx: SelectContext) -> torch.Tensor:
        device = ctx.keys.device
        if ctx.n_tokens <= ctx.kept:
            return full_indices(ctx.n_kv_heads, ctx.n_tokens, device)
        generator = layer_generator(ctx.seed, ctx.layer)
        heads = 1 if self.share == "layer_shared" else ctx.n_kv_heads
        last = torch.tensor([ctx.n_tokens - 1])
        rows = []
        for _ in range(heads):
            drawn = torch.randperm(ctx.n_tokens - 1, generator=generator)[: ctx.kept - 1]
            rows.append(torch.cat([drawn.sort().values, last]))
        picked = torch.stack(rows).to(device)
        return picked.expand(ctx.n_kv_heads, -1) if heads == 1 else picked
