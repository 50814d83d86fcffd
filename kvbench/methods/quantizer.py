"""KIVI's asymmetric min-max quantizer and its cache lifecycle, as pure functions (methods-2.md §2.18).

Quantizer (jy-yuan/KIVI@876b4d2 `quant/new_pack.py` L8-48, the pure-torch reference of the Triton path): for a
group x of G elements, m = min x, M = max x, step = (M - m) / (2^b - 1), code = round(clamp((x - m) / step,
0, 2^b - 1)) (clamp before round; torch.round rounds half to even), x_hat = code * step + m. Everything is
computed in the data's own dtype, as the official code does in fp16. [ours] A constant group (M = m) has
step 0: the official code divides by zero there; kvbench gives code 0 and x_hat = m (the group's value).

Grouping: keys per channel (a group is G consecutive cached entries of one channel of one head), values per
token (G consecutive channels of one entry). [ours] A head dimension that is not a multiple of G ends with a
shorter value group (the official Triton path asserts d % G == 0; the tiny test models have d = 16 < 32).

Lifecycle (`models/llama_kivi.py`): after the prompt, the first n - (n mod R) keys are quantized (none if
n < R) and the first max(0, n - R) values; while decoding, keys join a full-precision residual that is
quantized as one block when it reaches R entries; values keep a sliding residual of the R newest entries
and the oldest leaves it (quantized alone) when it exceeds R. Attention always runs before the quantization
of the step (the new token attends in full precision)."""

from __future__ import annotations

import torch


def quantize_groups(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups of `group_size` consecutive elements along the last axis (the last group may be shorter).
    Returns (codes as x's dtype, step, min): codes [..., n], step and min [..., n_groups], all in x.dtype."""
    n = x.shape[-1]
    full = n - n % group_size
    parts = []
    if full:
        parts.append(_quantize_exact(x[..., :full].reshape(*x.shape[:-1], full // group_size, group_size), bits))
    if full < n:
        parts.append(_quantize_exact(x[..., full:].unsqueeze(-2), bits))
    codes = torch.cat([p[0].flatten(-2) for p in parts], dim=-1)
    step = torch.cat([p[1] for p in parts], dim=-1)
    low = torch.cat([p[2] for p in parts], dim=-1)
    return codes, step, low


def _quantize_exact(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    top = 2**bits - 1
    low = groups.amin(dim=-1)
    step = (groups.amax(dim=-1) - low) / top
    scaled = (groups - low[..., None]) / step[..., None]
    scaled = torch.where(step[..., None] > 0, scaled, torch.zeros_like(scaled))
    return scaled.clamp(0, top).round(), step, low


def dequantize_groups(codes: torch.Tensor, step: torch.Tensor, low: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of quantize_groups: code * step + min, group by group along the last axis."""
    index = torch.arange(codes.shape[-1], device=codes.device) // group_size
    return codes * step[..., index] + low[..., index]


def fake_quantize(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Quantize then dequantize along the last axis, in x's dtype: what a packed cache would return."""
    if x.shape[-1] == 0:
        return x
    codes, step, low = quantize_groups(x, bits, group_size)
    return dequantize_groups(codes, step, low, group_size).to(x.dtype)


def fake_quantize_keys(keys: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """keys [..., n, d] with n a multiple of the group size: per channel, groups of G consecutive entries."""
    return fake_quantize(keys.transpose(-1, -2), bits, group_size).transpose(-1, -2)


def fake_quantize_values(values: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """values [..., n, d]: per entry, groups of G consecutive channels."""
    return fake_quantize(values, bits, group_size)


def quantized_after_prompt(n: int, residual: int) -> tuple[int, int]:
    """(quantized keys, quantized values) right after a prompt of n entries: n - n mod R, max(0, n - R)."""
    return quantized_after_append(n, 0, 0, residual)


def quantized_after_append(n: int, keys_quantized: int, values_quantized: int, residual: int) -> tuple[int, int]:
    """(quantized keys, quantized values) once a head holding n entries (the new ones included) has run the
    step's attention: every full block of R residual keys is quantized, and values beyond the R newest."""
    full_keys = n - keys_quantized
    return keys_quantized + full_keys - full_keys % residual, max(values_quantized, n - residual)
