"""Prefill once with full attention while the methods' scorers observe every layer; then, for every
(method, budget) of the run, build that method's compressed cache from the full one and decode greedily
with true positions.

Prefill activations never depend on the compression (the cache is pruned after the prefill), so one
prefill serves a whole sweep; only decoding repeats. With --scope context the prefill covers the context
only and the question is fed afterwards through each compressed cache."""

from __future__ import annotations

import time
import weakref
import zlib
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvbench.engine import attention, rope
from kvbench.methods.base import Budget, DecodeContext, LayerDecoder, LayerView, Method, SelectContext
from kvbench.prompts import Prompt


@dataclass(frozen=True)
class Plan:
    """One (method, budget) to decode from a prefill."""

    label: str  # the method's name or preset as the user asked for it
    method: Method
    budget: Budget


@dataclass
class Generation:
    plan: Plan
    token_ids: list[int]
    text: str
    kept_per_layer: list[int]  # prompt tokens held per layer right after compression
    cache_bytes: int  # bytes of K and V actually held after compression (before decoding)
    full_cache_bytes: int
    decode_seconds: float
    max_cache_tokens: int  # the largest cache length any layer held between decode steps
    final_cache_tokens: list[int]
    # Per layer, the prompt positions kept right after compression ([H_kv, k] int32 on CPU); None when nothing
    # was selected (FullKV). Continuous methods may evict more while decoding; this is the prefill selection.
    kept_indices: list[torch.Tensor] | None = None


@dataclass
class SampleRun:
    n_prompt_tokens: int
    n_prefilled: int  # tokens that went through the observed prefill (the context only with --scope context)
    prefill_seconds: float
    generations: list[Generation] = field(default_factory=list)


def cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends into preallocated buffers instead of `torch.cat`-ing the whole cache at every
    step. Profiled on CPU, SmolLM2, full cache of 3.5k tokens, one thread: the cat costs ~3% of a decode step
    on a quiet core and up to half of it when other processes saturate memory bandwidth; it grows with the
    cache (scripts/BENCHMARKS.md, P2 and P4 notes).

    `keys`/`values` are views `buffer[:, :, :length]` of buffers with room for `reserve` more tokens, growing
    geometrically (x1.5) when that runs out. The values are exactly DynamicLayer's, only where they live
    differs, so attention computes the same numbers. Anything that replaces `keys`/`values` from outside
    (evictions in DecodeObserver, crop) is adopted into a fresh buffer at the next update."""

    def __init__(self, reserve: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.reserve = max(0, reserve)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None

    def _reallocate(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        """Fresh buffers for `capacity` tokens holding the current keys/values (the new states give the
        batch, head, dim, dtype and device)."""
        length = self.get_seq_length()

        def fresh(current: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            out = like.new_empty((*like.shape[:-2], capacity, like.shape[-1]))
            if length:
                out[..., :length, :].copy_(current)
            return out

        self._buffers = (fresh(self.keys, key_states), fresh(self.values, value_states))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        needed = length + key_states.shape[-2]
        owned = self._views is not None and self.keys is self._views[0] and self.values is self._views[1]
        if not owned:  # first update, or keys/values replaced from outside: adopt them
            self._reallocate(key_states, value_states, needed + self.reserve)
        elif self._buffers[0].shape[-2] < needed:  # reserve used up: grow geometrically
            self._reallocate(key_states, value_states, max(needed + self.reserve, needed * 3 // 2))
        keys, values = self._buffers
        keys[..., length:needed, :].copy_(key_states)
        values[..., length:needed, :].copy_(value_states)
        self.keys, self.values = keys[..., :needed, :], values[..., :needed, :]
        self._views = (self.keys, self.values)
        return self.keys, self.values

    def reset(self) -> None:
        self._buffers = self._views = None
        super().reset()


def make_cache(model: Any, layers: list[tuple[torch.Tensor, torch.Tensor]], reserve: int = 0) -> DynamicCache:
    """A fresh DynamicCache holding copies of these tensors ([1, H_kv, L, d] each), through the public API.
    Plain full-attention layers become GrowingLayers with room for `reserve` more tokens (the decode)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer(reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


def nbytes(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


def gather_tokens(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor [1, H_kv, L, d], indices [H_kv, k] -> new tensor [1, H_kv, k, d]."""
    index = indices.to(tensor.device)[None, :, :, None].expand(1, -1, -1, tensor.shape[-1])
    return torch.gather(tensor, 2, index).contiguous()


class PrefillObserver:
    """Computes every requested scorer once per layer during the prefill."""

    def __init__(self, methods: list[Method], n_layers: int):
        self.n_layers = n_layers
        self.scorers: dict[tuple, Method] = {}
        for method in methods:
            key = method.scorer_key()
            if key is not None:
                self.scorers.setdefault(key, method)
        self.max_window = max((m.window() for m in methods), default=0)
        self.scores: dict[tuple, dict[int, torch.Tensor | None]] = {key: {} for key in self.scorers}

    def on_attention(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        if not self.scorers:
            return
        view = LayerView(
            layer=module.layer_idx,
            n_layers=self.n_layers,
            query=query[0],
            keys=key[0],
            values=value[0],
            scaling=float(module.scaling),
            max_window=self.max_window,
        )
        for scorer_key, method in self.scorers.items():
            self.scores[scorer_key][module.layer_idx] = method.score(view)


class DecodeObserver:
    """Runs continuous methods' per-layer decoders after each attention call and evicts from the cache."""

    def __init__(
        self, cache: DynamicCache, decoders: dict[int, LayerDecoder], rerotator: rope.Rerotator | None = None
    ):
        self.cache = cache
        self.decoders = decoders
        self.rerotator = rerotator  # contiguous positions: kept keys move to their index in the cache

    def on_attention(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        decoder = self.decoders.get(module.layer_idx)
        if decoder is None:
            return
        q = query[0].float()
        keys = key[0].float()
        group = q.shape[0] // keys.shape[0]
        logits = torch.matmul(q, keys.repeat_interleave(group, dim=0).transpose(1, 2)) * float(module.scaling)
        q_len, kv_len = q.shape[1], keys.shape[1]
        if q_len > 1:
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
            logits = logits.masked_fill(~causal, float("-inf"))
        keep = decoder.step(torch.softmax(logits, dim=-1), key[0])
        if keep is not None:
            layer = self.cache.layers[module.layer_idx]
            layer.keys = gather_tokens(layer.keys, keep)
            layer.values = gather_tokens(layer.values, keep)
            if self.rerotator is not None:
                layer.keys = self.rerotator.to_contiguous(layer.keys, keep)


# One decode forward for one plan: (input_ids [1, 1], position_ids [1, 1], cache, decode observer or None).
DecodeRequest = tuple[torch.Tensor, torch.Tensor, DynamicCache, "DecodeObserver | None"]


class LayerwiseDecoder:
    """One decode step for several plans at once, layer by layer: plan after plan runs layer l while that
    layer's weights are still in the CPU cache, instead of each plan streaming all of the model's weights
    from memory once per token (profiled on CPU: matmuls are ~85% of a compressed-cache decode step; on our
    2-core machine this saved ~15% of the decode time of an 18-plan sweep, scripts/BENCHMARKS.md P1). This is
    not batching: every plan runs exactly the modules, shapes and kernels of its own `model(...)` call, so its
    tokens do not depend on which other plans share the sweep.

    It calls the model's own submodules (embeddings, rotary embedding, decoder layers, final norm, lm_head)
    the way a Llama-style `forward` does. `for_model` checks once per model that this reproduces
    `model(...)`'s logits and cache bit for bit, and returns None (plans then decode one after another) for
    any model where it does not, or that has no such structure."""

    _checked: "weakref.WeakKeyDictionary[Any, LayerwiseDecoder | None]" = weakref.WeakKeyDictionary()

    def __init__(self, model: Any):
        decoder = model.get_decoder()
        self.embed, self.rotary, self.norm = decoder.embed_tokens, decoder.rotary_emb, decoder.norm
        self.layers = list(decoder.layers)[: model.config.num_hidden_layers]
        self.head = model.lm_head

    def forward(self, requests: list[DecodeRequest]) -> tuple[list[torch.Tensor], list[float]]:
        """Next-token logits for every request, and the seconds spent on each one."""
        seconds = [0.0] * len(requests)
        hidden, embeddings = [], []
        for i, (input_ids, position_ids, _, _) in enumerate(requests):
            start = time.perf_counter()
            hidden.append(self.embed(input_ids))
            embeddings.append(self.rotary(hidden[i], position_ids=position_ids))
            seconds[i] += time.perf_counter() - start
        for layer in self.layers:
            for i, (_, position_ids, cache, observer) in enumerate(requests):
                start = time.perf_counter()
                with attention.observing(observer):
                    hidden[i] = layer(hidden[i], attention_mask=None, position_embeddings=embeddings[i],
                                      position_ids=position_ids, past_key_values=cache, use_cache=True)
                seconds[i] += time.perf_counter() - start
        logits = []
        for i, state in enumerate(hidden):
            start = time.perf_counter()
            logits.append(self.head(self.norm(state)[:, -1:, :])[0, -1])
            seconds[i] += time.perf_counter() - start
        return logits, seconds

    @classmethod
    def for_model(cls, model: Any) -> "LayerwiseDecoder | None":
        if model not in cls._checked:
            cls._checked[model] = cls._check(model)
        return cls._checked[model]

    @classmethod
    def _check(cls, model: Any) -> "LayerwiseDecoder | None":
        try:
            stepper = cls(model)
        except (AttributeError, TypeError):
            return None
        device = next(model.parameters()).device
        ids = (torch.arange(1, 17, device=device) % model.config.vocab_size)[None]
        try:
            with torch.inference_mode():
                prefill = DynamicCache(config=model.config)
                model(input_ids=ids, position_ids=torch.arange(16, device=device)[None], past_key_values=prefill,
                      use_cache=True)
                want_cache, got_cache = (make_cache(model, cache_layers(prefill), reserve=2) for _ in range(2))
                token, position = ids[:, 5:6], torch.tensor([[16]], device=device)
                want = model(input_ids=token, position_ids=position, past_key_values=want_cache, use_cache=True,
                             logits_to_keep=1).logits[0, -1]
                got = stepper.forward([(token, position, got_cache, None)])[0][0]
        except Exception:  # any structure this does not know: decode plans one after another
            return None
        same = torch.equal(want, got) and all(
            torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            for a, b in zip(want_cache.layers, got_cache.layers, strict=True))
        return stepper if same else None


def sample_seed(sample_id: str, seed: int) -> int:
    return zlib.crc32(f"{seed}:{sample_id}".encode())


@dataclass
class Engine:
    model: Any
    tokenizer: Any
    repetition_penalty: float = 1.0  # from the model's generation config, as HF generate applies it
    # CPU: decode up to this many plans together, layer by layer (LayerwiseDecoder); 1 decodes them one after
    # another. Tokens are the same either way; wall time and how many compressed caches live at once change.
    lockstep: int = 6

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def run(self, prompt: Prompt, plans: list[Plan], scope: str = "full", sample_id: str = "", seed: int = 0) -> SampleRun:
        ids = torch.tensor([prompt.ids], device=self.device)
        n_prompt = ids.shape[1]
        split = n_prompt if scope == "full" else max(1, min(prompt.question_start, n_prompt))
        observer = PrefillObserver([p.method for p in plans], self.n_layers)
        cache = DynamicCache(config=self.model.config)
        start = time.perf_counter()
        with attention.observing(observer):
            out = self.model(
                input_ids=ids[:, :split],
                position_ids=torch.arange(split, device=self.device)[None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self._sync()
        run = SampleRun(n_prompt_tokens=n_prompt, n_prefilled=split, prefill_seconds=time.perf_counter() - start)
        full = cache_layers(cache)
        first_logits = out.logits[0, -1] if split == n_prompt else None
        seed = sample_seed(sample_id, seed)
        stepper = None
        if self.lockstep > 1 and len(plans) > 1 and prompt.max_new_tokens > 1 and self.device.type == "cpu":
            stepper = LayerwiseDecoder.for_model(self.model)
        if stepper is None:
            for plan in plans:
                run.generations.append(self._generate(plan, prompt, ids, split, full, observer, first_logits, seed))
            return run
        for group in self._lockstep_groups(plans, split):
            steps = [self._decode(plan, prompt, ids, split, full, observer, first_logits, seed) for plan in group]
            run.generations.extend(self._drive_lockstep(steps, stepper))
        return run

    def _lockstep_groups(self, plans: list[Plan], n_tokens: int) -> list[list[Plan]]:
        """Consecutive plans, at most `lockstep` per group and, so that memory stays bounded, compressed caches
        adding up to at most twice the full prompt cache (sequential decoding holds at most one)."""
        groups: list[list[Plan]] = []
        load = 0.0
        for plan in plans:
            share = plan.budget.kept(n_tokens) / n_tokens
            if not groups or len(groups[-1]) >= self.lockstep or load + share > 2.0:
                groups.append([])
                load = 0.0
            groups[-1].append(plan)
            load += share
        return groups

    def _drive_lockstep(self, group: list[Generator], stepper: LayerwiseDecoder) -> list[Generation]:
        """Drive several plans' decodes, one LayerwiseDecoder step for all unfinished ones at a time. Each
        plan's decode_seconds is its own compute, not the time it spent waiting for the others."""
        results: list[Generation | None] = [None] * len(group)
        busy = [0.0] * len(group)
        pending: dict[int, DecodeRequest] = {}

        def advance(index: int, logits: torch.Tensor | None) -> None:
            start = time.perf_counter()
            try:
                pending[index] = next(group[index]) if logits is None else group[index].send(logits)
            except StopIteration as done:
                results[index] = done.value
                pending.pop(index, None)
            busy[index] += time.perf_counter() - start

        for index in range(len(group)):
            advance(index, None)
        while pending:
            order = list(pending)
            logits, seconds = stepper.forward([pending[i] for i in order])
            for index, row, spent in zip(order, logits, seconds):
                busy[index] += spent
                advance(index, row)
        for generation, spent in zip(results, busy):
            generation.decode_seconds = spent
        return results  # type: ignore[return-value]

    def _compress(
        self, plan: Plan, full: list[tuple[torch.Tensor, torch.Tensor]], observer: PrefillObserver, seed: int,
        kept_out: list[torch.Tensor] | None = None,
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[int, LayerDecoder]]:
        method, budget = plan.method, plan.budget
        scorer_key = method.scorer_key()
        layers, decoders = [], {}
        previous = None
        rerotator = rope.for_model(self.model) if method.position_mode == "contiguous" else None
        for index, (keys, values) in enumerate(full):
            n_tokens = keys.shape[2]
            ctx = SelectContext(
                layer=index,
                n_layers=len(full),
                n_tokens=n_tokens,
                kept=budget.kept(n_tokens),
                scores=observer.scores[scorer_key].get(index) if scorer_key is not None else None,
                keys=keys[0],
                n_kv_heads=keys.shape[1],
                group=self.model.config.num_attention_heads // keys.shape[1],
                previous=previous,
                seed=seed,
            )
            keep = method.select(ctx)
            previous = keep
            if kept_out is not None:  # evidence retention and cross-layer overlap (kvbench.evidence)
                kept_out.append(keep.detach().to("cpu", torch.int32))
            kept_keys = gather_tokens(keys, keep)
            if rerotator is not None:  # contiguous positions: kept keys move to 0 .. k-1
                kept_keys = rerotator.to_contiguous(kept_keys, keep)
            layers.append((kept_keys, gather_tokens(values, keep)))
            if method.continuous and not budget.is_full:
                decoder = method.decoder(DecodeContext(select=ctx, kept_indices=keep))
                if decoder is not None:
                    decoders[index] = decoder
        return layers, decoders

    def _generate(
        self,
        plan: Plan,
        prompt: Prompt,
        ids: torch.Tensor,
        split: int,
        full: list[tuple[torch.Tensor, torch.Tensor]],
        observer: PrefillObserver,
        first_logits: torch.Tensor | None,
        seed: int,
    ) -> Generation:
        """One plan's compression and greedy decode, its forwards through `model(...)`."""
        steps = self._decode(plan, prompt, ids, split, full, observer, first_logits, seed)
        try:
            request = next(steps)
            while True:
                input_ids, position_ids, cache, decode_observer = request
                with attention.observing(decode_observer):
                    out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache,
                                     use_cache=True, logits_to_keep=1)
                request = steps.send(out.logits[0, -1])
        except StopIteration as done:
            return done.value

    def _decode(
        self,
        plan: Plan,
        prompt: Prompt,
        ids: torch.Tensor,
        split: int,
        full: list[tuple[torch.Tensor, torch.Tensor]],
        observer: PrefillObserver,
        first_logits: torch.Tensor | None,
        seed: int,
    ) -> Generator[DecodeRequest, torch.Tensor, Generation]:
        """Compression and greedy decode of one plan as a generator: it yields each single-token forward it
        needs (DecodeRequest) and is sent back that forward's next-token logits; returns the Generation."""
        start = time.perf_counter()
        kept_indices: list[torch.Tensor] | None = None
        if plan.method.name == "fullkv":
            layers, decoders = full, {}
        else:
            kept_indices = []
            layers, decoders = self._compress(plan, full, observer, seed, kept_indices)
        kept = [k.shape[2] for k, _ in layers]
        held = nbytes(layers)
        n_prompt = ids.shape[1]
        # Room for everything decoding appends (the question with --scope context, then the answer).
        cache = make_cache(self.model, layers, reserve=n_prompt - split + prompt.max_new_tokens)
        contiguous = plan.method.position_mode == "contiguous"
        rerotator = rope.for_model(self.model) if contiguous and decoders else None
        decode_observer = DecodeObserver(cache, decoders, rerotator) if decoders else None

        def position() -> int:
            # Original mode: new tokens continue from the uncompressed length. Contiguous (StreamingLLM's
            # faithful mode): the next position is the number of tokens the cache holds.
            return cache.layers[0].keys.shape[2] if contiguous else n_seen

        n_seen = split
        logits = first_logits
        if logits is None:  # --scope context: feed the question through the compressed cache
            question = ids[:, split:]
            base = position()
            positions = torch.arange(base, base + question.shape[1], device=self.device)[None]
            with attention.observing(decode_observer):
                logits = self.model(
                    input_ids=question, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1
                ).logits[0, -1]
            n_seen = n_prompt
        history = ids[0].tolist()
        stops = torch.tensor(sorted(prompt.stop_ids), device=self.device, dtype=torch.long)
        generated: list[int] = []
        max_cache = max(k.shape[2] for k, _ in layers)
        for step in range(prompt.max_new_tokens):
            logits = self._penalise(logits.float(), history)
            if step == 0 and stops.numel():
                logits = logits.clone()
                logits[stops] = float("-inf")  # LongBench's min_length = prompt + 1: no empty answers
            token = int(torch.argmax(logits))
            generated.append(token)
            history.append(token)
            if token in prompt.stop_ids or step == prompt.max_new_tokens - 1:
                break
            logits = yield (torch.tensor([[token]], device=self.device),
                            torch.tensor([[position()]], device=self.device), cache, decode_observer)
            n_seen += 1
            max_cache = max(max_cache, max(layer.keys.shape[2] for layer in cache.layers))
        self._sync()
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        return Generation(
            plan=plan,
            token_ids=generated,
            text=text,
            kept_per_layer=kept,
            cache_bytes=held,
            full_cache_bytes=nbytes(full),
            decode_seconds=time.perf_counter() - start,
            max_cache_tokens=max_cache,
            final_cache_tokens=[layer.keys.shape[2] for layer in cache.layers],
            kept_indices=kept_indices,
        )

    def _penalise(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        """HF's RepetitionPenaltyLogitsProcessor, which LongBench's generate() applies when the model's
        generation config sets repetition_penalty (Qwen2-Instruct ships 1.05)."""
        if self.repetition_penalty == 1.0:
            return logits
        index = torch.tensor(history, device=logits.device)
        picked = logits.gather(0, index)
        picked = torch.where(picked < 0, picked * self.repetition_penalty, picked / self.repetition_penalty)
        return logits.scatter(0, index, picked)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
