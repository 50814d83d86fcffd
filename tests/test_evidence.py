"""Evidence spans -> prompt token positions, retention and cross-layer overlap (kvbench.evidence), and the
engine's kept indices. Expected values computed by hand in the comments. The tiny tokenizer has one token per
byte (see conftest), so a span's tokens are its UTF-8 bytes."""

from __future__ import annotations

import json

import pytest
import torch

from kvbench import data, evidence, prompts
from kvbench.data import Sample

torch.set_num_threads(1)


def task(name: str) -> data.TaskSpec:
    return data.load_task_specs()[name]


def build(spec, sample, tokenizer, max_length=None, chat="none"):
    return prompts.build_prompt(spec, sample, tokenizer, max_length, chat, frozenset())


def evidence_text(prompt, positions) -> str:
    return bytes(prompt.ids[i] for i in positions).decode("utf-8")  # id == byte value


# ---- retention and overlap on a hand-built case --------------------------------------------------------------
# Two layers, 2 KV heads, evidence tokens {3, 4, 5, 6}.
#   layer 0: head 0 keeps {0, 3, 4, 9} -> 2 of 4 evidence; head 1 keeps {3, 4, 5, 6} -> 4 of 4
#            retention = (2 + 4) / (2 heads * 4) = 0.75
#   layer 1: head 0 keeps {1, 2, 7, 8} -> 0;            head 1 keeps {6, 7, 8, 9} -> 1 (token 6)
#            retention = (0 + 1) / 8 = 0.125
#   mean = (0.75 + 0.125) / 2 = 0.4375, min = 0.125
# Overlap, layers 0-1: head 0 {0,3,4,9} vs {1,2,7,8}: 0 common / 8 -> 0
#                      head 1 {3,4,5,6} vs {6,7,8,9}: 1 common ({6}) / 7 in the union -> 1/7
#                      mean over heads = 1/14
KEPT = [torch.tensor([[0, 3, 4, 9], [3, 4, 5, 6]]), torch.tensor([[1, 2, 7, 8], [6, 7, 8, 9]])]
EVIDENCE = (3, 4, 5, 6)


def test_retention_hand_built():
    assert evidence.retention_per_layer(KEPT, EVIDENCE) == [0.75, 0.125]


def test_overlap_hand_built():
    assert evidence.layer_overlap(KEPT) == pytest.approx(1 / 14)
    # A third layer equal to layer 1: pair (1, 2) has Jaccard 1 per head -> mean over pairs (1/14 + 1) / 2
    assert evidence.layer_overlap([*KEPT, KEPT[1].clone()]) == pytest.approx((1 / 14 + 1) / 2)
    # Layers of different sizes (PyramidKV): {0,1,2,3} vs {2,3}: 2 / 4 = 0.5 for the single head
    assert evidence.layer_overlap([torch.tensor([[0, 1, 2, 3]]), torch.tensor([[3, 2]])]) == 0.5
    assert evidence.layer_overlap(KEPT[:1]) is None


def test_row_fields_compressed_fullkv_and_no_evidence(tiny_tokenizer):
    spec = task("passkey_en")
    sample = data.make_synthetic(spec, data.Synthetic(length=60).config["tasks"]["passkey_en"], 0, 60, 0)
    prompt = build(spec, sample, tiny_tokenizer)
    positions = evidence.evidence_positions(spec, sample, prompt)
    n = prompt.n_tokens
    # Layer 0 keeps every evidence token on both heads, layer 1 none of them on either head.
    everything = torch.arange(n).repeat(2, 1)
    nothing = torch.tensor([[i for i in range(n) if i not in positions][:5]] * 2)
    fields = evidence.row_fields(spec, sample, prompt, [everything, nothing], [n, 5], n)
    assert fields["evidence_tokens"] == len(positions) > 0
    assert fields["evidence_retention"] == [1.0, 0.0]
    assert (fields["evidence_retention_mean"], fields["evidence_retention_min"]) == (0.5, 0.0)
    assert fields["layer_overlap"] == pytest.approx(5 / n, abs=1e-6)  # {5 tokens} vs all n, both heads
    full = evidence.row_fields(spec, sample, prompt, None, [n, n], n)  # FullKV: all kept, no selection made
    assert (full["evidence_retention_mean"], full["evidence_retention_min"], full["layer_overlap"]) == (1.0, 1.0, None)
    other = task("multifieldqa_zh")
    plain = Sample("x", "multifieldqa_zh", "q", "some context", ("a",), 2, None, "zh")
    none = evidence.row_fields(other, plain, build(other, plain, tiny_tokenizer), [nothing, nothing], [5, 5], n)
    assert none == {"evidence_tokens": None, "evidence_retention": None, "evidence_retention_mean": None,
                    "evidence_retention_min": None, "layer_overlap": none["layer_overlap"]}
    assert none["layer_overlap"] == 1.0


# ---- evidence spans ------------------------------------------------------------------------------------------
def test_passage_span_picks_the_exact_label():
    context = "Paragraph 1: one one.\n\nParagraph 10: ten ten.\n\nParagraph 2: two.\n"
    # "Paragraph 1" must not match "Paragraph 10"; the span ends before the blank line of the next label.
    start, end = evidence.passage_span(context, "Paragraph", "Paragraph 1")
    assert context[start:end] == "Paragraph 1: one one."
    start, end = evidence.passage_span(context, "Paragraph", "Paragraph 2")
    assert context[start:end] == "Paragraph 2: two."  # the last paragraph ends at the context's end
    assert evidence.passage_span(context, "Paragraph", "Paragraph 3") is None
    zh = "段落1：甲。\n\n段落2：乙丙。"
    start, end = evidence.passage_span(zh, "段落", "段落2")
    assert zh[start:end] == "段落2：乙丙。"


def test_synthetic_needle_positions(tiny_tokenizer):
    spec = task("passkey_en")
    sample = data.make_synthetic(spec, data.Synthetic(length=80).config["tasks"]["passkey_en"], 3, 80, 0)
    (start, end), = sample.meta("evidence_char_spans")
    for chat in ("none", "template"):
        prompt = build(spec, sample, tiny_tokenizer, chat=chat)
        positions = evidence.evidence_positions(spec, sample, prompt)
        assert evidence_text(prompt, positions) == sample.context[start:end]
        assert positions == tuple(range(positions[0], positions[0] + end - start))  # contiguous, one per byte
        assert max(positions) < prompt.question_start


def test_truncation_keeps_only_surviving_tokens_and_question_is_excluded(tiny_tokenizer):
    spec = task("multifieldqa_en")  # any template with {context} then the question
    context = "A" * 40 + "NEEDLE-IN-THE-MIDDLE" + "B" * 40
    at = context.index("NEEDLE")
    sample = Sample("t", "multifieldqa_en", "Where is NEEDLE-IN-THE-MIDDLE?", context, ("x",), 1, None, "en")
    prefix = len(spec.prompt.split("{context}")[0])
    full = build(spec, sample, tiny_tokenizer)
    n_filled = len(prompts.fill(spec.prompt, sample).encode())
    # Cut the middle so the head ends 6 bytes into the needle: keep (prefix + at + 6) tokens each side.
    half = prefix + at + 6  # BOS counts as one of the head's tokens, so 5 needle bytes survive in the head
    cut = build(spec, sample, tiny_tokenizer, max_length=2 * half)
    assert cut.truncated and n_filled + 1 > 2 * half
    spans = ((at, at + len("NEEDLE-IN-THE-MIDDLE")),)
    whole = evidence.token_positions(spans, full, prefix)
    assert evidence_text(full, whole) == "NEEDLE-IN-THE-MIDDLE"  # the question's copy is not counted
    survived = evidence.token_positions(spans, cut, prefix)
    assert evidence_text(cut, survived) == "NEEDL"
    # A span running from the end of the context into the question: only its context tokens ("BBBB") count
    into_question = ((len(context) - 4, len(context) + 60),)
    assert evidence_text(full, evidence.token_positions(into_question, full, prefix)) == "BBBB"


def test_real_passage_retrieval_zh_sample(tiny_tokenizer, shared_longbench):
    spec = task("passage_retrieval_zh")
    raw = json.loads((shared_longbench / "passage_retrieval_zh.jsonl").read_text(encoding="utf-8").splitlines()[1])
    sample = data.parse_row(raw, spec.name, "line 2")
    assert sample.answers == ("段落2",)
    start, end = evidence.char_spans(spec, sample)[0]
    gold = sample.context[start:end]
    assert gold.startswith("段落2：") and "段落3" not in gold and gold == gold.strip()
    assert sample.context[end:].lstrip().startswith("段落3：")
    prompt = build(spec, sample, tiny_tokenizer, chat="template")
    positions = evidence.evidence_positions(spec, sample, prompt)
    assert evidence_text(prompt, positions) == gold
    assert len(positions) == len(gold.encode("utf-8"))
    # Middle truncation to 4000 byte-tokens keeps the first 2000: paragraph 2 lies inside them, whole.
    cut = build(spec, sample, tiny_tokenizer, max_length=4000, chat="template")
    assert cut.truncated
    assert evidence_text(cut, evidence.evidence_positions(spec, sample, cut)) == gold


def test_tasks_without_known_evidence(tiny_tokenizer):
    spec = task("multifieldqa_zh")
    sample = Sample("x", spec.name, "q", "段落1：甲", ("段落1",), 2, None, "zh")
    assert evidence.char_spans(spec, sample) is None
    assert evidence.evidence_positions(spec, sample, build(spec, sample, tiny_tokenizer)) is None


# ---- the engine records kept indices ------------------------------------------------------------------------
def test_engine_records_kept_indices(tiny_llama, tiny_tokenizer):
    from kvbench import methods
    from kvbench.engine import Engine, Plan
    from kvbench.methods.base import Budget
    from kvbench.prompts import Prompt

    ids = tuple(range(65, 65 + 40))
    prompt = Prompt(ids=ids, question_start=40, n_original_tokens=40, truncated=False, max_new_tokens=2,
                    stop_ids=frozenset())
    plans = [Plan("fullkv", methods.build("fullkv").method, Budget(ratio=1.0)),
             Plan("snapkv", methods.build("snapkv").method, Budget(ratio=0.25))]
    run = Engine(tiny_llama, tiny_tokenizer).run(prompt, plans, sample_id="s")
    full, snap = run.generations
    assert full.kept_indices is None
    assert len(snap.kept_indices) == tiny_llama.config.num_hidden_layers
    for layer, k in zip(snap.kept_indices, snap.kept_per_layer):
        assert layer.indices.device.type == "cpu" and layer.is_uniform
        assert layer.indices.shape == (tiny_llama.config.num_key_value_heads, k) == (2, 10)
        assert set(range(32, 40)) <= set(layer.indices[0].tolist())  # SnapKV keeps its 8-token observation window


def test_run_rows_carry_evidence_and_overlap(tiny_model_dir, tmp_path):
    """`kvbench run` end to end on a synthetic passkey task with the tiny saved model."""
    from kvbench import runner
    from kvbench.results import store

    opts = runner.RunOptions(model=str(tiny_model_dir), methods=("fullkv", "streamingllm_prefill", "snapkv"),
                             ratios=(0.3,), tasks=("passkey_en",), limit=2, synthetic_length=60, results=tmp_path,
                             device="cpu")
    runner.run(opts, log=lambda _: None)
    rows = {(r["method"], r["_id"]): r for r in store.load_all_rows(tmp_path)}
    assert len(rows) == 6
    for (method, _), row in rows.items():
        assert row["evidence_tokens"] > 0  # the needle is in every prompt (nothing truncated)
        retention = row["evidence_retention"]
        assert len(retention) == len(row["kept_tokens"]) == 2
        assert row["evidence_retention_mean"] == pytest.approx(sum(retention) / 2, abs=1e-6)
        assert row["evidence_retention_min"] == min(retention)
        if method == "fullkv":
            assert retention == [1.0, 1.0] and row["layer_overlap"] is None
        elif method == "streamingllm_prefill":
            # positional (sinks + recent): the same positions in every layer and head -> Jaccard exactly 1
            assert row["layer_overlap"] == 1.0
        else:
            assert 0 < row["layer_overlap"] <= 1 and all(0 <= v <= 1 for v in retention)
