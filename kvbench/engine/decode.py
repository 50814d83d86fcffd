"""Greedy decoding of plans that share one prefill: one forward per generated token for a whole group of plans
(`batched`), or for one plan at a time (`sequential`, a group of one).

Every plan keeps its own positions (true, or contiguous as its method says), its own stop, `min_length` and
repetition-penalty bookkeeping, and its own continuous eviction (the decoders of h2o, tova, scissorhands,
streamingllm, sliding run on the plan's own rows after each attention call). A plan leaves the batch at its
stop token; its rows are dropped from the cache.

A plan decoded alone (a group of one) runs exactly the forwards `model.generate` would run on its kept
entries, so `sequential` reproduces a single row bit for bit. A batched forward computes the same
mathematics with batched matmuls and padded, masked caches, which can differ in the last bits; rows record
which mode produced them (`decode`), and the mode is part of the protocol fingerprint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import torch

from kvbench.engine import attention, rope
from kvbench.engine.cache import RaggedCache
from kvbench.engine.compress import Compressed, Plan, gqa_group
from kvbench.methods.base import DecodeStep, LayerDecoder, Selection

DECODE_MODES = ("batched", "sequential")


@dataclass
class PlanDecode:
    """One plan being decoded: its compressed cache before decoding, and its bookkeeping while it decodes."""

    plan: Plan
    compressed: Compressed
    n_seen: int  # tokens the model has seen (prompt positions included): the next original position
    seconds: float = 0.0  # compression + this plan's share of the decode forwards
    generated: list[int] = field(default_factory=list)
    max_cache: int = 0
    allocated_bytes: int = 0
    final_cache_tokens: list[int] = field(default_factory=list)

    @property
    def contiguous(self) -> bool:
        return self.plan.method.position_mode == "contiguous"


class DecodeObserver:
    """Runs continuous methods' per-layer decoders after each attention call, on each plan's own rows, and
    evicts from the cache. `slots[row]` holds the decoders of the plan in that row of the cache."""

    def __init__(self, cache: RaggedCache, slots: list[dict[int, LayerDecoder]],
                 rerotators: list[rope.Rerotator | None], model: Any = None):
        self.cache, self.slots, self.rerotators = cache, slots, rerotators
        self.rope = None if model is None else (lambda: rope.for_model(model))  # for decoders that re-rotate

    def keep_rows(self, rows: list[int]) -> None:
        self.slots = [self.slots[i] for i in rows]
        self.rerotators = [self.rerotators[i] for i in rows]

    @property
    def active(self) -> bool:
        return any(self.slots)

    def on_attention(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        layer_index = module.layer_idx
        for row, decoders in enumerate(self.slots):
            decoder = decoders.get(layer_index)
            if decoder is None:
                continue
            layer = self.cache.layers[layer_index]
            lengths = layer.lengths[row]
            length = int(lengths[0])
            if not bool((lengths == length).all()):
                raise RuntimeError("continuous eviction needs one cache length per layer")
            keys = key[row, :, :length]
            step = DecodeStep(query[row], keys, value[row, :, :length], float(module.scaling), self.rope)
            keep = decoder.on_step(step)
            if keep is None:
                continue
            selection = Selection.of(keep)
            index = selection.indices.to(keys.device)[:, :, None]
            kept_keys = torch.gather(keys, 1, index.expand(-1, -1, keys.shape[-1]))
            kept_values = torch.gather(value[row, :, :length], 1, index.expand(-1, -1, value.shape[-1]))
            rerotator = self.rerotators[row]
            if rerotator is not None:  # contiguous positions: kept keys move to their index in the cache
                kept_keys = rerotator.to_contiguous(kept_keys, index[:, :, 0])
            layer.set_plan(row, kept_keys, kept_values, selection.lengths.to("cpu"))


class Picker:
    """Greedy choice for a batch of plans, after HF's repetition penalty (RepetitionPenaltyLogitsProcessor,
    which LongBench's generate() applies when the model's generation config sets repetition_penalty; Qwen2-Instruct
    ships 1.05): every token a plan has seen (prompt and answer so far) has its logit divided by the penalty,
    or multiplied when negative. HF gathers the logits of the history, changes them and scatters them back;
    a mask of seen tokens changes exactly the same elements with the same operations. The first token may not
    be a stop (LongBench's min_length = prompt + 1: no empty answers). One host sync per step, for the batch."""

    def __init__(self, prompt_ids: list[int], n_plans: int, vocab: int, settings: "DecodeSettings"):
        self.penalty = settings.repetition_penalty
        self.stops = torch.tensor(sorted(settings.stop_ids), device=settings.device, dtype=torch.long)
        self.seen = None
        if self.penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=settings.device)
            seen[torch.tensor(prompt_ids, device=settings.device, dtype=torch.long)] = True
            self.seen = seen.expand(n_plans, vocab).clone()

    def keep_rows(self, rows: list[int]) -> None:
        if self.seen is not None:
            self.seen = self.seen[torch.tensor(rows, device=self.seen.device)]

    def pick(self, logits: torch.Tensor, first: bool) -> list[int]:
        """logits [A, V] of the active plans (in row order) -> their next tokens."""
        logits = logits.float()
        if self.seen is not None:
            penalised = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
            logits = torch.where(self.seen, penalised, logits)
        if first and self.stops.numel():
            logits = logits.clone()
            logits[:, self.stops] = float("-inf")
        tokens = torch.argmax(logits, dim=-1)
        if self.seen is not None:
            self.seen[torch.arange(tokens.shape[0], device=tokens.device), tokens] = True
        return tokens.tolist()


@dataclass
class DecodeSettings:
    max_new_tokens: int
    stop_ids: frozenset[int]
    repetition_penalty: float
    device: torch.device
    # Called with (plan, step, next-token logits [V]) before each choice (measurements, e.g. scripts/bench.py P6).
    on_logits: Callable[[Plan, int, torch.Tensor], None] | None = None


def decode_group(model: Any, runs: list[PlanDecode], prompt_ids: list[int], question: torch.Tensor | None,
                 first_logits: torch.Tensor | None, settings: DecodeSettings, reserve: int) -> None:
    """Decode every plan of `runs` together, one forward per token for all unfinished plans. Exactly one of
    `question` (ids [1, q] fed through the compressed caches first: --scope context) and `first_logits` (the
    prefill's next-token logits: --scope full) is given. Fills each run's generated ids and bookkeeping."""
    device = settings.device
    query_heads = {run.plan.granularity == "query_head" for run in runs}
    if len(query_heads) > 1:
        raise ValueError("a decode group mixes kv_head and query_head plans")
    # A query_head cache stores H_q heads: every new token's K/V arrive with H_kv heads and are repeated.
    repeat = gqa_group(model) if query_heads.pop() else 1
    cache = RaggedCache([run.compressed.layers for run in runs], reserve=reserve, head_repeat=repeat)
    for row, run in enumerate(runs):
        run.allocated_bytes = cache.allocated_bytes(row)
        run.max_cache = cache.max_length(row)
        run.compressed.layers = []  # the cache holds its own copy now
    rerotators = [rope.for_model(model) if run.contiguous and run.compressed.decoders else None for run in runs]
    observer = DecodeObserver(cache, [run.compressed.decoders for run in runs], rerotators, model)
    active = list(range(len(runs)))

    def position(row: int, run: PlanDecode) -> int:
        # Original mode: new tokens continue from the uncompressed length. Contiguous (StreamingLLM's faithful
        # mode): the next position is the number of tokens the plan's cache holds.
        return int(cache.layers[0].lengths[row].max()) if run.contiguous else run.n_seen

    def forward(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        with attention.decoding(cache), attention.observing(observer if observer.active else None):
            logits = model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True,
                           logits_to_keep=1).logits[:, -1]
        for row, index in enumerate(active):  # transforms that keep working while decoding (KIVI)
            lifecycle = runs[index].compressed.lifecycle
            if lifecycle is not None:
                for number, layer in enumerate(cache.layers):
                    keys, values, lengths = layer.plan_entries(row)
                    lifecycle.after_forward(number, keys, values, lengths)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        share = (time.perf_counter() - start) / len(active)
        for index in active:
            runs[index].seconds += share
        return logits

    if first_logits is None:  # --scope context: feed the question through every compressed cache
        q_len = question.shape[1]
        positions = torch.stack([torch.arange(position(row, runs[i]), position(row, runs[i]) + q_len, device=device)
                                 for row, i in enumerate(active)])
        logits = forward(question.expand(len(active), -1), positions)
        for i in active:
            runs[i].n_seen += q_len
    else:
        logits = first_logits[None].expand(len(active), -1)
    picker = Picker(prompt_ids, len(active), logits.shape[-1], settings)
    for step in range(settings.max_new_tokens):
        if settings.on_logits is not None:
            for row, i in enumerate(active):
                settings.on_logits(runs[i].plan, step, logits[row])
        start = time.perf_counter()
        tokens = picker.pick(logits, first=step == 0)
        share = (time.perf_counter() - start) / len(active)
        going: list[int] = []
        for row, (i, token) in enumerate(zip(active, tokens)):
            run = runs[i]
            run.seconds += share
            run.generated.append(token)
            if token not in settings.stop_ids and step < settings.max_new_tokens - 1:
                going.append(row)
            else:
                run.final_cache_tokens = cache.lengths(row)
        if len(going) < len(active):
            active = [active[row] for row in going]
            if not active:
                break
            cache.keep_plans(going)
            observer.keep_rows(going)
            picker.keep_rows(going)
        ids = torch.tensor([[runs[i].generated[-1]] for i in active], device=device)
        positions = torch.tensor([[position(row, runs[i])] for row, i in enumerate(active)], device=device)
        logits = forward(ids, positions)
        for row, i in enumerate(active):
            runs[i].n_seen += 1
            runs[i].max_cache = max(runs[i].max_cache, cache.max_length(row))
