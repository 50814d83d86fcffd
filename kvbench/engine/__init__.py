"""The engine: prefill once with full attention while the methods' scorers observe every layer; then, for
every (method, budget) of the run, build that method's compressed cache from the full one and decode greedily.

Prefill activations never depend on the compression (the cache is pruned after the prefill), so one prefill
serves a whole sweep; only decoding repeats, and plans decode together (`batched`: one forward per token for a
group of plans) or one after another (`sequential`). With --scope context the prefill covers the context
only and the question is fed afterwards through each compressed cache.

Modules: prefill.py (the observed, optionally chunked prefill), compress.py (selection and gathering),
cache.py (the ragged decode cache), decode.py (greedy decoding of a group of plans), attention.py (the
registered attention function), rope.py (re-rotating kept keys)."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from kvbench.engine import attention, rope  # noqa: F401  (public submodules)
from kvbench.engine.cache import KeptLayer, RaggedCache
from kvbench.engine.compress import GRANULARITIES, Compressed, Plan, compress, full_layers, gqa_group, storage_granularity
from kvbench.engine.decode import DECODE_MODES, DecodeSettings, PlanDecode, decode_group
from kvbench.engine.prefill import PrefillObserver, prefill
from kvbench.errors import InputError
from kvbench.methods.base import Selection
from kvbench.prompts import Prompt

__all__ = [
    "DECODE_MODES", "GRANULARITIES", "Engine", "Generation", "KeptLayer", "Plan", "PrefillObserver", "RaggedCache",
    "SampleRun", "cache_layers", "gather_tokens", "make_cache", "sample_seed", "storage_granularity",
]


@dataclass
class Generation:
    plan: Plan
    token_ids: list[int]
    text: str
    kept_per_layer: list[float]  # per layer, tokens a head keeps right after compression (mean over heads)
    # Bytes of the K/V entries kept after compression (before decoding), as stored: with transforms after
    # selection whose storage is simulated (zeroed channels, fake quantization) the packed layout's bytes
    # (methods-2.md §1.8, kvbench.methods.storage), never the masked buffers'.
    cache_bytes: int
    cache_bytes_allocated: int  # bytes of this plan's decode buffers: padding of shorter heads and room reserved
    full_cache_bytes: int
    decode_seconds: float  # compression + this plan's share of the decode forwards it took part in
    max_cache_tokens: int  # the largest number of tokens any layer and head held between decode steps
    final_cache_tokens: list[int]
    decode: str  # "batched" or "sequential"
    # Per layer, the prompt positions kept right after compression; None when nothing was selected (FullKV).
    # Continuous methods may evict more while decoding; this is the prefill selection.
    kept_indices: list[Selection] | None = None
    kept_entries: int = 0  # (layer, KV head, token) entries kept after compression, padding excluded
    storage: str = "physical"  # "simulated" when cache_bytes comes from the formula, not the buffers
    stages: list[tuple[str, int]] | None = None  # transforms after selection: (stage, bytes after it)


@dataclass
class SampleRun:
    n_prompt_tokens: int
    n_prefilled: int  # tokens that went through the observed prefill (the context only with --scope context)
    prefill_seconds: float
    peak_memory_bytes: int | None = None  # the device's peak allocation over this sample (CUDA only)
    generations: list[Generation] = field(default_factory=list)


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return full_layers(cache)


def make_cache(model: Any, layers: list[tuple[torch.Tensor, torch.Tensor]], reserve: int = 0) -> RaggedCache:
    """A decode cache of one plan holding copies of these tensors ([1, H_kv, L, d] each)."""
    return RaggedCache([[KeptLayer.full(keys[0], values[0]) for keys, values in layers]], reserve=reserve)


def nbytes(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


def gather_tokens(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor [1, H_kv, L, d], indices [H_kv, k] -> new tensor [1, H_kv, k, d]."""
    index = indices.to(tensor.device)[None, :, :, None].expand(1, -1, -1, tensor.shape[-1])
    return torch.gather(tensor, 2, index).contiguous()


def sample_seed(sample_id: str, seed: int) -> int:
    return zlib.crc32(f"{seed}:{sample_id}".encode())


@dataclass
class Engine:
    model: Any
    tokenizer: Any
    repetition_penalty: float = 1.0  # from the model's generation config, as HF generate applies it
    decode: str = "batched"  # "batched": plans of a sample share each forward; "sequential": one plan at a time
    prefill_chunk: int = 0  # > 0: prefill in chunks of this many tokens (long prompts)
    # Batched decoding: at most this many plans per forward, and a group's caches (padding and room for the
    # answer included) hold at most `group_memory` times the full prompt cache; on CUDA also at most half of
    # the memory free when decoding starts.
    max_batch: int = 32
    group_memory: float = 6.0
    on_logits: Any = None  # (plan, step, logits) -> None before each greedy choice (measurements only)

    def __post_init__(self) -> None:
        if self.decode not in DECODE_MODES:
            raise InputError(f"decode must be one of {', '.join(DECODE_MODES)}, got '{self.decode}'")
        if self.prefill_chunk < 0:
            raise InputError(f"prefill_chunk must be >= 0, got {self.prefill_chunk}")

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def run(self, prompt: Prompt, plans: list[Plan], scope: str = "full", sample_id: str = "", seed: int = 0) -> SampleRun:
        device = self.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ids = torch.tensor([prompt.ids], device=device)
        n_prompt = ids.shape[1]
        split = n_prompt if scope == "full" else max(1, min(prompt.question_start, n_prompt))
        observer = PrefillObserver([p.method for p in plans], self.n_layers, chunked=0 < self.prefill_chunk < split,
                                   model=self.model,  # [methods1] model: LayerView.rope
                                   granularities=[p.granularity for p in plans])
        start = time.perf_counter()
        cache, out = prefill(self.model, ids[:, :split], observer, self.prefill_chunk)
        self._sync()
        run = SampleRun(n_prompt_tokens=n_prompt, n_prefilled=split, prefill_seconds=time.perf_counter() - start)
        full = full_layers(cache)
        full_bytes = nbytes(full)
        first_logits = out.logits[0, -1] if split == n_prompt else None
        question = ids[:, split:] if split < n_prompt else None
        seed = sample_seed(sample_id, seed)
        settings = DecodeSettings(prompt.max_new_tokens, prompt.stop_ids, self.repetition_penalty, device,
                                  self.on_logits)
        reserve = n_prompt - split + prompt.max_new_tokens  # room for the question (scope context) and the answer
        results: dict[int, Generation] = {}
        for group in self._groups(plans, split, full_bytes, reserve):
            decodes = []
            for index in group:
                begin = time.perf_counter()
                compressed = compress(self.model, plans[index], full, observer.scores, seed)
                decodes.append(PlanDecode(plans[index], compressed, n_seen=split,
                                          seconds=time.perf_counter() - begin))
            kept = [(d.compressed.kept_per_layer, d.compressed.stored_bytes, d.compressed.selections) for d in decodes]
            decode_group(self.model, decodes, list(prompt.ids), question, first_logits, settings, reserve)
            self._sync()
            for index, done, (per_layer, stored, selections) in zip(group, decodes, kept):
                results[index] = Generation(
                    plan=done.plan,
                    token_ids=done.generated,
                    text=self.tokenizer.decode(done.generated, skip_special_tokens=True),
                    kept_per_layer=per_layer,
                    cache_bytes=stored,
                    cache_bytes_allocated=done.allocated_bytes,
                    full_cache_bytes=full_bytes,
                    decode_seconds=done.seconds,
                    max_cache_tokens=done.max_cache,
                    final_cache_tokens=done.final_cache_tokens,
                    decode=self.decode,
                    kept_indices=selections,
                    kept_entries=done.compressed.kept_entries,
                    storage="simulated" if done.compressed.simulated else "physical",
                    stages=done.compressed.stages or None,
                )
        run.generations = [results[i] for i in range(len(plans))]
        if device.type == "cuda":
            run.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
        return run

    def _groups(self, plans: list[Plan], n_tokens: int, full_bytes: int, reserve: int) -> list[list[int]]:
        """Plan indices grouped for decoding. Sequential: one plan per group, in order. Batched: plans sorted by
        the share of the prompt they keep, cut into groups of at most `max_batch` whose padded caches stay
        within the memory bound (a group of one is always allowed). A group's plans store the same heads
        (kv_head and query_head plans never share a cache); shares count KV-head token slots, so a
        query_head plan weighs g times its kept tokens."""
        if self.decode == "sequential":
            return [[i] for i in range(len(plans))]
        group = gqa_group(self.model)
        heads = [group if p.granularity == "query_head" else 1 for p in plans]
        share = [(min(n_tokens, p.budget.kept(n_tokens)) if p.method.uses_budget else n_tokens) * heads[i]
                 for i, p in enumerate(plans)]
        limit_tokens = self.group_memory * n_tokens
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            per_token = full_bytes / max(1, n_tokens)
            limit_tokens = min(limit_tokens, 0.5 * free / per_token)
        groups: list[list[int]] = []
        for i in sorted(range(len(plans)), key=lambda i: (heads[i], share[i], i)):
            if groups and heads[groups[-1][0]] == heads[i]:
                widest = max(share[j] for j in groups[-1] + [i]) + reserve * heads[i]
                if len(groups[-1]) < self.max_batch and (len(groups[-1]) + 1) * widest <= limit_tokens:
                    groups[-1].append(i)
                    continue
            groups.append([i])
        return groups

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
