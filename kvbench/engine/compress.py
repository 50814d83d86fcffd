"""From the full prefill cache to one plan's compressed layers: per layer, the method selects the prompt
positions to keep (one set per head, of one length or of per-head lengths), and the kept keys and values are
gathered into new, smaller tensors. Nothing is masked instead of evicted: what a row reports as kept is
what the decode cache holds (padding of shorter heads is allocated, masked, and reported apart)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvbench.engine import rope
from kvbench.engine.cache import KeptLayer
from kvbench.methods.base import Budget, DecodeContext, LayerDecoder, Method, Selection, SelectContext


@dataclass(frozen=True)
class Plan:
    """One (method, budget) to decode from a prefill."""

    label: str  # the method's name or preset as the user asked for it
    method: Method
    budget: Budget


@dataclass
class Compressed:
    """One plan's cache right after compression."""

    layers: list[KeptLayer]
    decoders: dict[int, LayerDecoder] = field(default_factory=dict)
    # Per layer, the prompt positions kept right after compression; None when nothing was selected (FullKV).
    # Continuous methods may evict more while decoding; this is the prefill selection.
    selections: list[Selection] | None = None

    @property
    def kept_per_layer(self) -> list[float]:
        """Per layer, the mean number of tokens a head keeps (an integer when every head keeps the same)."""
        out: list[float] = []
        for layer in self.layers:
            total, heads = int(layer.lengths.sum()), layer.lengths.numel()
            out.append(total // heads if total % heads == 0 else total / heads)
        return out

    @property
    def valid_bytes(self) -> int:
        return sum(layer.valid_bytes() for layer in self.layers)


def full_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prefill cache's K/V per layer, [1, H_kv, T, d] each."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def compress(
    model: Any, plan: Plan, full: list[tuple[torch.Tensor, torch.Tensor]], scores: dict[tuple, dict[int, Any]],
    seed: int,
) -> Compressed:
    """Select and gather one plan's kept entries, and set up its per-layer decoders (continuous methods)."""
    method, budget = plan.method, plan.budget
    if method.name == "fullkv":
        return Compressed([KeptLayer.full(keys[0], values[0]) for keys, values in full])
    scorer_key = method.scorer_key()
    rerotator = rope.for_model(model) if method.position_mode == "contiguous" else None
    out = Compressed(layers=[], selections=[])
    previous = None
    for index, (keys, values) in enumerate(full):
        n_tokens = keys.shape[2]
        ctx = SelectContext(
            layer=index,
            n_layers=len(full),
            n_tokens=n_tokens,
            kept=budget.kept(n_tokens),
            scores=scores[scorer_key].get(index) if scorer_key is not None else None,
            keys=keys[0],
            n_kv_heads=keys.shape[1],
            group=model.config.num_attention_heads // keys.shape[1],
            previous=previous,
            seed=seed,
        )
        selected = method.select(ctx)
        previous = selected
        selection = Selection.of(selected)
        kept = KeptLayer.gather(keys[0], values[0], selection)
        if rerotator is not None:  # contiguous positions: kept keys move to 0 .. k-1
            kept.keys = rerotator.to_contiguous(kept.keys, selection.indices.to(kept.keys.device))
        out.layers.append(kept)
        out.selections.append(Selection(selection.indices.detach().to("cpu"), selection.lengths.detach().to("cpu")))
        if method.continuous and not budget.is_full:
            decoder = method.decoder(DecodeContext(select=ctx, kept_indices=selected))
            if decoder is not None:
                out.decoders[index] = decoder
    return out
