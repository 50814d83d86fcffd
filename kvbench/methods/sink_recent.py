"""Sink + recent (methods.md §2.11): the first `sinks` tokens plus the most recent ones, budget B in all.
StreamingLLM's rule with generic parameters; no scoring, no attention needed.

Modes: `prefill` (evict once after the prompt, then the cache grows by one per generated token) or `online`
(evict after every later attention call, so the cache never holds more than B tokens between steps).
`position_mode` original (default) or contiguous (kept keys re-rotated to their index in the cache).
When B <= sinks the sinks shrink to B - 1 so the newest token is always kept [ours]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.errors import InputError
from kvbench.methods.base import DecodeContext, LayerDecoder, Method, SelectContext, full_indices

MODES = ("prefill", "online")


def sink_recent_indices(n_tokens: int, budget: int, sinks: int, n_heads: int, device: torch.device) -> torch.Tensor:
    """[n_heads, min(budget, n_tokens)] ascending: positions 0..s-1 and the last budget - s."""
    if n_tokens <= budget:
        return full_indices(n_heads, n_tokens, device)
    s = max(0, min(sinks, budget - 1))
    index = torch.cat([torch.arange(s, device=device), torch.arange(n_tokens - (budget - s), n_tokens, device=device)])
    return index.expand(n_heads, budget)


class PositionalDecoder(LayerDecoder):
    """Online eviction for positional rules: after each step keep sinks + recent, budget tokens in all."""

    def __init__(self, budget: int, sinks: int, n_kv_heads: int):
        self.budget, self.sinks, self.n_kv_heads = budget, sinks, n_kv_heads

    def step(self, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
        length = keys.shape[1]
        if length <= self.budget:
            return None
        return sink_recent_indices(length, self.budget, self.sinks, self.n_kv_heads, keys.device)


@dataclass
class SinkRecent(Method):
    name: ClassVar[str] = "sink_recent"
    family: ClassVar[str] = "positional"
    source: ClassVar[str] = "StreamingLLM's sink+recent rule with generic s (Xiao et al. 2024); methods.md §2.11"
    continuous: ClassVar[bool] = False  # per instance: True in online mode (set in __post_init__)
    sinks: int = 4
    mode: str = "prefill"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise InputError(f"{self.name}: mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.sinks < 0:
            raise InputError(f"{self.name}: sinks must be >= 0, got {self.sinks}")
        # The engine only asks continuous methods for a decoder: online mode is the continuous one.
        object.__setattr__(self, "continuous", self.mode == "online")

    def query_head_selection(self) -> bool:
        return False  # positional: every head keeps the same positions

    def select(self, ctx: SelectContext) -> torch.Tensor:
        return sink_recent_indices(ctx.n_tokens, ctx.kept, self.sinks, ctx.n_kv_heads, ctx.keys.device)

    def decoder(self, ctx: DecodeContext) -> LayerDecoder | None:
        if self.mode != "online":
            return None
        return PositionalDecoder(ctx.select.kept, self.sinks, ctx.select.n_kv_heads)
