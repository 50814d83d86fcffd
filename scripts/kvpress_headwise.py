"""The kvpress side of the head-wise parity checks (methods-2 §5.2), used by scripts/kvpress_side.py inside
.venv-kvpress: builders for the presses that MASK instead of evicting (AdaKVPress, CriticalAdaKVPress,
DuoAttentionPress with an injected pattern), and the extraction of what they masked.

Those presses leave the cache whole and record the evicted (batch, KV head, position) triples in each
attention module's `masked_key_indices` during the prefill; only a later prefill-shaped forward clears them,
so they can be read after the question and the first generated token (methods-2 §1.7, §5.1)."""

from __future__ import annotations

import numpy as np

HEADWISE = ("adakv", "critical_adakv", "duo_attention")


def build(spec: dict):
    """A head-wise press from a request entry: {"name": ..., "compression_ratio": ...} plus its parameters."""
    from kvpress import AdaKVPress, CriticalAdaKVPress, DuoAttentionPress, ExpectedAttentionPress, SnapKVPress

    name = spec["name"]
    if name == "duo_attention":
        pattern = np.asarray(spec["pattern"], dtype=float)
        sink, recent = int(spec["sink"]), int(spec["recent"])

        class InjectedDuo(DuoAttentionPress):  # as kvpress's own tests: a fixed pattern instead of a download
            @staticmethod
            def load_attention_pattern(model):
                return sink, recent, pattern

        return InjectedDuo(head_compression_ratio=float(spec["head_compression_ratio"]))
    cr = float(spec["compression_ratio"])
    if spec.get("inner") == "expected_attention":  # kvpress's registry "expected_attention" wraps it in AdaKV
        inner = ExpectedAttentionPress(compression_ratio=cr, epsilon=float(spec.get("epsilon", 0.0)))
    else:
        inner = SnapKVPress(compression_ratio=cr, window_size=int(spec.get("window_size", 64)),
                            kernel_size=int(spec.get("kernel_size", 5)))
    if name == "adakv":
        return AdaKVPress(inner, alpha_safeguard=float(spec.get("alpha", 0.2)))
    if name == "critical_adakv":
        return CriticalAdaKVPress(inner, alpha_safeguard=float(spec.get("alpha", 0.2)),
                                  epsilon=float(spec.get("epsilon", 1e-4)),
                                  first_stage_ratio=float(spec.get("first_stage_ratio", 0.5)))
    raise ValueError(f"unknown head-wise press {name}")


def masked_positions(model, n_tokens: int) -> list[list[list[int]]]:
    """[layer][KV head] -> sorted context positions the press masked (batch 0)."""
    out = []
    heads = model.config.num_key_value_heads
    for layer in model.model.layers:
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        per_head: list[list[int]] = [[] for _ in range(heads)]
        if masked is not None:
            batch, head, position = (t.tolist() for t in masked)
            for b, h, p in zip(batch, head, position):
                if b == 0 and p < n_tokens:
                    per_head[h].append(p)
        out.append([sorted(h) for h in per_head])
    return out


def reported_ratio(press) -> float | None:
    """The compression ratio the press reports after a forward (DuoAttention computes it from the pattern)."""
    try:
        return float(press.compression_ratio)
    except (AssertionError, AttributeError, TypeError):
        return None


def duo_on_the_fly(model, request: dict) -> dict:
    """kvpress's own DuoAttention proxy (duo_attention_on_the_fly) on the request's texts instead of BookSum: the
    dataset loader is replaced by one returning exactly those texts (their sampled order does not change a
    mean), so kvbench's offline proxy (kvbench.duo_patterns) can be compared with it."""
    import pandas as pd
    from kvpress.presses import duo_attention_press as duo

    texts = list(request["texts"])

    class Texts:
        def to_pandas(self):
            return pd.DataFrame({"chapter": texts})

    original = duo.load_dataset
    duo.load_dataset = lambda *args, **kwargs: Texts()
    try:
        duo.cache.clear()
        scores = duo.duo_attention_on_the_fly(model, num_samples=len(texts), q_len=int(request.get("q_len", 500)))
    finally:
        duo.load_dataset = original
    return {"scores": scores.tolist()}
