"""The engine's FullKV path against transformers' own greedy generate and a plain full forward (tiny random
Llama from conftest.py); and the same generate check on the real SmolLM2 (slow)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from conftest import EOS_ID, TINY_VOCAB

from kvbench.engine import Engine, Plan
from kvbench.methods import build
from kvbench.methods.base import Budget
from kvbench.prompts import Prompt

N_PROMPT = 48
N_NEW = 24


DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny-model tests run single-threaded: on the shared, oversubscribed 2-core machines two OpenMP threads
    made one 24-token engine run take ~1 s instead of ~15 ms. The slow real-model test restores the default."""
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(DEFAULT_THREADS)


def fullkv_plan() -> Plan:
    return Plan("fullkv", build("fullkv").method, Budget(ratio=1.0))


def random_ids(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=gen).tolist()  # byte tokens only: no special ids


def make_prompt(ids: list[int], new: int, stops: set[int], question_start: int | None = None) -> Prompt:
    return Prompt(ids=tuple(ids), question_start=len(ids) if question_start is None else question_start,
                  n_original_tokens=len(ids), truncated=False, max_new_tokens=new, stop_ids=frozenset(stops))


@contextmanager
def attention_impl(model, name: str):
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation("kvbench")


def hf_greedy(model, ids: list[int], new: int, stops: list[int], pad: int) -> list[int]:
    with attention_impl(model, "sdpa"), torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new, do_sample=False, min_new_tokens=1, eos_token_id=stops,
                             pad_token_id=pad)
    return out[0, len(ids):].tolist()


def engine_tokens(model, tokenizer, prompt: Prompt, scope: str = "full") -> list[int]:
    run = Engine(model, tokenizer).run(prompt, [fullkv_plan()], scope)
    assert len(run.generations) == 1
    return run.generations[0].token_ids


@pytest.fixture(scope="module")
def free_run(tiny_llama, tiny_tokenizer):
    """Greedy continuation of a fixed prompt with no stop ids (the reference for choosing stop ids)."""
    ids = random_ids(N_PROMPT, seed=1)
    tokens = engine_tokens(tiny_llama, tiny_tokenizer, make_prompt(ids, N_NEW, set()))
    assert len(tokens) == N_NEW
    assert len(set(tokens)) > 2, "the tiny model degenerated into one token; pick another seed"
    return ids, tokens


def test_fullkv_equals_hf_generate_without_stops(tiny_llama, tiny_tokenizer, free_run):
    ids, tokens = free_run
    # eos id 259 (<|im_end|>) is never produced by the free run, so generate runs the full N_NEW tokens too.
    absent = next(t for t in range(TINY_VOCAB - 1, 0, -1) if t not in tokens)
    assert hf_greedy(tiny_llama, ids, N_NEW, [absent], EOS_ID) == tokens


def test_fullkv_equals_hf_generate_stopping_midway(tiny_llama, tiny_tokenizer, free_run):
    ids, tokens = free_run
    # A stop id that first occurs at some step k >= 1 of the free run: both must stop right after emitting it.
    k = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    stops = [tokens[k], TINY_VOCAB - 1 if TINY_VOCAB - 1 not in tokens else EOS_ID]
    got = engine_tokens(tiny_llama, tiny_tokenizer, make_prompt(ids, N_NEW, set(stops)))
    assert got == tokens[: k + 1]
    assert hf_greedy(tiny_llama, ids, N_NEW, stops, EOS_ID) == got


def test_first_token_is_never_a_stop_like_min_new_tokens_1(tiny_llama, tiny_tokenizer, free_run):
    ids, tokens = free_run
    # The free run's first token is a stop id: it is masked at step 0 (LongBench's min_length = prompt + 1),
    # exactly as generate(min_new_tokens=1) does.
    stops = [tokens[0]]
    got = engine_tokens(tiny_llama, tiny_tokenizer, make_prompt(ids, N_NEW, set(stops)))
    assert got[0] != tokens[0]
    assert hf_greedy(tiny_llama, ids, N_NEW, stops, EOS_ID) == got


def test_decoding_matches_teacher_forced_full_forward(tiny_llama, tiny_tokenizer, free_run):
    ids, tokens = free_run
    # One plain forward (eager attention, no cache) over prompt + generated tokens: the argmax after each
    # position must be the next generated token. Wrong decode positions or cache handling would break this.
    with attention_impl(tiny_llama, "eager"), torch.inference_mode():
        logits = tiny_llama(torch.tensor([ids + tokens[:-1]])).logits[0]
    predicted = logits[N_PROMPT - 1:].argmax(-1).tolist()
    assert predicted == tokens


def test_max_new_tokens_is_respected(tiny_llama, tiny_tokenizer, free_run):
    ids, tokens = free_run
    assert engine_tokens(tiny_llama, tiny_tokenizer, make_prompt(ids, 5, set())) == tokens[:5]
    assert engine_tokens(tiny_llama, tiny_tokenizer, make_prompt(ids, 1, set())) == tokens[:1]


@pytest.mark.parametrize("question_start", [N_PROMPT - 1, N_PROMPT - 10, 1])
def test_context_scope_fullkv_equals_full_scope(tiny_llama, tiny_tokenizer, free_run, question_start):
    ids, tokens = free_run
    prompt = make_prompt(ids, N_NEW, set(), question_start=question_start)
    run = Engine(tiny_llama, tiny_tokenizer).run(prompt, [fullkv_plan()], "context")
    assert run.n_prefilled == question_start and run.n_prompt_tokens == N_PROMPT
    assert run.generations[0].token_ids == tokens


def test_generation_bookkeeping(tiny_llama, tiny_tokenizer, free_run):
    ids, tokens = free_run
    run = Engine(tiny_llama, tiny_tokenizer).run(make_prompt(ids, N_NEW, set()), [fullkv_plan(), fullkv_plan()])
    assert run.n_prefilled == N_PROMPT
    config = tiny_llama.config
    # K and V, float32 (4 bytes), per layer: kv_heads x tokens x head_dim = 2 x 48 x 16
    head_dim = config.hidden_size // config.num_attention_heads
    expected_bytes = 2 * 4 * config.num_hidden_layers * config.num_key_value_heads * N_PROMPT * head_dim
    for gen in run.generations:  # both plans decode the same tokens from the shared prefill
        assert gen.token_ids == tokens
        assert gen.text == tiny_tokenizer.decode(tokens, skip_special_tokens=True)
        assert gen.kept_per_layer == [N_PROMPT] * config.num_hidden_layers
        assert gen.cache_bytes == gen.full_cache_bytes == expected_bytes
        # the last token is never fed back: the cache ends at prompt + new - 1
        assert gen.final_cache_tokens == [N_PROMPT + N_NEW - 1] * config.num_hidden_layers


# ---- the real model ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_fullkv_equals_hf_generate(smollm2, shared_longbench):
    from kvbench.data import load_task_specs, read_jsonl
    from kvbench.prompts import build_prompt

    task = load_task_specs()["multi_news"]
    sample = next(read_jsonl(shared_longbench / "multi_news.jsonl", "multi_news", limit=1))
    # Cut to ~300 tokens (middle truncation at 300, plus the chat wrapper) to keep this cheap on CPU.
    prompt = build_prompt(task, sample, smollm2.tokenizer, 300, smollm2.spec.chat, smollm2.stop_ids)
    assert prompt.truncated and 300 < prompt.n_tokens < 360
    new = 16
    prompt = Prompt(**{**prompt.__dict__, "max_new_tokens": new})
    engine = Engine(smollm2.model, smollm2.tokenizer)
    torch.set_num_threads(DEFAULT_THREADS)
    try:
        got = engine.run(prompt, [fullkv_plan()]).generations[0].token_ids
        want = hf_greedy(smollm2.model, list(prompt.ids), new, sorted(prompt.stop_ids), smollm2.tokenizer.pad_token_id)
    finally:
        torch.set_num_threads(1)
    assert got == want
    assert len(got) >= 2


@pytest.mark.parametrize("penalty", [1.3, 2.0])
def test_repetition_penalty_equals_hf_generate(tiny_llama, tiny_tokenizer, penalty):
    """The engine applies the generation config's repetition penalty as HF's RepetitionPenaltyLogitsProcessor
    (LongBench's pred.py decodes Qwen2-Instruct with 1.05), in both decode modes."""
    ids = random_ids(N_PROMPT, seed=2)
    with attention_impl(tiny_llama, "sdpa"), torch.inference_mode():
        out = tiny_llama.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=N_NEW, do_sample=False, repetition_penalty=penalty,
                                  min_new_tokens=1, pad_token_id=EOS_ID, eos_token_id=[EOS_ID])
    want = out[0, len(ids):].tolist()
    plain = engine_tokens(tiny_llama, tiny_tokenizer, make_prompt(ids, N_NEW, {EOS_ID}))
    assert want != plain, "the penalty changed nothing: the check would be vacuous"
    for mode in ("sequential", "batched"):
        plans = [fullkv_plan(), Plan("snapkv", build("snapkv").method, Budget(ratio=0.5))]
        run = Engine(tiny_llama, tiny_tokenizer, repetition_penalty=penalty, decode=mode).run(
            make_prompt(ids, N_NEW, {EOS_ID}), plans)
        assert run.generations[0].token_ids == want
