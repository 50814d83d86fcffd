"""The observed prefill: one full-attention forward over the prompt (or over chunks of it), during which every
requested scorer sees each layer once, through kvbench's attention function.

Prefill activations never depend on the compression (the cache is pruned after the prefill), so one prefill
serves every (method, budget) of a sweep.

Chunked prefill (`chunk > 0`, for 32k-128k prompts): the prompt goes through the model in pieces of `chunk`
tokens, each attending to everything before it (kvbench's bottom-right causal mask), so the cache at the end
is the full prompt's. Scorers still see what they need:
- window scorers (SnapKV, PyramidKV, ChunkKV, TOVA, ...) need the last `window` queries: the observer keeps the
  last `max_window` queries of every layer across chunk boundaries;
- column sums (H2O, ObservedAttention) need every query: they are accumulated chunk by chunk, each chunk's
  causal softmax rows summed over its queries (the same blocks as an unchunked prefill inside each chunk, so
  they equal the unchunked sums up to float32 rounding);
- a method that needs every query itself (`prefill_needs` holds "all_queries") is refused with chunking.
A chunked prefill computes the same attention in a different order, so its activations equal the unchunked
ones only up to rounding: the chunk size is part of the protocol fingerprint.

Scorers of query_head plans (methods-2 §1.6) see a view whose keys and values are repeated to H_q heads:
every scorer then returns per-query-head scores (its group reduction runs over groups of one), without a
line of method code knowing about granularity.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from kvbench.engine import attention, rope
from kvbench.engine.compress import score_key
from kvbench.errors import InputError
from kvbench.methods.base import LayerView, Method


class PrefillObserver:
    """Computes every requested scorer once per layer during the prefill."""

    def __init__(self, methods: list[Method], n_layers: int, chunked: bool = False, model: Any = None,
                 granularities: list[str] | None = None):
        self.n_layers = n_layers
        # [methods1] LayerView.module / .rope (CriticalKV's o_proj, Expected Attention's RoPE): the model's rotary
        # embedding is looked up only when a method asks
        self.rope = None if model is None else (lambda: rope.for_model(model))
        self.scorers: dict[tuple, Method] = {}
        self.query_head: set[tuple] = set()  # keys of the scorers that see the query-head view
        for method, granularity in zip(methods, granularities or ["kv_head"] * len(methods)):
            key = score_key(method, granularity)
            if key is not None:
                self.scorers.setdefault(key, method)
                if granularity == "query_head":
                    self.query_head.add(key)
        self.max_window = max((m.window() for m in methods), default=0)
        self.scores: dict[tuple, dict[int, torch.Tensor | None]] = {key: {} for key in self.scorers}
        needs = set().union(*(m.prefill_needs() for m in self.scorers.values())) if self.scorers else set()
        self.chunked = chunked
        self.final = True  # is this forward the last (or only) piece of the prompt?
        self.needs_column_sums = "column_sums" in needs
        if chunked and "all_queries" in needs:
            names = sorted(m.name for m in self.scorers.values() if "all_queries" in m.prefill_needs())
            raise InputError(f"{', '.join(names)} score(s) from every prefill query; drop --prefill-chunk")
        self._column_sums: dict[int, torch.Tensor] = {}  # per layer, accumulated over earlier chunks
        self._tail: dict[int, torch.Tensor] = {}  # per layer, the last max_window queries of earlier chunks

    @property
    def wants_lse(self) -> bool:
        """Column sums are cheaper with the attention kernel's log-sum-exp (kvbench.engine.attention)."""
        return self.needs_column_sums

    def on_attention(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     lse: torch.Tensor | None = None) -> None:
        if not self.scorers:
            return
        layer = module.layer_idx
        view = LayerView(
            layer=layer,
            n_layers=self.n_layers,
            query=query[0],
            keys=key[0],
            values=value[0],
            scaling=float(module.scaling),
            max_window=self.max_window,
            lse=lse[0] if lse is not None else None,
            module=module, rope=self.rope,  # [methods1]
        )
        if not self.chunked:
            self._score(layer, view)
            return
        sums = self._accumulate(layer, view) if self.needs_column_sums else None
        queries = query[0] if layer not in self._tail else torch.cat([self._tail[layer], query[0]], dim=1)
        if not self.final:
            if self.max_window:
                self._tail[layer] = queries[:, -self.max_window:].clone()
            return
        view = LayerView(
            layer=layer,
            n_layers=self.n_layers,
            query=queries,
            keys=key[0],
            values=value[0],
            scaling=float(module.scaling),
            max_window=self.max_window,
            partial_queries=True,
            module=module, rope=self.rope,  # [methods1]
        )
        if sums is not None:
            view.seed_column_sums(sums)
        self._score(layer, view)
        self._tail.pop(layer, None)
        self._column_sums.pop(layer, None)

    def _accumulate(self, layer: int, chunk_view: LayerView) -> torch.Tensor:
        """This chunk's column sums added to the earlier chunks' ([H_q, T so far])."""
        sums = chunk_view.column_sums()
        earlier = self._column_sums.get(layer)
        if earlier is not None:
            sums = sums.clone()
            sums[:, : earlier.shape[1]] += earlier
        self._column_sums[layer] = sums
        return sums

    def _score(self, layer: int, view: LayerView) -> None:
        repeated = None
        for key, method in self.scorers.items():
            if key in self.query_head and view.group > 1:
                if repeated is None:
                    repeated = query_head_view(view)
                self.scores[key][layer] = method.score(repeated)
            else:
                self.scores[key][layer] = method.score(view)


def query_head_view(view: LayerView) -> LayerView:
    """The same layer with its keys and values repeated to one head per query head (h reads KV head h // g)."""
    g = view.group
    out = LayerView(layer=view.layer, n_layers=view.n_layers, query=view.query,
                    keys=view.keys.repeat_interleave(g, dim=0), values=view.values.repeat_interleave(g, dim=0),
                    scaling=view.scaling, max_window=view.max_window, partial_queries=view.partial_queries,
                    lse=view.lse, module=view.module, rope=view.rope)
    if "colsum" in view._cache:  # accumulated over a chunked prefill: per query head already
        out.seed_column_sums(view._cache["colsum"])
    return out


def prefill(model: Any, ids: torch.Tensor, observer: PrefillObserver, chunk: int = 0) -> tuple[DynamicCache, Any]:
    """Run ids [1, T] through the model with true positions 0..T-1 (in chunks of `chunk` tokens when > 0),
    observed; returns the full cache and the last forward's output (its logits are the next token's)."""
    n = ids.shape[1]
    cache = DynamicCache(config=model.config)
    starts = list(range(0, n, chunk)) if chunk and chunk < n else [0]
    out = None
    with attention.observing(observer):
        for i, start in enumerate(starts):
            stop = starts[i + 1] if i + 1 < len(starts) else n
            observer.final = stop == n
            out = model(
                input_ids=ids[:, start:stop],
                position_ids=torch.arange(start, stop, device=ids.device)[None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
    return cache, out
