"""The decode cache: K and V of B plans of one sample, padded per layer and masked per (plan, head).

Per layer, `RaggedLayer` holds buffers [B, H, capacity, d] and the valid length of every (plan, head) row:
row (b, h) keeps its entries in columns 0 .. lengths[b, h] - 1, in the order they were kept; every later
column is padding, which kvbench's attention function masks (kvbench.engine.attention) and which is never
counted as kept. A column index carries no position: positions live in the (post-RoPE) keys themselves.

Invariants:
- Appending q tokens writes them at columns lengths[b, h] .. lengths[b, h] + q - 1 of every row, so a row's
  valid entries stay a prefix and heads of different lengths need no gather at decode time.
- When every (plan, head) row of a layer has the same length, the layer exposes exactly the tensors a
  transformers DynamicLayer would hold (views of the buffers, no padding) and asks for no mask: a single plan
  decoded alone computes bit for bit what `model.generate` computes on the same kept entries.
- Layers may differ in width (PyramidKV), plans in length (ratios, methods) and heads in length (Ada-KV).

Everything goes through transformers' public Cache API: `RaggedCache` is a `Cache` whose layers are
`RaggedLayer`s (a `DynamicLayer` subclass), passed to `model(past_key_values=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvbench.methods.base import Selection


@dataclass
class KeptLayer:
    """One plan's compressed layer: keys/values [H, k_max, d] with the valid length of every head [H]."""

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor  # [H] long, on the CPU

    @classmethod
    def full(cls, keys: torch.Tensor, values: torch.Tensor) -> "KeptLayer":
        heads, length = keys.shape[0], keys.shape[1]
        return cls(keys, values, torch.full((heads,), length, dtype=torch.long))

    @classmethod
    def gather(cls, keys: torch.Tensor, values: torch.Tensor, selection: Selection, head_repeat: int = 1) -> "KeptLayer":
        """keys/values [H, T, d] of the full prompt -> the selected entries (padding gathers position 0).
        With head_repeat = g the selection has H * g rows (one per query head) and row h reads head h // g,
        without materialising the repeated prompt."""
        indices = selection.indices.to(keys.device)
        if head_repeat > 1:
            heads = torch.arange(indices.shape[0], device=keys.device)[:, None] // head_repeat
            return cls(keys[heads, indices], values[heads, indices], selection.lengths.to("cpu"))
        index = indices[:, :, None].expand(-1, -1, keys.shape[-1])
        return cls(torch.gather(keys, 1, index), torch.gather(values, 1, index), selection.lengths.to("cpu"))

    @property
    def width(self) -> int:
        return self.keys.shape[1]

    def valid_bytes(self) -> int:
        per_entry = self.keys.shape[-1] * self.keys.element_size() + self.values.shape[-1] * self.values.element_size()
        return int(self.lengths.sum()) * per_entry


class RaggedLayer(DynamicLayer):
    """One decoder layer's K/V for B plans (see the module docstring)."""

    def __init__(self, layers: list[KeptLayer], reserve: int = 0, head_repeat: int = 1):
        super().__init__()
        first = layers[0]
        self.head_repeat = head_repeat  # incoming states are repeated this many times per head (query-head caches)
        width = max(layer.width for layer in layers)
        capacity = width + max(0, reserve)
        heads, dim, vdim = first.keys.shape[0], first.keys.shape[-1], first.values.shape[-1]
        self._k = first.keys.new_zeros((len(layers), heads, capacity, dim))
        self._v = first.values.new_zeros((len(layers), heads, capacity, vdim))
        for b, layer in enumerate(layers):
            self._k[b, :, : layer.width].copy_(layer.keys)
            self._v[b, :, : layer.width].copy_(layer.values)
        self.lengths = torch.stack([layer.lengths for layer in layers]).to(torch.long)  # [B, H], CPU
        self.dtype, self.device = first.keys.dtype, first.keys.device
        # A copy on the device, kept in step with `lengths`, so building masks never copies from the host
        # (a host-to-device copy per layer and step would wait for the GPU).
        self._lengths_dev = self.lengths.to(self.device, copy=True)
        self.is_initialized = True
        self._expose()

    # ---- what attention sees ------------------------------------------------------------------------------
    @property
    def width(self) -> int:
        """Columns in use: the longest (plan, head) row."""
        return int(self.lengths.max()) if self.lengths.numel() else 0

    @property
    def uniform(self) -> bool:
        return bool((self.lengths == self.lengths.reshape(-1)[0]).all()) if self.lengths.numel() else True

    def _expose(self) -> None:
        width = self.width
        self.keys, self.values = self._k[:, :, :width], self._v[:, :, :width]

    def attention_mask(self, q_len: int, query_heads: int) -> torch.Tensor | None:
        """Bool mask [B, query_heads, q_len, width] (True = attend) for a forward of q_len new tokens that were
        just appended; None when every row has the same length (plain bottom-right causal attention applies).
        New token i of row (b, h) sits at column lengths[b, h] - q_len + i and sees its row's columns up to it."""
        if self.uniform:
            return None
        width = self.width
        lengths = self._lengths_dev  # [B, H]
        last = lengths[:, :, None] - q_len + torch.arange(q_len, device=self.device)  # [B, H, q]: own column
        mask = torch.arange(width, device=self.device)[None, None, None, :] <= last[..., None]
        group = query_heads // mask.shape[1]
        return mask.repeat_interleave(group, dim=1) if group > 1 else mask

    # ---- transformers' layer API --------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a RaggedLayer is built from kept entries, never lazily")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.head_repeat > 1:
            key_states = key_states.repeat_interleave(self.head_repeat, dim=1)
            value_states = value_states.repeat_interleave(self.head_repeat, dim=1)
        q_len = key_states.shape[-2]
        self._ensure_capacity(self.width + q_len)
        if self.uniform:
            start = int(self.lengths.reshape(-1)[0]) if self.lengths.numel() else 0
            self._k[:, :, start:start + q_len].copy_(key_states)
            self._v[:, :, start:start + q_len].copy_(value_states)
        else:
            columns = self._lengths_dev[:, :, None] + torch.arange(q_len, device=self.device)
            self._k.scatter_(2, columns[..., None].expand(-1, -1, -1, self._k.shape[-1]), key_states)
            self._v.scatter_(2, columns[..., None].expand(-1, -1, -1, self._v.shape[-1]), value_states)
        self.lengths += q_len
        self._lengths_dev += q_len
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.width

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.width + query_length, 0

    def _ensure_capacity(self, needed: int) -> None:
        capacity = self._k.shape[2]
        if needed <= capacity:
            return
        grown = max(needed, capacity * 3 // 2)
        width = self.width

        def grow(buffer: torch.Tensor) -> torch.Tensor:
            out = buffer.new_zeros((*buffer.shape[:2], grown, buffer.shape[-1]))
            out[:, :, :width].copy_(buffer[:, :, :width])
            return out

        self._k, self._v = grow(self._k), grow(self._v)

    # ---- what the engine does between forwards ------------------------------------------------------------
    def keep_plans(self, rows: list[int]) -> None:
        """Drop every plan not in `rows`, in that order (finished plans leave the batch)."""
        index = torch.tensor(rows, dtype=torch.long)
        self.lengths = self.lengths[index]
        self._lengths_dev = self.lengths.to(self.device, copy=True)
        self._k = self._k.index_select(0, index.to(self.device))
        self._v = self._v.index_select(0, index.to(self.device))
        self._expose()

    def plan_entries(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Plan b's keys and values [H, width, d] (padding included) and its lengths [H]."""
        return self._k[b, :, : self.width], self._v[b, :, : self.width], self.lengths[b]

    def set_plan(self, b: int, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> None:
        """Replace plan b's entries (an eviction while decoding): keys/values [H, k, d], lengths [H]."""
        k = keys.shape[1]
        self._k[b, :, :k].copy_(keys)
        self._v[b, :, :k].copy_(values)
        self.lengths[b] = lengths
        self._lengths_dev[b] = lengths.to(self.device)
        self._expose()

    def valid_bytes(self, b: int) -> int:
        per_entry = self._k.shape[-1] * self._k.element_size() + self._v.shape[-1] * self._v.element_size()
        return int(self.lengths[b].sum()) * per_entry

    def allocated_bytes(self, b: int) -> int:
        """Plan b's share of the buffers: its rows, padding and reserved room included."""
        return (self._k[b].numel() * self._k.element_size()) + (self._v[b].numel() * self._v.element_size())


class RaggedCache(Cache):
    """A transformers Cache of RaggedLayers: the decode cache of B plans of one sample."""

    def __init__(self, plans: list[list[KeptLayer]], reserve: int = 0, head_repeat: int = 1):
        n_layers = len(plans[0])
        layers = [RaggedLayer([plan[i] for plan in plans], reserve, head_repeat) for i in range(n_layers)]
        super().__init__(layers=layers)

    @property
    def batch_size(self) -> int:
        return self.layers[0].lengths.shape[0]

    def keep_plans(self, rows: list[int]) -> None:
        for layer in self.layers:
            layer.keep_plans(rows)

    def valid_bytes(self, b: int) -> int:
        return sum(layer.valid_bytes(b) for layer in self.layers)

    def allocated_bytes(self, b: int) -> int:
        return sum(layer.allocated_bytes(b) for layer in self.layers)

    def max_length(self, b: int) -> int:
        """The longest row any layer holds for plan b."""
        return max(int(layer.lengths[b].max()) for layer in self.layers)

    def lengths(self, b: int) -> list[int]:
        """Per layer, plan b's longest head."""
        return [int(layer.lengths[b].max()) for layer in self.layers]
