"""Sliding window, H2O's "Local" baseline (methods.md §2.10): keep only the last B tokens, no sinks.

Modes: `prefill` (default: evict once after the prompt) or `online` (evict after every later step, the
cache never holds more than B tokens between steps). `position_mode` original (default) or contiguous.
The `truncate` mode of §2.10 (re-encode only the suffix) belongs to the sensitivity study, not the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.errors import InputError
from kvbench.methods.base import DecodeContext, LayerDecoder, Method, SelectContext
from kvbench.methods.sink_recent import MODES, PositionalDecoder, sink_recent_indices


@dataclass
class Sliding(Method):
    name: ClassVar[str] = "sliding"
    family: ClassVar[str] = "positional"
    source: ClassVar[str] = "H2O's Local baseline / StreamingLLM's window attention; methods.md §2.10"
    continuous: ClassVar[bool] = False  # per instance: True in online mode (set in __post_init__)
    mode: str = "prefill"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise InputError(f"{self.name}: mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        object.__setattr__(self, "continuous", self.mode == "online")

    def query_head_selection(self) -> bool:
        return False  # positional: every head keeps the same positions

    def select(self, ctx: SelectContext) -> torch.Tensor:
        return sink_recent_indices(ctx.n_tokens, ctx.kept, 0, ctx.n_kv_heads, ctx.keys.device)

    def decoder(self, ctx: DecodeContext) -> LayerDecoder | None:
        if self.mode != "online":
            return None
        return PositionalDecoder(ctx.select.kept, 0, ctx.select.n_kv_heads)
