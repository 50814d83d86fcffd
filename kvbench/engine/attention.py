"""kvbench's attention function, registered through transformers' public AttentionInterface.

It computes exactly what the model's sdpa path computes, with three additions:
- a causal mask aligned to the *bottom right* built from this layer's own key length, so layers whose caches
  hold different numbers of tokens (PyramidKV) decode correctly: transformers builds its mask from layer 0's
  length, and a registered function is handed no mask at all;
- while a kvbench decode cache is active (`decoding(cache)`), the per-(plan, head) validity mask of this
  layer's RaggedLayer (kvbench.engine.cache): padded entries of heads or plans that keep fewer tokens get no
  attention. A layer whose rows all have one length asks for no mask, so the arithmetic is then the plain
  sdpa path's, bit for bit; a cache stored per query head (as many K/V heads as query heads) is attended
  without repeating it again;
- a hook for observers: the active observer (a context variable) sees each layer's post-RoPE queries and the
  layer's full keys/values, which is all that attention-based scorers need, for any RoPE decoder that
  dispatches through the interface (Llama, Qwen2, Mistral, ...), without re-implementing projections.
  An observer that sets `wants_lse` also gets, for a causal prefill on the CPU, the log-sum-exp of every
  query's attention logits, which the attention kernel computes anyway: the output then comes from that same
  kernel called directly, used only after checking once per (dtype, head dim, group) that it returns exactly
  what `scaled_dot_product_attention` returns (otherwise the observer gets no lse and recomputes).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "kvbench"


class AttentionObserver(Protocol):
    def on_attention(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     lse: torch.Tensor | None = None) -> None:
        """Called once per layer and forward, after the layer's attention output is computed; `lse` [B, H_q, q]
        (float32) only for observers that set `wants_lse`, when the kernel provided it."""


class MaskedCache(Protocol):
    """What attention needs from a decode cache: per layer, a validity mask for the newest q tokens."""

    layers: list[Any]


_ACTIVE: ContextVar[AttentionObserver | None] = ContextVar("kvbench_attention_observer", default=None)
_CACHE: ContextVar[MaskedCache | None] = ContextVar("kvbench_decode_cache", default=None)


@contextmanager
def observing(observer: AttentionObserver | None) -> Iterator[None]:
    token = _ACTIVE.set(observer)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextmanager
def decoding(cache: MaskedCache | None) -> Iterator[None]:
    """Forwards inside this block attend through `cache`'s per-(plan, head) validity masks."""
    token = _CACHE.set(cache)
    try:
        yield
    finally:
        _CACHE.reset(token)


def bottom_right_causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Query i sits at absolute position kv_len - q_len + i and sees keys 0..that position."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)[None, None]


_FLASH_MATCHES: dict[tuple, bool] = {}


def _flash_cpu_matches(dtype: torch.dtype, head_dim: int, heads: int, kv_heads: int) -> bool:
    """Does the CPU flash kernel, called directly on un-repeated K/V, return exactly what sdpa's GQA path
    returns? Probed once per (dtype, head dim, heads) on random inputs of two lengths."""
    key = (dtype, head_dim, heads, kv_heads)
    if key not in _FLASH_MATCHES:
        gen = torch.Generator().manual_seed(0)
        same = True
        try:
            for length in (37, 300):
                q = torch.randn(1, heads, length, head_dim, generator=gen).to(dtype)
                k = torch.randn(1, kv_heads, length, head_dim, generator=gen).to(dtype)
                v = torch.randn(1, kv_heads, length, head_dim, generator=gen).to(dtype)
                want = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=0.1, enable_gqa=heads != kv_heads)
                got, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=0.1)
                same = same and torch.equal(want, got)
        except (RuntimeError, TypeError, AttributeError):
            same = False
        _FLASH_MATCHES[key] = same
    return _FLASH_MATCHES[key]


def _prefill_with_lse(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
                      scaling: float | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(output as sdpa_attention_forward returns it, lse [B, H_q, T]) for a causal CPU prefill, or None."""
    if query.device.type != "cpu" or dropout or query.shape[2] < 2:
        return None
    if not _flash_cpu_matches(query.dtype, query.shape[-1], query.shape[1], key.shape[1]):
        return None
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True,
                                                                         scale=scaling)
    return out.transpose(1, 2).contiguous(), lse


def kvbench_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    kwargs.pop("is_causal", None)
    q_len, kv_len = query.shape[2], key.shape[2]
    cache = _CACHE.get()
    mask = cache.layers[module.layer_idx].attention_mask(q_len, query.shape[1]) if cache is not None else None
    if key.shape[1] == query.shape[1] and getattr(module, "num_key_value_groups", 1) > 1:
        # A cache stored per query head: sdpa_attention_forward would repeat it by the group size again.
        if mask is None and 1 < q_len < kv_len:
            mask = bottom_right_causal_mask(q_len, kv_len, query.device)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
            is_causal=mask is None and q_len == kv_len and q_len > 1)
        out = (out.transpose(1, 2).contiguous(), None)
    elif mask is not None:
        out = sdpa_attention_forward(module, query, key, value, mask, dropout, scaling, is_causal=False, **kwargs)
    elif 1 < q_len < kv_len:
        mask = bottom_right_causal_mask(q_len, kv_len, query.device)
        out = sdpa_attention_forward(module, query, key, value, mask, dropout, scaling, is_causal=False, **kwargs)
    else:
        # q_len == kv_len: plain causal prefill; q_len == 1: one query sees the whole cache.
        observer = _ACTIVE.get()
        fused = None
        if observer is not None and q_len == kv_len and getattr(observer, "wants_lse", False):
            fused = _prefill_with_lse(module, query, key, value, dropout, scaling)
        if fused is not None:
            observer.on_attention(module, query, key, value, lse=fused[1])
            return fused[0], None
        out = sdpa_attention_forward(module, query, key, value, None, dropout, scaling, **kwargs)
    observer = _ACTIVE.get()
    if observer is not None:
        observer.on_attention(module, query, key, value)
    return out


_registered = False


def install(model: Any) -> None:
    """Route the model's attention through kvbench_attention (idempotent)."""
    global _registered
    if not _registered:
        AttentionInterface.register(NAME, kvbench_attention)
        _registered = True
    model.set_attn_implementation(NAME)
