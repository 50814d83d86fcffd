"""How a compressed layer is stored once the transforms after selection have run, and what it costs in bytes
(methods-2.md §1.8): token eviction, then key-channel pruning (ThinK), then quantization (KIVI).

kvbench applies those transforms *logically*: pruned channels are zeroed and quantized entries are
quantized-then-dequantized, all kept in the model dtype, so attention computes what a packed cache would
compute while the buffers keep their shape. Nothing of that is counted as compression by looking at the
buffers: a row's `cache_bytes` is the bytes a packed cache of the same content would hold, from the formula
below, and the row says its storage is simulated; `cache_bytes_allocated` stays what is physically allocated.

Per (layer, head) holding k entries, key head dim d, value head dim d_v, element size s:
- ThinK prunes p key channels of every entry but the last `recent` (whose keys keep all d channels) and
  stores a d-bit channel mask per head;
- KIVI with b bits, group G and residual R quantizes the first N_k = k - (k mod R) keys (0 if k < R) per
  channel in groups of G entries, and the first N_v = max(0, k - R) values per entry in groups of G channels
  (ceil(d_v / G) groups); every group stores its step and minimum in the model dtype (2 s bytes);
  the rest is the full-precision residual.
Key groups of a quantized block of G entries exist for every channel any of its entries keeps (d when one of
them is a recent, unpruned entry, d - p otherwise). Payload bits are summed per head and rounded up to bytes.

With p = 0 and no quantization this is k (d + d_v) s, the kept entries' bytes of plain eviction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvbench.methods.quantizer import quantized_after_prompt


@dataclass(frozen=True)
class QuantSpec:
    """KIVI's storage parameters."""

    bits: int
    group_size: int
    residual: int


@dataclass
class LayerStorage:
    """One plan's compressed layer as the transforms left it (see the module docstring)."""

    lengths: torch.Tensor  # [H] entries kept per head
    key_dim: int
    value_dim: int
    element_size: int  # bytes of one element in the model dtype
    pruned_channels: int = 0  # key channels pruned per head (ThinK)
    recent: int = 0  # the last `recent` entries of each head keep every key channel
    quant: QuantSpec | None = None

    @property
    def simulated(self) -> bool:
        """Is any of this layer's saving logical (zeroed channels, fake quantization) rather than physical?"""
        return self.pruned_channels > 0 or self.quant is not None

    def nbytes(self) -> int:
        return sum(self.head_bytes(int(k)) for k in self.lengths.tolist())

    def head_bytes(self, k: int) -> int:
        s8 = 8 * self.element_size
        d, dv, p = self.key_dim, self.value_dim, self.pruned_channels
        unpruned = min(self.recent, k) if p else k  # the last entries keep all d key channels
        pruned = k - unpruned  # entries 0 .. pruned - 1 hold d - p channels
        bits = d if p else 0  # the channel mask
        if self.quant is None:
            bits += (pruned * (d - p) + unpruned * d) * s8 + k * dv * s8
            return -(-bits // 8)
        q = self.quant
        n_keys, n_values = quantized_after_prompt(k, q.residual)
        q_pruned = min(n_keys, pruned)
        bits += (q_pruned * (d - p) + (n_keys - q_pruned) * d) * q.bits  # key payload
        blocks = n_keys // q.group_size
        pruned_blocks = min(blocks, pruned // q.group_size)  # blocks made of pruned entries only
        bits += (pruned_blocks * (d - p) + (blocks - pruned_blocks) * d) * 2 * s8  # key steps and minima
        r_pruned = pruned - q_pruned
        bits += (r_pruned * (d - p) + (k - n_keys - r_pruned) * d) * s8  # key residual
        value_groups = -(-dv // q.group_size)
        bits += n_values * dv * q.bits + n_values * value_groups * 2 * s8 + (k - n_values) * dv * s8
        return -(-bits // 8)


@dataclass
class TransformContext:
    """What a transform gets for one layer of one plan, right after selection and gathering."""

    layer: int
    n_layers: int
    keys: torch.Tensor  # [H, W, d] the kept keys (the plan's own copy: changed in place)
    values: torch.Tensor  # [H, W, d_v]
    storage: LayerStorage  # how they are stored; each transform records what it did
    scores: Any = None  # what the plan's scorer returned for this layer (a wrapper unwraps its own part)
    log: list[tuple[str, int]] = field(default_factory=list)  # (stage, layer bytes after it), in order

    @property
    def lengths(self) -> torch.Tensor:
        return self.storage.lengths

    def valid(self) -> torch.Tensor:
        """[H, W] bool: which columns hold kept entries (the rest pads shorter heads)."""
        width = self.keys.shape[1]
        return torch.arange(width)[None, :] < self.storage.lengths[:, None]

    def record(self, stage: str) -> None:
        self.log.append((stage, self.storage.nbytes()))


class Lifecycle:
    """Per-plan state of a transform that keeps working while the plan decodes (KIVI). After every forward
    the decode loop calls `after_forward` once per layer with views of the plan's rows of the decode cache
    (keys/values [H, W, d], the new entries included; lengths [H]), which it may change in place."""

    def after_forward(self, layer: int, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> None:
        raise NotImplementedError
