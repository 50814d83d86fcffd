"""HeadKV (methods-2 §2.21): the capacity table on the spec's hand-derivable example, the selection (per-head
top-cap of SnapKV's score, truncated not redistributed), the group-mean caps at kv_head; head-score detection
(kvbench.headscores): the per-step accumulator against a hand computation, the needle placement, a full run
on a tiny model into HeadKV's JSON layout, resumption; and the file's sha256 in fingerprints and manifests."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama
from test_engine_ragged import StubTokenizer

from kvbench import headscores, headtables, runner
from kvbench.engine import Engine, Plan
from kvbench.errors import InputError
from kvbench.methods import build
from kvbench.methods.base import Budget, HeadRanking, LayerView, SelectContext
from kvbench.methods.head_budgets import keep_top_caps
from kvbench.methods.headkv import group_mean_caps, headkv_caps
from kvbench.prompts import Prompt


def write_scores(path, table: dict[str, list[float]]):
    path.write_text(json.dumps(table) + "\n")
    return path


# ---- capacities -----------------------------------------------------------------------------------------------
def test_capacity_table_spec_example():
    """methods-2 §2.21: scores [0, 1, 3, 4], C = 40, beta = 1.01, L = 1, H = 4, T = 80, w = 8.
    KCF (B = C = 40): 40 // 1.01 = 39, pool = 39 * 4 = 156, m = 40 - 39 = 1; shares [0, 1/8, 3/8, 1/2];
    caps = round([1, 20.5, 59.5, 79]) = [1, 20, 60, 79] (half to even); kept = caps + w, the last truncated to
    the 72 prefix tokens + 8 = 80: [9, 28, 68, 80].
    Official (B = C - w = 32): 32 // 1.01 = 31, pool 124, m = 1: round([1, 16.5, 47.5, 63]) = [1, 16, 48, 63];
    kept [9, 24, 56, 71]."""
    importance = torch.tensor([[0.0, 1.0, 3.0, 4.0]])
    assert headkv_caps(importance, 40, 1.01).tolist() == [[1, 20, 60, 79]]
    assert headkv_caps(importance, 32, 1.01).tolist() == [[1, 16, 48, 63]]
    prefix = torch.linspace(1, 0, 72).expand(4, 72)  # any untied prefix scores
    for caps, kept in (([1, 20, 60, 79], [9, 28, 68, 80]), ([1, 16, 48, 63], [9, 24, 56, 71])):
        sel = keep_top_caps(HeadRanking.with_window(prefix, 80, 40), torch.tensor(caps))
        assert sel.lengths.tolist() == kept
    # tau = 2: shares [0, 1, 9, 16] / 26; KCF B = 40: round(156 s + 1) = [1, 7, 55, 97]
    assert headkv_caps(importance, 40, 1.01, tau=2.0).tolist() == [[1, 7, 55, 97]]


def test_group_mean_caps_round_half_to_even():
    # KCF kv_head: mean of each KV head's query-head caps, rounded: (1 + 20) / 2 = 10.5 -> 10, (60 + 79) / 2 = 69.5 -> 70
    assert group_mean_caps(torch.tensor([1, 20, 60, 79]), 2).tolist() == [10, 70]


def ctx(view: LayerView, kept: int, scores, layer: int = 0, n_layers: int = 1, query_heads: bool = False):
    heads = view.query.shape[0] if query_heads else view.keys.shape[0]
    return SelectContext(layer=layer, n_layers=n_layers, n_tokens=view.n_tokens, kept=kept, scores=scores,
                         keys=view.keys, n_kv_heads=heads, group=1 if query_heads else view.group)


def test_selection_is_snapkv_scores_under_each_heads_cap(tmp_path):
    gen = torch.Generator().manual_seed(0)
    view = LayerView(layer=1, n_layers=2, query=torch.randn(4, 80, 8, generator=gen) * 2,
                     keys=torch.randn(2, 80, 8, generator=gen) * 2, values=torch.randn(2, 80, 8, generator=gen),
                     scaling=8**-0.5)
    table = {f"{l}-{h}": [float(1 + l + 3 * h), float(2 + h)] for l in range(2) for h in range(4)}
    method = build("headkv", {"scores": str(write_scores(tmp_path / "s.json", table))}).method
    scores = method.score(view)  # SnapKV's [H_kv, T - w]
    sel = method.select(ctx(view, 40, scores, layer=1, n_layers=2))
    importance = torch.tensor([[(1 + l + 3 * h + 2 + h) / 2 for h in range(4)] for l in range(2)])
    caps = group_mean_caps(headkv_caps(importance, 32, 1.01)[1], 2).tolist()
    for head, row in enumerate(sel.rows()):
        order = sorted(range(72), key=lambda j: (-float(scores[head, j]), j))[: min(caps[head], 72)]
        assert row.tolist() == sorted(order) + list(range(72, 80))


def test_scores_file_errors(tmp_path):
    with pytest.raises(InputError, match="has no accepted test"):
        build("headkv", {"scores": str(write_scores(tmp_path / "e.json", {"0-0": [], "0-1": []}))})
    with pytest.raises(InputError, match="not a full 2 x 2 grid"):
        build("headkv", {"scores": str(write_scores(tmp_path / "g.json", {"0-0": [1], "1-1": [1], "0-1": [2]}))})
    method = build("headkv", {"scores": str(write_scores(tmp_path / "ok.json", {"0-0": [1], "0-1": [2]}))}).method
    view = LayerView(layer=0, n_layers=2, query=torch.randn(4, 30, 8), keys=torch.randn(2, 30, 8),
                     values=torch.randn(2, 30, 8), scaling=0.3)
    with pytest.raises(InputError, match="1 x 2 heads; the model has 2 layers x 4 heads"):
        method.select(ctx(view, 12, method.score(view), n_layers=2))
    with pytest.raises(InputError, match="kvbench headscores --model m --method headkv"):
        build("headkv").method.bind_model("dir-config-sha256:nowhere", "m")


# ---- detection ------------------------------------------------------------------------------------------------
def test_step_scores_hand_computed():
    # one layer, two heads, 8 keys; needle = positions [2, 5) (n = 3); answer of 2 tokens: 10 v / (3 * 2)
    rows = torch.tensor([[[0.05, 0.05, 0.30, 0.20, 0.02, 0.25, 0.08, 0.05],  # top 3: 2 (.30), 5 (.25), 3 (.20)
                          [0.40, 0.02, 0.01, 0.03, 0.04, 0.20, 0.10, 0.20]]])  # top 3: 0, 5, 7 -> none inside
    got = headscores.step_scores(rows, 2, 5, 2)
    assert torch.allclose(got, torch.tensor([[10 * (0.30 + 0.20) / 6, 0.0]], dtype=torch.float64), atol=1e-7)


class ByteTokenizer:
    """One token per character; '.' is its own token."""

    def encode(self, text, add_special_tokens=False):
        return ([256] if add_special_tokens else []) + [ord(c) % 256 for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if i < 256)


def test_needle_goes_after_a_sentence_end_inside_the_budget():
    tok = ByteTokenizer()
    hay = tok.encode("abc. defg. hijklm. " * 40)
    ends = headscores.sentence_ends(tok, hay)
    needle = headscores.Needle("XYZ", "q?", "a")
    ids, start, stop = headscores.build_test(tok, hay, ends, needle, 230, 50)
    n_hay = 230 - headscores.BUFFER - 3
    assert ids[0] == 256 and ids[start:stop] == tok.encode("XYZ")
    assert ids[start - 1] == ord(".")  # right after a full stop
    assert start - 1 <= int(n_hay * 0.5)  # moved back, never forward
    assert len(ids) == 1 + n_hay + 3 + len(tok.encode(headscores.TEMPLATE.format(question="q?")))
    _, start0, _ = headscores.build_test(tok, hay, ends, needle, 230, 0)
    _, start100, _ = headscores.build_test(tok, hay, ends, needle, 230, 100)
    assert (start0, start100) == (1, 1 + n_hay)


def test_detection_on_a_tiny_model_writes_headkv_layout_and_resumes(tiny_tokenizer, tmp_path):
    torch.set_num_threads(1)
    model = make_tiny_llama(layers=2, seed=1)
    grid = headscores.Grid(lengths=(260, 300), depths=(0, 50), min_f1=-1.0)  # accept every test
    out = tmp_path / "scores.json"
    lines = []
    headscores.detect(model, tiny_tokenizer, frozenset({257}), ["The sky is blue. The sea is deep."], grid, out,
                      {"model": "tiny"}, log=lines.append)
    table = json.loads(out.read_text().splitlines()[0])
    assert list(table) == [f"{l}-{h}" for l in range(2) for h in range(4)]  # layer-major, per query head
    assert all(len(v) == 8 for v in table.values())  # 2 needles x 2 lengths x 2 depths, all accepted
    assert len(lines) == 9 and not out.with_name(out.name + ".partial.jsonl").exists()
    loaded = headtables.read(out, "retrieval_reasoning")
    assert loaded.scores.shape == (2, 4) and loaded.meta["accepted"] == 8
    # an interrupted run resumes: a partial file with one finished test is not redone
    out2 = tmp_path / "again.json"
    record = {"test": "0:260:0", "f1": 100.0, "response": "x", "scores": [[1.0] * 4, [2.0] * 4]}
    out2.with_name(out2.name + ".partial.jsonl").write_text(json.dumps(record) + "\n" + '{"test": "torn')
    lines.clear()
    headscores.detect(model, tiny_tokenizer, frozenset({257}), ["The sky is blue."], grid, out2, {}, log=lines.append)
    assert len(lines) == 8  # 7 tests run, one summary
    assert json.loads(out2.read_text())["0-0"][0] == 1.0
    with pytest.raises(InputError, match="no test was answered"):
        headscores.detect(model, tiny_tokenizer, frozenset({257}), ["x."], headscores.Grid((260,), (0,), 101.0),
                          tmp_path / "none.json", {}, log=lambda _: None)


# ---- through the engine and the runner ----------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
def test_engine_keeps_cap_plus_window_per_head(tmp_path, granularity):
    torch.set_num_threads(1)
    model = make_tiny_llama(layers=2, seed=5).to(torch.float64)
    table = {f"{l}-{h}": [float((3 * l + 5 * h) % 7 + 1)] for l in range(2) for h in range(4)}
    method = build("headkv", {"scores": str(write_scores(tmp_path / "s.json", table))}).method
    n = 100
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(3)).tolist()
    prompt = Prompt(ids=tuple(ids), question_start=n, n_original_tokens=n, truncated=False, max_new_tokens=4,
                    stop_ids=frozenset())
    budget = Budget(ratio=0.3)  # C = 30, official B = 22
    gen = Engine(model, StubTokenizer()).run(prompt, [Plan("headkv", method, budget, granularity)]).generations[0]
    caps = headkv_caps(torch.tensor([[(3 * l + 5 * h) % 7 + 1 for h in range(4)] for l in range(2)], dtype=torch.float64),
                       22, 1.01)
    for layer, sel in enumerate(gen.kept_indices):
        want = caps[layer] if granularity == "query_head" else group_mean_caps(caps[layer], 2)
        assert sel.lengths.tolist() == [min(int(c), n - 8) + 8 for c in want]
    assert gen.cache_bytes == sum(sel.n_entries for sel in gen.kept_indices) * 2 * 16 * 8


def test_scores_sha_in_fingerprint_and_manifest(tmp_path, monkeypatch, tiny_model_dir, tiny_data_dir, capsys):
    from test_reliability import cli, run_args

    from kvbench import models

    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    identity = models.model_identity(models.resolve_model(str(tiny_model_dir)))
    path = headtables.default_path("retrieval_reasoning", identity)
    path.parent.mkdir(parents=True)
    write_scores(path, {f"{l}-{h}": [float(l + h + 1)] for l in range(2) for h in range(4)})
    args = run_args(tiny_model_dir, tiny_data_dir, tmp_path / "r", "--limit", "1")
    args[args.index("fullkv,snapkv")] = "headkv"
    code, _, err = cli(args, capsys)
    assert code == 0, err
    manifest = json.loads(next((tmp_path / "r").rglob("manifests/*.json")).read_text())
    sha = headtables.read(path, "retrieval_reasoning").sha256
    assert manifest["plans"][0]["artifacts"] == {"retrieval_reasoning": sha}
    method = build("headkv").method
    method.bind_model(identity, "tiny")
    plan = Plan("headkv", method, Budget(ratio=0.5))
    assert runner.config_fields(plan, "full")["artifacts"] == {"retrieval_reasoning": sha}
    write_scores(path, {f"{l}-{h}": [float(l * h + 1)] for l in range(2) for h in range(4)})
    other = build("headkv").method
    other.bind_model(identity, "tiny")
    assert runner.config_fields(Plan("headkv", other, plan.budget), "full") != runner.config_fields(plan, "full")
    path.unlink()
    code, _, err = cli(args, capsys)  # rows done: nothing to run, but a missing table is refused first
    assert code == 2 and "run `kvbench headscores --model" in err


def test_accumulator_equals_a_hand_computation_over_eager_attention_rows(tiny_tokenizer):
    """methods-2 §2.21 parity (iii): run_test's per-head totals equal the sum, over the decoding steps, of the
    reference rule applied by plain loops to the eager attention rows of the same forwards."""
    from transformers import DynamicCache

    from kvbench.engine import attention

    torch.set_num_threads(1)
    model = make_tiny_llama(layers=2, seed=9).to(torch.float64)
    hay = tiny_tokenizer.encode("The sky is blue. The sea is deep. " * 20, add_special_tokens=False)
    needle = headscores.Needle(" Ana is 7 and likes kites; Bo is 9 and likes drums. ", "Who is older?", "drums now")
    ids, start, stop = headscores.build_test(tiny_tokenizer, hay, headscores.sentence_ends(tiny_tokenizer, hay),
                                             needle, 420, 40)
    _, total = headscores.run_test(model, tiny_tokenizer, frozenset(), ids, start, stop, needle.answer)
    answer_tokens = len(tiny_tokenizer.encode(needle.answer, add_special_tokens=False))
    n = stop - start
    want = [[0.0] * 4 for _ in range(2)]
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([ids[:-1]]), past_key_values=cache)
            token, position, steps = ids[-1], len(ids) - 1, 0
            while steps < answer_tokens:
                out = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[position]]),
                            past_key_values=cache, output_attentions=True)
                for layer, probs in enumerate(out.attentions):
                    for head in range(4):
                        row = probs[0, head, -1].tolist()
                        top = sorted(range(len(row)), key=lambda j: -row[j])[:n]
                        want[layer][head] += sum(10 * row[j] / (n * answer_tokens) for j in top if start <= j < stop)
                token, position, steps = int(out.logits[0, -1].argmax()), position + 1, steps + 1
                if "\n" in tiny_tokenizer.decode([token]):
                    break
    finally:
        attention.install(model)
    assert torch.allclose(total, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-6)
    assert float(total.sum()) > 0  # the needle is attended somewhere: not a comparison of zeros
