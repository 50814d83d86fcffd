"""kvbench's attention function, registered through transformers' public AttentionInterface.

It computes exactly what the model's sdpa path computes, with two additions:
- a causal mask aligned to the *bottom right* built from this layer's own key length, so layers whose caches
  hold different numbers of tokens (PyramidKV) decode correctly: transformers builds its mask from layer 0's
  length, and a registered function is handed no mask at all;
- a hook for observers: the active observer (a context variable) sees each layer's post-RoPE queries and the
  layer's full keys/values, which is all that attention-based scorers need, for any RoPE decoder that
  dispatches through the interface (Llama, Qwen2, Mistral, ...), without re-implementing projections.
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
    def on_attention(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Called once per layer and forward, after the layer's attention output is computed."""


_ACTIVE: ContextVar[AttentionObserver | None] = ContextVar("kvbench_attention_observer", default=None)


@contextmanager
def observing(observer: AttentionObserver | None) -> Iterator[None]:
    token = _ACTIVE.set(observer)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def bottom_right_causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Query i sits at absolute position kv_len - q_len + i and sees keys 0..that position."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)[None, None]


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
    if 1 < q_len < kv_len:
        mask = bottom_right_causal_mask(q_len, kv_len, query.device)
        out = sdpa_attention_forward(module, query, key, value, mask, dropout, scaling, is_causal=False, **kwargs)
    else:
        # q_len == kv_len: plain causal prefill; q_len == 1: one query sees the whole cache.
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
