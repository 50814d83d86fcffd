"""Official LongBench prompt rules (protocol "Prompt" and "Generation"): fill, middle truncation before the chat
template, the chat rule per task, no double BOS, stop ids, question start.

Unit tests use the tiny byte-level tokenizer of conftest.py, where token id == byte value and BOS (256) is
prepended on plain tokenization, so every expected id sequence below is derived with plain Python bytes."""

from __future__ import annotations

import json
import re

import pytest
from conftest import (
    BOS, BOS_ID, EOS_ID, IM_END, IM_END_ID, IM_START, IM_START_ID, SHARED_LONGBENCH, make_tiny_tokenizer, wrap_chat,
)

from kvbench.data import Sample, load_task_specs, read_jsonl
from kvbench.errors import InputError
from kvbench.prompts import build_prompt, find_question_start, middle_truncate, newline_token

SPECS = load_task_specs()
V1 = [n for n, s in SPECS.items() if not s.synthetic and not s.longbench_e]
MODEL_STOPS = frozenset({EOS_ID, IM_END_ID})
SPECIAL_IDS = {BOS: BOS_ID, "<|eos|>": EOS_ID, IM_START: IM_START_ID, IM_END: IM_END_ID}
NEWLINE_ID = 0x0A  # "\n" is byte 10, and the tiny tokenizer's id of a byte is its value

MAX_LENGTH = 1200
HALF = 600  # int(1200 / 2)


def byte_ids(text: str) -> list[int]:
    """Hand tokenizer for the tiny vocabulary: special-token strings -> their ids, every other byte -> itself."""
    ids: list[int] = []
    for part in re.split(f"({'|'.join(map(re.escape, SPECIAL_IDS))})", text):
        ids.extend([SPECIAL_IDS[part]] if part in SPECIAL_IDS else list(part.encode("utf-8")))
    return ids


def make_context(n_filler: int) -> str:
    """ASCII only (one token per character), with markers at the head, the middle and the tail."""
    filler = "".join(f"w{i % 10} " for i in range(n_filler))
    return "HEADMARK " + filler + "MIDMARK " + filler + "TAILMARK"


def sample(task: str, context: str, question: str = "Which marker comes last?") -> Sample:
    return Sample(id="s0", task=task, input=question, context=context, answers=("x",), length=len(context.split()),
                  all_classes=None, language=SPECS[task].language)


def filled(task: str, s: Sample) -> str:
    """The template filled by plain replacement (independent of prompts.fill's str.format)."""
    return SPECS[task].prompt.replace("{context}", s.context).replace("{input}", s.input)


def suffix_of(task: str, s: Sample) -> str:
    template = SPECS[task].prompt
    return template.split("{context}", 1)[1].replace("{input}", s.input)


@pytest.mark.parametrize("task", V1)
def test_build_prompt_truncates_middle_before_template(task, tiny_tokenizer):
    spec = SPECS[task]
    s = sample(task, make_context(600))  # ~2,400 ASCII bytes of context: well over MAX_LENGTH tokens
    text = filled(task, s).encode("utf-8")
    head_len = len(spec.prompt.split("{context}")[0].encode("utf-8"))
    tail_len = len(suffix_of(task, s).encode("utf-8"))
    # Precondition of the hand computation: both cuts fall inside the (ASCII) context.
    assert head_len + 1 < HALF and tail_len < HALF and len(text) + 1 > MAX_LENGTH

    prompt = build_prompt(spec, s, tiny_tokenizer, MAX_LENGTH, "template", MODEL_STOPS)

    # Filled prompt: BOS + one token per byte. Keep the first 600 tokens (BOS + 599 bytes; BOS is dropped when
    # decoding with skip_special_tokens) and the last 600 tokens (600 bytes), joined as strings.
    truncated = (text[: HALF - 1] + text[-HALF:]).decode("utf-8")
    final = wrap_chat(truncated) if spec.chat else truncated
    expected = byte_ids(final) if spec.chat else [BOS_ID, *byte_ids(final)]
    assert prompt.ids == tuple(expected)
    assert prompt.truncated is True
    assert prompt.n_original_tokens == len(text) + 1
    # Truncation happened before templating: the wrapper is intact around 1199 content tokens, so the prompt
    # is longer than max_length by exactly the wrapper's size (truncating after templating would give <= 1200).
    wrapper = len(byte_ids(wrap_chat(""))) if spec.chat else 1
    assert prompt.n_tokens == wrapper + 2 * HALF - 1

    decoded = tiny_tokenizer.decode(list(prompt.ids), skip_special_tokens=False)
    assert "HEADMARK" in decoded and "TAILMARK" in decoded and "MIDMARK" not in decoded
    if spec.chat:
        assert decoded.startswith(f"{BOS}{IM_START}system\n")
        assert decoded.endswith(f"{IM_END}\n{IM_START}assistant\n")
    else:
        assert IM_START not in decoded and decoded == BOS + truncated
    assert prompt.ids.count(BOS_ID) == 1 and prompt.ids[0] == BOS_ID  # no double BOS

    # The question part starts right where the suffix's first byte is.
    suffix = suffix_of(task, s)
    before = final[: final.rfind(suffix)]
    assert prompt.question_start == len(byte_ids(before)) + (0 if spec.chat else 1)
    assert tiny_tokenizer.decode(list(prompt.ids[prompt.question_start:])).startswith(suffix)
    assert tiny_tokenizer.decode(list(prompt.ids[: prompt.question_start])).endswith("TAILMARK")

    # Stops: the model's always; samsum also the newline token.
    assert prompt.stop_ids == (MODEL_STOPS | {NEWLINE_ID} if task == "samsum" else MODEL_STOPS)
    assert prompt.max_new_tokens == spec.max_new_tokens


def test_official_max_new_tokens_reach_the_prompt(tiny_tokenizer, shared_longbench):
    official = json.loads((shared_longbench / "config" / "dataset2maxlen.json").read_text())
    for task in V1:
        prompt = build_prompt(SPECS[task], sample(task, "short"), tiny_tokenizer, MAX_LENGTH, "template", MODEL_STOPS)
        assert prompt.max_new_tokens == official[task], task


@pytest.mark.parametrize("task", ["multifieldqa_zh", "trec"])
def test_short_prompt_is_not_truncated(task, tiny_tokenizer):
    s = sample(task, "HEADMARK tiny MIDMARK context TAILMARK")
    prompt = build_prompt(SPECS[task], s, tiny_tokenizer, MAX_LENGTH, "template", MODEL_STOPS)
    text = filled(task, s)
    assert prompt.truncated is False
    assert prompt.n_original_tokens == len(text.encode("utf-8")) + 1
    expected = byte_ids(wrap_chat(text)) if SPECS[task].chat else [BOS_ID, *byte_ids(text)]
    assert prompt.ids == tuple(expected)


def test_truncation_boundary_is_strictly_greater_than_max_length(tiny_tokenizer):
    # "abc..." of n bytes -> n + 1 tokens (BOS). Official rule: truncate only when len(ids) > max_length.
    text = "x" * 99
    assert middle_truncate(text, tiny_tokenizer, 100) == (text, 100, False)
    longer = "ab" * 50 + "c"  # 101 bytes -> 102 tokens > 100
    got, n, cut = middle_truncate(longer, tiny_tokenizer, 100)
    # first 50 tokens = BOS + 49 bytes, last 50 tokens = last 50 bytes
    assert (n, cut) == (102, True)
    assert got == longer[:49] + longer[-50:]


def test_odd_max_length_keeps_int_half_on_each_side(tiny_tokenizer):
    text = "".join(chr(ord("a") + i % 26) for i in range(300))  # 301 tokens
    got, n, cut = middle_truncate(text, tiny_tokenizer, 101)  # int(101/2) = 50 each side -> 100 tokens kept
    assert (n, cut) == (301, True)
    assert got == text[:49] + text[-50:]
    assert len(got) == 99  # BOS was one of the 50 head tokens


def test_template_without_bos_gets_one_from_the_tokenizer():
    no_bos_template = (
        "{% for m in messages %}" + IM_START + "{{ m['role'] }}\n{{ m['content'] }}" + IM_END + "\n{% endfor %}"
        "{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}"
    )
    tok = make_tiny_tokenizer(chat_template=no_bos_template)
    s = sample("hotpotqa", "ctx")
    prompt = build_prompt(SPECS["hotpotqa"], s, tok, MAX_LENGTH, "template", MODEL_STOPS)
    text = f"{IM_START}user\n{filled('hotpotqa', s)}{IM_END}\n{IM_START}assistant\n"
    assert prompt.ids == tuple([BOS_ID, *byte_ids(text)])


def test_chat_policy_none_never_templates(tiny_tokenizer):
    s = sample("hotpotqa", "ctx")
    prompt = build_prompt(SPECS["hotpotqa"], s, tiny_tokenizer, MAX_LENGTH, "none", MODEL_STOPS)
    assert prompt.ids == tuple([BOS_ID, *byte_ids(filled("hotpotqa", s))])


def test_chat_task_needs_a_chat_template():
    tok = make_tiny_tokenizer(chat_template=None)
    with pytest.raises(InputError, match="chat template"):
        build_prompt(SPECS["hotpotqa"], sample("hotpotqa", "ctx"), tok, MAX_LENGTH, "template", MODEL_STOPS)
    # A completion-style task does not need one.
    build_prompt(SPECS["trec"], sample("trec", "ctx"), tok, MAX_LENGTH, "template", MODEL_STOPS)


def test_braces_in_context_and_input_stay_literal(tiny_tokenizer):
    s = sample("hotpotqa", "code {x} and {context} {0}", question="what is {input}?")
    prompt = build_prompt(SPECS["hotpotqa"], s, tiny_tokenizer, MAX_LENGTH, "none", MODEL_STOPS)
    decoded = tiny_tokenizer.decode(list(prompt.ids), skip_special_tokens=True)
    assert "code {x} and {context} {0}" in decoded and "Question: what is {input}?\nAnswer:" in decoded


def test_no_truncation_length_checks_positions(tiny_tokenizer):
    s = sample("hotpotqa", "y" * 400)
    spec = SPECS["hotpotqa"]  # 32 new tokens
    prompt = build_prompt(spec, s, tiny_tokenizer, None, "none", MODEL_STOPS, max_positions=10_000)
    assert prompt.truncated is False and prompt.n_tokens == len(filled("hotpotqa", s).encode()) + 1
    with pytest.raises(InputError, match="exceeds the model's"):
        build_prompt(spec, s, tiny_tokenizer, None, "none", MODEL_STOPS, max_positions=prompt.n_tokens + 31)
    build_prompt(spec, s, tiny_tokenizer, None, "none", MODEL_STOPS, max_positions=prompt.n_tokens + 32)


def test_newline_token_is_the_last_id_of_a_newline(tiny_tokenizer):
    assert newline_token(tiny_tokenizer) == NEWLINE_ID


def test_question_start_keeps_a_straddling_token_with_the_context():
    text = "abcdefghi"
    offsets = [(0, 0), (0, 3), (3, 6), (6, 9)]  # a special token with an empty span, then 3 tokens
    assert find_question_start(text, offsets, "efghi") == 3  # "def" starts before "e" (index 4): context
    assert find_question_start(text, offsets, "defghi") == 2
    assert find_question_start(text, offsets, "") == 4  # no suffix: all context
    assert find_question_start(text, offsets, "zzz") == 4  # suffix not found: all context


# ---- the real SmolLM2 tokenizer on real LongBench samples ------------------------------------------------------
# From HuggingFaceTB/SmolLM2-135M-Instruct's chat template: a default system turn when none is given.
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.mark.slow
@pytest.mark.parametrize("task", ["multifieldqa_zh", "passage_retrieval_zh", "multi_news"])
def test_real_prompt_at_7500(task, smollm2, shared_longbench):
    tok = smollm2.tokenizer
    spec = SPECS[task]
    s = next(read_jsonl(shared_longbench / f"{task}.jsonl", task, limit=1))
    prompt = build_prompt(spec, s, tok, 7500, "template", smollm2.stop_ids)

    n_filled = len(tok(filled(task, s))["input_ids"])
    assert prompt.n_original_tokens == n_filled and prompt.truncated == (n_filled > 7500)
    wrapper_text = tok.apply_chat_template([{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True)
    overhead = len(tok(wrapper_text, add_special_tokens=False)["input_ids"])
    assert prompt.n_tokens <= 7500 + overhead
    decoded = tok.decode(list(prompt.ids), skip_special_tokens=False)
    assert decoded.startswith(SMOL_SYSTEM + "<|im_start|>user\n")
    assert decoded.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.ids[:2] != (prompt.ids[0], prompt.ids[0])  # no doubled first token (BOS)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in prompt.stop_ids and smollm2.stop_ids <= prompt.stop_ids
    # The question part starts at the suffix; a token straddling the boundary (multi_news #0: the context ends
    # with "\n" and "\n\n" spans it and the suffix's first "\n") stays with the context.
    tail = suffix_of(task, s) + "<|im_end|>\n<|im_start|>assistant\n"
    after = tok.decode(list(prompt.ids[prompt.question_start:]))
    boundary = tok.decode([prompt.ids[prompt.question_start - 1]])
    assert tail.endswith(after)
    lost = len(tail) - len(after)
    assert lost == 0 or (lost < len(boundary) and boundary.endswith(tail[:lost]))

