"""KIVI: 2- and 4-bit KV quantization, keys per channel and values per token, with a full-precision residual
(Liu, Yuan et al., ICML 2024, arXiv 2402.02750; jy-yuan/KIVI@876b4d2; methods-2.md §2.18).

A transform wrapper: alone (`kivi2`, `kivi4`) it quantizes the whole prompt's cache (FullKV tokens); composed
with an eviction method (`snapkv+kivi4`) it quantizes the kept entries as if they were the prompt, in
ascending position order (a key group is G consecutive *kept* entries, which need not be adjacent
positions; the residual is the last k mod R kept keys and the last R kept values), per head, so heads of
different lengths quantize their own sequences. Defaults are KIVI's LongBench setting: group size 32,
residual 128 for both bit widths (`docs/long_bench.md`).

The cache lifecycle follows `models/llama_kivi.py` (kvbench.methods.quantizer): prefill attention in full
precision; after it, n - (n mod R) keys and max(0, n - R) values quantized; while decoding, every step
attends first, then a key residual that reached R entries is quantized as one block and values older than
the R newest are quantized one entry at a time. Each plan row of the batched decode cache keeps its own
per-(layer, head) counts.

Storage `fake` [ours]: quantize then dequantize in the model dtype and store the result in place; attention is
the official fused kernel's (dequantize-then-multiply) up to float reassociation. The bytes reported are the
packed layout's (payload + a step and a minimum per group in the model dtype + residual;
kvbench.methods.storage), and the row says its storage is simulated. A packed mode is not implemented."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.errors import InputError
from kvbench.methods.quantizer import fake_quantize_keys, fake_quantize_values, quantized_after_append
from kvbench.methods.storage import LayerStorage, Lifecycle, QuantSpec, TransformContext
from kvbench.methods.wrapper import TransformWrapper

BITS = (2, 4, 8)
STORAGE = ("fake",)


class KIVIState(Lifecycle):
    """One plan's quantized-prefix counts per (layer, head): keys[layer][h] and values[layer][h] entries of
    head h are quantized (always a prefix of its entries)."""

    def __init__(self, spec: QuantSpec, keys: list[list[int]], values: list[list[int]]):
        self.spec, self.keys, self.values = spec, keys, values

    def after_forward(self, layer: int, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> None:
        spec = self.spec
        done = list(zip(lengths.tolist(), self.keys[layer], self.values[layer]))
        todo = [quantized_after_append(n, k, v, spec.residual) for n, k, v in done]
        if len(set(done)) == 1:  # every head alike (the usual case): one call for all heads
            (_, k_done, v_done), (k_new, v_new) = done[0], todo[0]
            _quantize_span(keys, values, slice(None), k_done, k_new, v_done, v_new, spec)
        else:
            for h, ((_, k_done, v_done), (k_new, v_new)) in enumerate(zip(done, todo)):
                _quantize_span(keys, values, h, k_done, k_new, v_done, v_new, spec)
        self.keys[layer] = [k for k, _ in todo]
        self.values[layer] = [v for _, v in todo]


def _quantize_span(keys: torch.Tensor, values: torch.Tensor, heads: "int | slice", k_done: int, k_new: int,
                   v_done: int, v_new: int, spec: QuantSpec) -> None:
    """Quantize keys k_done .. k_new - 1 and values v_done .. v_new - 1 of the given heads, in place."""
    if k_new > k_done:
        keys[heads, k_done:k_new] = fake_quantize_keys(keys[heads, k_done:k_new], spec.bits, spec.group_size)
    if v_new > v_done:
        values[heads, v_done:v_new] = fake_quantize_values(values[heads, v_done:v_new], spec.bits, spec.group_size)


def quantize_kept(keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, spec: QuantSpec) -> KIVIState:
    """Quantize one layer's kept entries in place (keys/values [H, W, d], head h's in its first lengths[h]
    columns) as KIVI does after the prompt; returns the per-head counts as a one-layer state."""
    state = KIVIState(spec, [[0] * len(lengths)], [[0] * len(lengths)])
    state.after_forward(0, keys, values, lengths)
    return state


@dataclass
class KIVI(TransformWrapper):
    name: ClassVar[str] = "kivi"
    source: ClassVar[str] = (
        "Liu, Yuan et al. 2024 (arXiv 2402.02750); jy-yuan/KIVI@876b4d2 quant/new_pack.py, models/llama_kivi.py; "
        "methods-2.md §2.18"
    )
    family: ClassVar[str] = "quantization"
    stage: ClassVar[str] = "quantize"
    inner: str = "fullkv"
    bits: int = 4
    group_size: int = 32  # G
    residual: int = 128  # R: full-precision residual (a multiple of G, as KIVI asserts)
    storage: str = "fake"  # fake: quantize-dequantize in the model dtype, bytes by formula

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise InputError(f"{self.name}: bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.group_size < 1:
            raise InputError(f"{self.name}: group_size must be >= 1, got {self.group_size}")
        if self.residual < self.group_size or self.residual % self.group_size:
            raise InputError(f"{self.name}: residual must be a positive multiple of group_size "
                             f"({self.group_size}), got {self.residual}")
        if self.storage not in STORAGE:
            raise InputError(f"{self.name}: storage must be one of {', '.join(STORAGE)} (packed storage is not "
                             f"implemented), got '{self.storage}'")
        super().__post_init__()

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.residual)

    def apply(self, ctx: TransformContext, scores: Any) -> None:
        quantize_kept(ctx.keys, ctx.values, ctx.lengths, self.spec)
        ctx.storage.quant = self.spec

    def lifecycle(self, storages: list[LayerStorage]) -> KIVIState:
        counts = [quantize_counts(storage.lengths, self.residual) for storage in storages]
        return KIVIState(self.spec, [c[0] for c in counts], [c[1] for c in counts])


def quantize_counts(lengths: torch.Tensor, residual: int) -> tuple[list[int], list[int]]:
    pairs = [quantized_after_append(n, 0, 0, residual) for n in lengths.tolist()]
    return [p[0] for p in pairs], [p[1] for p in pairs]


@dataclass
class KIVI2(KIVI):
    name: ClassVar[str] = "kivi2"
    bits: int = 2


@dataclass
class KIVI4(KIVI):
    name: ClassVar[str] = "kivi4"
    bits: int = 4
