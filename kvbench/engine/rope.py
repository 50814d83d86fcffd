"""Re-rotating cached (post-RoPE) keys to new positions, for `position_mode = contiguous`.

Cached keys carry the rotation of the position they were computed at. RoPE rotations compose,
R(a) R(b) = R(a + b), so a key computed at position p is moved to position p' by rotating it once more by
delta = p' - p (negative deltas included). In contiguous mode the kept keys are moved to their index in the
cache (0 .. L-1) and the next query sits at position L: StreamingLLM's rolling positions.

Model-agnostic: cos/sin come from the model's own rotary-embedding module called with the deltas as
position ids (its `attention_scaling`, which the model multiplies into cos and sin, is divided out so it
is not applied a second time), and the rotation itself uses the model's own `apply_rotary_pos_emb`
(found in the Python module that defines the model's attention class; Llama's rotate-half convention
when there is none). RoPE types whose frequencies depend on the sequence length (dynamic NTK, longrope)
have no well-defined shift and are refused.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch

from kvbench.errors import InputError

_LENGTH_DEPENDENT = ("dynamic", "longrope")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _default_apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
    """Llama's rotate-half RoPE; a rotary part narrower than the head rotates the first dims only."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]

    def one(x: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        return torch.cat(((x_rot * cos) + (rotate_half(x_rot) * sin), x_pass), dim=-1)

    return one(q), one(k)


def _find_rotary(model: Any) -> Any:
    found = [m for m in model.modules() if hasattr(m, "inv_freq") and "rotary" in type(m).__name__.lower()]
    if not found:
        raise InputError(f"{type(model).__name__}: no rotary embedding module; position_mode=contiguous needs RoPE")
    first = found[0]
    for other in found[1:]:
        same = other.inv_freq.shape == first.inv_freq.shape and torch.equal(other.inv_freq, first.inv_freq)
        if not same or getattr(other, "attention_scaling", 1.0) != getattr(first, "attention_scaling", 1.0):
            raise InputError(
                f"{type(model).__name__} has several different rotary embeddings; position_mode=contiguous "
                "supports one RoPE per model"
            )
    rope_type = getattr(first, "rope_type", "default")
    if isinstance(rope_type, str) and any(kind in rope_type for kind in _LENGTH_DEPENDENT):
        raise InputError(
            f"rope_type '{rope_type}' changes its frequencies with the sequence length: kept keys cannot be "
            "moved to new positions by a rotation; use position_mode=original"
        )
    return first


def _find_apply(model: Any) -> Callable:
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "scaling"):  # an attention module
            fn = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
            if fn is not None:
                try:
                    params = list(inspect.signature(fn).parameters)
                except (TypeError, ValueError):
                    params = []
                if params[:4] == ["q", "k", "cos", "sin"]:
                    return fn
            break
    return _default_apply


class Rerotator:
    """Rotates keys [..., H, L, d] by per-(head, token) position deltas [H, L]."""

    def __init__(self, rotary: Any, apply: Callable = _default_apply):
        self.rotary = rotary
        self.apply = apply
        self.scaling = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)

    def cos_sin(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pure rotation cos/sin (no attention_scaling) for integer deltas of any sign: [*delta.shape, rot]."""
        device = self.rotary.inv_freq.device
        flat = delta.reshape(1, -1).to(device)
        dummy = torch.zeros(1, dtype=torch.float32, device=device)
        with torch.no_grad():
            cos, sin = self.rotary(dummy, flat)
        cos, sin = cos.float(), sin.float()
        if self.scaling != 1.0:
            cos, sin = cos / self.scaling, sin / self.scaling
        return cos.reshape(*delta.shape, -1), sin.reshape(*delta.shape, -1)

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """keys [1, H, L, d] or [H, L, d]; delta [H, L] integer position shifts. Rotation in float32."""
        squeeze = keys.dim() == 3
        k = keys if squeeze else keys[0]
        heads, length, dim = k.shape
        cos, sin = self.cos_sin(delta.to(torch.long))  # [H, L, rot]
        cos, sin = cos.to(k.device), sin.to(k.device)
        # As [batch=H, heads=1, L, d] so the per-(head, token) cos/sin broadcast through unsqueeze_dim=1.
        _, out = self.apply(k.float()[:, None], k.float()[:, None], cos, sin)
        out = out[:, 0].to(keys.dtype).reshape(heads, length, dim)
        return out if squeeze else out[None]

    def to_contiguous(self, keys: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Keys just gathered at positions `kept` [H, k] (their old positions), moved to positions 0..k-1,
        i.e. to their index in the new cache. Unchanged (same tensor) when nothing moves."""
        delta = torch.arange(kept.shape[-1], device=kept.device)[None, :] - kept
        if not bool(delta.any()):
            return keys
        return self.rotate(keys, delta)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def for_model(model: Any) -> Rerotator:
    """The model's Rerotator, built once per model object."""
    if model not in _CACHE:
        _CACHE[model] = Rerotator(_find_rotary(model), _find_apply(model))
    return _CACHE[model]
