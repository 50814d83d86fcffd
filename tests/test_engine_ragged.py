"""The ragged decode cache and batched decoding, on tiny seeded float64 models.

- A head-ragged selection (a different number of kept tokens per KV head) decodes exactly like the same kept
  sets held as real per-head tensors: the reference stores one tensor per head and attends head by head in
  its own attention function (no padding, no mask), so it shares nothing with kvbench's cache but the model.
- Batched decoding (plans of a sample share each forward, padded and masked) gives the same tokens as
  decoding each plan alone, for every kind of plan: uneven layers, contiguous positions, continuous eviction,
  stop tokens that end plans at different steps, --scope context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import EOS_ID, make_tiny_llama
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from kvbench.engine import Engine, Plan, attention
from kvbench.engine.cache import KeptLayer, RaggedCache
from kvbench.methods import build
from kvbench.methods.base import Budget, Method, Selection, SelectContext, topk_sorted
from kvbench.prompts import Prompt

T = 40


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model64():
    return make_tiny_llama(layers=2, seed=3).to(torch.float64)


def prompt_ids(n: int = T, seed: int = 5) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def ragged_selection(n_tokens: int, lengths: list[int], seed: int) -> Selection:
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(n_tokens, generator=gen)[:k].sort().values for k in lengths]
    return Selection.from_rows(rows)


@dataclass
class RaggedTest(Method):
    """A test method keeping a different number of top-norm keys per KV head (head h keeps kept * (h + 1) / H)."""

    name: ClassVar[str] = "ragged_test"

    def select(self, ctx: SelectContext) -> Selection:
        norms = ctx.keys.float().norm(dim=-1)
        rows = [topk_sorted(norms[h][None], max(1, ctx.kept * (h + 1) // ctx.n_kv_heads))[0]
                for h in range(ctx.n_kv_heads)]
        return Selection.from_rows(rows)


# ---- the reference: real per-head tensors, attended head by head ---------------------------------------------
class PerHeadLayer(DynamicLayer):
    """Keeps one [n_h, d] key and value tensor per KV head; update returns the per-head lists."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        super().__init__()
        self.head_keys, self.head_values = keys, values
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        for h in range(len(self.head_keys)):
            self.head_keys[h] = torch.cat([self.head_keys[h], key_states[0, h]])
            self.head_values[h] = torch.cat([self.head_values[h], value_states[0, h]])
        return self.head_keys, self.head_values

    def get_seq_length(self) -> int:
        return max(k.shape[0] for k in self.head_keys)


def per_head_attention(module, query, keys, values, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query [1, H_q, q, d]; keys/values: one [n_h, d] tensor per KV head. Causal among the q newest."""
    outs = []
    group = query.shape[1] // len(keys)
    q_len = query.shape[2]
    for h_q in range(query.shape[1]):
        k, v = keys[h_q // group], values[h_q // group]
        logits = query[0, h_q] @ k.T * scaling
        n = k.shape[0]
        causal = torch.ones(q_len, n, dtype=torch.bool).tril(n - q_len)
        outs.append(torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1) @ v)
    return torch.stack(outs)[None].transpose(1, 2).contiguous(), None


AttentionInterface.register("per_head_reference", per_head_attention)


def reference_logits(model, selections: list[Selection], full, tokens: list[int], start: int) -> list[torch.Tensor]:
    layers = []
    for sel, (k, v) in zip(selections, full):
        rows = sel.rows()
        layers.append(PerHeadLayer([k[0, h, rows[h]] for h in range(len(rows))],
                                   [v[0, h, rows[h]] for h in range(len(rows))]))
    cache = Cache(layers=layers)
    model.set_attn_implementation("per_head_reference")
    try:
        out = []
        for i, token in enumerate(tokens):
            out.append(model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[start + i]]),
                             past_key_values=cache, use_cache=True).logits[0, -1])
        return out
    finally:
        model.set_attn_implementation("kvbench")


def full_prefill(model, ids: list[int]):
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), position_ids=torch.arange(len(ids))[None], past_key_values=cache)
    return [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.parametrize("batch", [1, 3])
def test_ragged_heads_decode_like_real_per_head_tensors(model64, batch):
    ids = prompt_ids()
    full = full_prefill(model64, ids)
    selections = [ragged_selection(T, [5, 17], seed=11), ragged_selection(T, [29, 2], seed=12)]
    assert not any(s.is_uniform for s in selections)
    ours = [KeptLayer.gather(k[0], v[0], s) for s, (k, v) in zip(selections, full)]
    # other plans in the batch: uniform ones of other widths, so the plan under test sits among padding
    others = [[KeptLayer.full(k[0, :, : 8 + 9 * j], v[0, :, : 8 + 9 * j]) for k, v in full] for j in range(batch - 1)]
    cache = RaggedCache([ours, *others], reserve=4)
    tokens = [7, 200, 33, 91]
    got = []
    with torch.inference_mode(), attention.decoding(cache):
        for i, token in enumerate(tokens):
            ids_in = torch.tensor([[token]] * batch)
            positions = torch.tensor([[T + i]] * batch)
            got.append(model64(input_ids=ids_in, position_ids=positions, past_key_values=cache).logits[0, -1])
    with torch.inference_mode():
        want = reference_logits(model64, selections, full, tokens, T)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)
    # the check is not vacuous: attending over the padding (all columns valid) gives other logits
    wrong = [KeptLayer(k.keys, k.values, torch.full_like(k.lengths, k.width)) for k in ours]
    with torch.inference_mode():
        unmasked = model64(input_ids=torch.tensor([[tokens[0]]]), position_ids=torch.tensor([[T]]),
                           past_key_values=RaggedCache([wrong])).logits[0, -1]
    assert (unmasked - want[0]).abs().max() > 1e-3
    # bytes: valid entries only, padding reported apart
    assert cache.valid_bytes(0) == sum(int(s.lengths.sum()) + 2 * len(tokens) for s in selections) * 2 * 16 * 8
    assert cache.allocated_bytes(0) > cache.valid_bytes(0)


class StubTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_ragged_method_runs_through_the_engine(model64):
    prompt = Prompt(ids=tuple(prompt_ids()), question_start=T, n_original_tokens=T, truncated=False,
                    max_new_tokens=6, stop_ids=frozenset())
    plan = Plan("ragged_test", RaggedTest(), Budget(ratio=0.5))
    runs = {mode: Engine(model64, StubTokenizer(), decode=mode).run(prompt, [plan, Plan("fullkv", build("fullkv").method,
                                                                              Budget(ratio=1.0))])
            for mode in ("sequential", "batched")}
    seq, bat = runs["sequential"].generations[0], runs["batched"].generations[0]
    assert seq.token_ids == bat.token_ids
    for sel in seq.kept_indices:
        assert sel.lengths.tolist() == [10, 20]  # 20 * (h + 1) // 2 per KV head
    assert seq.kept_per_layer == [15, 15]
    entry_bytes = 2 * 16 * 8  # K and V, head_dim 16, float64
    assert seq.cache_bytes == 2 * 30 * entry_bytes
    assert seq.cache_bytes_allocated >= 2 * 2 * (20 + 6) * entry_bytes  # padded to 20 + room for 6 tokens


SWEEP = ["snapkv", "pyramidkv", "chunkkv", "h2o_prefill", "streamingllm_prefill", "knorm", "random", "tova",
         "h2o", "scissorhands", "streamingllm", "sliding", "sink_recent"]


@pytest.mark.parametrize("scope", ["full", "context"])
def test_batched_equals_sequential_float64(scope):
    model = make_tiny_llama(layers=3, seed=7).to(torch.float64)
    n = 96
    ids = prompt_ids(n, seed=9)
    # stop ids: tokens the free run produces, so plans stop at different steps and leave the batch
    prompt = Prompt(ids=tuple(ids), question_start=n - 12, n_original_tokens=n, truncated=False, max_new_tokens=16,
                    stop_ids=frozenset({EOS_ID, 65, 101}))
    plans = [Plan("fullkv", build("fullkv").method, Budget(ratio=1.0))]
    plans += [Plan(name, build(name).method, Budget(ratio=r)) for name in SWEEP for r in (0.2, 0.5)]
    plans.append(Plan("ragged_test", RaggedTest(), Budget(ratio=0.3)))
    tok = StubTokenizer()
    seq = Engine(model, tok, decode="sequential").run(Prompt(**prompt.__dict__), plans, scope, sample_id="x")
    bat = Engine(model, tok, decode="batched").run(prompt, plans, scope, sample_id="x")
    lengths = set()
    for a, b in zip(seq.generations, bat.generations):
        assert (a.plan.label, a.plan.budget) == (b.plan.label, b.plan.budget)
        assert a.token_ids == b.token_ids, (a.plan.label, a.plan.budget)
        assert a.kept_per_layer == b.kept_per_layer and a.cache_bytes == b.cache_bytes
        assert a.max_cache_tokens == b.max_cache_tokens and a.final_cache_tokens == b.final_cache_tokens
        assert (a.decode, b.decode) == ("sequential", "batched")
        lengths.add(len(a.token_ids))
    assert len(lengths) > 1, "every plan stopped at the same step: the leave-the-batch path was not exercised"


def test_batched_groups_respect_the_memory_bound(model64):
    engine = Engine(model64, None, group_memory=1.0, max_batch=4)
    plans = [Plan(n, build(n).method, Budget(ratio=r)) for n in ("snapkv", "knorm") for r in (0.1, 0.2, 0.5)]
    plans.append(Plan("fullkv", build("fullkv").method, Budget(ratio=1.0)))
    groups = engine._groups(plans, 100, 1, reserve=0)
    assert sorted(i for g in groups for i in g) == list(range(len(plans)))
    for group in groups:
        widest = max(plans[i].budget.kept(100) if plans[i].method.name != "fullkv" else 100 for i in group)
        assert len(group) == 1 or len(group) * widest <= 100
        assert len(group) <= 4
    assert Engine(model64, None, decode="sequential")._groups(plans, 100, 1, 0) == [[i] for i in range(len(plans))]
