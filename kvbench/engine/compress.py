"""From the full prefill cache to one plan's compressed layers: per layer, the method selects the prompt
positions to keep (one set per head, of one length or of per-head lengths), and the kept keys and values are
gathered into new, smaller tensors. Nothing is masked instead of evicted: what a row reports as kept is
what the decode cache holds (padding of shorter heads is allocated, masked, and reported apart).

Granularity (methods-2 §1.6): a `kv_head` plan keeps one set per KV head. A `query_head` plan (KVCache-Factory's
default) keeps one set per query head: the method selects over the KV heads repeated to H_q (query head h
reads KV head h // g), the kept entries are gathered per query head, and the decode cache holds H_q heads,
each new token stored g times, so the plan's bytes are g times the kv_head bytes at the same budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvbench.engine import rope
from kvbench.engine.cache import KeptLayer
from kvbench.errors import InputError
from kvbench.granularity import GRANULARITIES
from kvbench.methods.base import Budget, DecodeContext, LayerDecoder, Method, Selection, SelectContext
from kvbench.methods.storage import LayerStorage, Lifecycle, TransformContext


@dataclass(frozen=True)
class Plan:
    """One (method, budget) to decode from a prefill."""

    label: str  # the method's name or preset as the user asked for it
    method: Method
    budget: Budget
    granularity: str = "kv_head"  # kv_head | query_head: the heads the plan selects for and stores

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise InputError(f"granularity must be one of {', '.join(GRANULARITIES)}, got '{self.granularity}'")
        if self.granularity == "query_head" and not self.method.query_head_selection():
            raise InputError(f"{self.label} keeps the same tokens in every query head of a group: run it at "
                             "kv_head (storage_granularity picks the granularity a method runs at)")


def storage_granularity(method: Method, requested: str) -> str:
    """The granularity a plan of `method` runs at when `requested`: query_head only for methods whose query
    heads can keep different sets (Method.query_head_selection); the others give the same output at kv_head
    for 1/g of the memory, so they keep it."""
    if requested not in GRANULARITIES:
        raise InputError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got '{requested}'")
    return requested if requested == "kv_head" or method.query_head_selection() else "kv_head"


def gqa_group(model: Any) -> int:
    """g = H_q / H_kv of a model."""
    config = model.config
    return config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def score_key(method: Method, granularity: str) -> tuple | None:
    """Where the prefill observer stores a method's scores: its scorer_key, marked when scored per query head."""
    key = method.scorer_key()
    return key if key is None or granularity == "kv_head" else ("query_head", *key)


@dataclass
class Compressed:
    """One plan's cache right after compression."""

    layers: list[KeptLayer]
    decoders: dict[int, LayerDecoder] = field(default_factory=dict)
    # Per layer, the prompt positions kept right after compression; None when nothing was selected (FullKV).
    # Continuous methods may evict more while decoding; this is the prefill selection.
    selections: list[Selection] | None = None
    # Transforms after selection (ThinK, KIVI; kvbench.methods.storage): per layer, how the kept entries are
    # stored, the bytes after each stage (summed over layers), and the state they keep while decoding.
    storages: list[LayerStorage] | None = None
    stages: list[tuple[str, int]] = field(default_factory=list)
    lifecycle: Lifecycle | None = None
    kept_entries: int = 0  # (layer, head, token) entries kept, padding excluded
    stored_bytes: int = 0  # bytes of the kept entries as stored (the §1.8 formula when storage is simulated)
    simulated: bool = False  # some saving is logical (zeroed channels, fake quantization), not physical

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
        return _account(Compressed([KeptLayer.full(keys[0], values[0]) for keys, values in full]))
    key = score_key(method, plan.granularity)
    rerotator = rope.for_model(model) if method.position_mode == "contiguous" else None
    out = Compressed(layers=[], selections=[])
    previous = None
    for index, (keys, values) in enumerate(full):
        n_tokens = keys.shape[2]
        group = gqa_group(model)
        repeat = group if plan.granularity == "query_head" else 1  # stored heads per KV head
        ctx = SelectContext(
            layer=index,
            n_layers=len(full),
            n_tokens=n_tokens,
            kept=budget.kept(n_tokens),
            scores=scores[key].get(index) if key is not None else None,
            keys=keys[0].repeat_interleave(repeat, dim=0) if repeat > 1 else keys[0],
            n_kv_heads=keys.shape[1] * repeat,
            group=group // repeat,
            previous=previous,
            seed=seed,
            budget=budget,
        )
        selected = method.select(ctx)
        previous = selected
        selection = Selection.of(selected)
        kept = KeptLayer.gather(keys[0], values[0], selection, head_repeat=repeat)
        if rerotator is not None:  # contiguous positions: kept keys move to 0 .. k-1
            kept.keys = rerotator.to_contiguous(kept.keys, selection.indices.to(kept.keys.device))
        if method.stages():
            _transform(method, ctx, kept, out)
        out.layers.append(kept)
        out.selections.append(Selection(selection.indices.detach().to("cpu"), selection.lengths.detach().to("cpu")))
        if method.continuous and not budget.is_full:
            decoder = method.decoder(DecodeContext(select=ctx, kept_indices=selected))
            if decoder is not None:
                out.decoders[index] = decoder
    if out.storages is not None:
        out.lifecycle = method.lifecycle(out.storages)
    return _account(out)


def _transform(method: Method, ctx: SelectContext, kept: KeptLayer, out: Compressed) -> None:
    """select -> channel mask -> quantize on one layer's kept entries (the plan's own gathered copy, changed in
    place), logging the bytes after each stage."""
    storage = LayerStorage(kept.lengths.clone(), kept.keys.shape[-1], kept.values.shape[-1], kept.keys.element_size())
    tctx = TransformContext(layer=ctx.layer, n_layers=ctx.n_layers, keys=kept.keys, values=kept.values,
                            storage=storage, scores=ctx.scores)
    tctx.record("select")
    method.transform(tctx)
    if out.storages is None:
        out.storages, out.stages = [], [(stage, 0) for stage, _ in tctx.log]
    out.storages.append(storage)
    out.stages = [(stage, total + nbytes) for (stage, total), (_, nbytes) in zip(out.stages, tctx.log, strict=True)]


def _account(out: Compressed) -> Compressed:
    out.kept_entries = sum(int(layer.lengths.sum()) for layer in out.layers)
    if out.storages is None:
        out.stored_bytes = out.valid_bytes
    else:
        out.stored_bytes = sum(storage.nbytes() for storage in out.storages)
        out.simulated = any(storage.simulated for storage in out.storages)
    return out
