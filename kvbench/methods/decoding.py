"""Decoding-time compression: every `interval` decode forwards, score the whole current cache with the inner
method and keep its target number of entries (methods-2.md §2.22; kvpress 0.5.5 DecodingPress,
decoding_press.py L45-239, and CompressionRatioDecodingPress; aimed at long answers).

Semantics, as kvpress's:
- the prefill is not compressed (`prefill=True` compresses it too with the inner method, as kvpress's
  PrefillDecodingPress(inner, DecodingPress(inner)) does);
- every decode forward counts one step per layer: the question chunk with --scope context is one step, each
  generated token one; compression happens after the step's attention when the count reaches `interval` or
  when the forward itself holds at least the target number of tokens; the count and the query buffer then
  reset (also when the cache was already within the target);
- the target is the plan's budget: `--budget N` keeps N entries (DecodingPress's target_size);
  `--ratio r` keeps Budget.kept(seen) = round(r * seen) of the tokens seen so far (kvpress's
  CompressionRatioDecodingPress keeps int(seen * (1 - compression_ratio)) instead);
- positions continue from the uncompressed length (position_mode original; kvpress passes explicit
  position ids), so the inner method must use original positions.

Queries [ours, a labelled deviation]: window scorers (SnapKV, PyramidKV, ...) read the post-RoPE queries of
the tokens appended since the last compression (the last `inner.window()` of them), each rotated at its own
position. kvpress recomputes them from buffered hidden states with the current token's rotary angle, which
rotates every buffered query to the newest position; `kvpress_rope_quirk=True` reproduces that for parity.
Query-free inner methods (Knorm, KeyDiff, StreamingLLM) are unaffected either way. Scorers that read every
query (H2O's column sums) see only the buffered queries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.errors import InputError
from kvbench.methods.base import (
    Budget,
    DecodeContext,
    DecodeStep,
    LayerDecoder,
    LayerView,
    Method,
    SelectContext,
    Selection,
    full_indices,
)
from kvbench.methods.wrapper import Wrapper


class DecodingDecoder(LayerDecoder):
    """One layer of one plan: step count, query buffer, and the prompt positions of the cache's entries."""

    def __init__(self, method: "Decoding", ctx: DecodeContext):
        select = ctx.select
        self.method, self.inner = method, method.inner_method
        self.layer, self.n_layers, self.n_kv_heads, self.group = (
            select.layer, select.n_layers, select.n_kv_heads, select.group)
        self.seed = select.seed
        self.budget = select.budget if select.budget is not None else Budget(tokens=select.kept)
        self.window = self.inner.window()
        self.seen = select.n_tokens  # tokens the model has seen: the next token's position
        kept = Selection.of(ctx.kept_indices)
        self.positions = kept.indices.detach().to("cpu")  # [H_kv, L]: each cache column's position
        self.count = 0
        self.buffer: torch.Tensor | None = None  # [H_q, n, d] post-RoPE queries since the last compression

    def on_step(self, step: DecodeStep) -> torch.Tensor | None:
        q_len = step.query.shape[1]
        self.seen += q_len
        new = torch.arange(self.seen - q_len, self.seen).expand(self.n_kv_heads, q_len)
        self.positions = torch.cat([self.positions, new], dim=1)
        self.count += 1
        older = 0 if self.buffer is None else self.buffer.shape[1]
        if self.window:
            queries = step.query if self.buffer is None else torch.cat([self.buffer, step.query], dim=1)
            self.buffer = queries[:, -self.window:]
        target = self.budget.kept(self.seen)
        if self.count < self.method.interval and q_len < target:
            return None
        queries = self.buffer if self.buffer is not None else step.query
        older = min(older, queries.shape[1] - q_len)
        self.count, self.buffer = 0, None
        if step.keys.shape[1] <= target:
            return None
        if self.method.kvpress_rope_quirk and older > 0:
            queries = self._quirk(queries, older, step)
        keep = self.inner.select(self._context(step, queries, target))
        if isinstance(keep, Selection):
            if not keep.is_uniform:
                raise RuntimeError(f"decoding: {self.inner.name} kept different numbers of tokens per head")
            keep = keep.indices
        self.positions = self.positions.gather(1, keep.detach().to("cpu"))
        return keep

    def _context(self, step: DecodeStep, queries: torch.Tensor, target: int) -> SelectContext:
        length = step.keys.shape[1]
        scores = None
        if self.inner.scorer_key() is not None:
            view = LayerView(layer=self.layer, n_layers=self.n_layers, query=queries, keys=step.keys,
                             values=step.values, scaling=step.scaling, max_window=self.window)
            scores = self.inner.score(view)
        return SelectContext(layer=self.layer, n_layers=self.n_layers, n_tokens=length, kept=target, scores=scores,
                             keys=step.keys, n_kv_heads=self.n_kv_heads, group=self.group, seed=self.seed,
                             budget=self.budget)

    def _quirk(self, queries: torch.Tensor, older: int, step: DecodeStep) -> torch.Tensor:
        """kvpress's rotation: the queries of earlier forwards end up rotated at the newest token's position
        (their own rotation undone, the current one applied), the current forward's keep their own."""
        if step.rope is None:
            raise RuntimeError("decoding: kvpress_rope_quirk needs the model's rotary embedding")
        heads, n, _ = queries.shape
        distance = torch.zeros(n, dtype=torch.long)
        distance[:older] = torch.arange(n - 1, n - 1 - older, -1)  # newest position - own position
        return step.rope().rotate(queries, distance.expand(heads, n)).to(queries.dtype)


@dataclass
class Decoding(Wrapper):
    name: ClassVar[str] = "decoding"
    source: ClassVar[str] = (
        "kvpress 0.5.5 DecodingPress (decoding_press.py), CompressionRatioDecodingPress, PrefillDecodingPress; "
        "methods-2.md §2.22"
    )
    continuous: ClassVar[bool] = True
    family: ClassVar[str] = "decoding-time compression"
    inner: str = "knorm"
    interval: int = 512  # decode forwards between compressions (kvpress compression_interval)
    prefill: bool = False  # also compress once right after the prefill (kvpress PrefillDecodingPress)
    kvpress_rope_quirk: bool = False  # rotate buffered queries at the newest position, as kvpress does

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise InputError(f"decoding: interval must be >= 1, got {self.interval}")
        super().__post_init__()

    def check_inner(self, inner: Method) -> None:
        if isinstance(inner, Decoding):
            raise InputError("decoding: the inner method is already a decoding wrapper")
        if inner.stages():
            raise InputError(f"decoding: {inner.name} transforms its kept entries ({', '.join(inner.stages())}); "
                             "wrap an eviction method")
        if getattr(inner, "head_adaptive", False):
            raise InputError(f"decoding: {inner.name} keeps different numbers of tokens per head; wrap a method "
                             "whose heads keep the same number")
        if inner.position_mode != "original":
            raise InputError(f"decoding: {inner.name} uses position_mode={inner.position_mode}; decoding-time "
                             "compression keeps original positions (e.g. inner=streamingllm_prefill)")

    def window(self) -> int:
        return self._inner.window() if self.prefill else 0

    def scorer_key(self) -> tuple | None:
        return self._inner.scorer_key() if self.prefill else None

    def prefill_needs(self) -> frozenset[str]:
        return self._inner.prefill_needs() if self.prefill else frozenset()

    def select(self, ctx: SelectContext) -> torch.Tensor | Selection:
        if self.prefill:
            return self._inner.select(ctx)
        return full_indices(ctx.n_kv_heads, ctx.n_tokens, ctx.keys.device)

    def decoder(self, ctx: DecodeContext) -> LayerDecoder:
        return DecodingDecoder(self, ctx)

    @property
    def uses_budget(self) -> bool:
        return True
