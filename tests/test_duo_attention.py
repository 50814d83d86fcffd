"""DuoAttention (proxy) (methods-2 §2.19): which heads stream under both allocations, what a streaming head
keeps, the proxy pattern's invariants, the pattern file's round trip, and a run through the engine whose
bytes are exactly what the pattern predicts. (kvpress parity: tests/test_kvpress_parity_headwise.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_llama
from test_engine_ragged import StubTokenizer

from kvbench import headtables
from kvbench.engine import Engine, Plan
from kvbench.errors import InputError
from kvbench.methods import build
from kvbench.methods.base import Budget, SelectContext, Selection
from kvbench.methods.duo_attention import streaming_count, streaming_heads
from kvbench.prompts import Prompt

PATTERN = torch.tensor([[0.9, 0.1], [0.4, 0.7], [0.2, 0.05]], dtype=torch.float64)  # 3 layers x 2 KV heads


def pattern_file(tmp_path, scores=PATTERN):
    path = tmp_path / "full_attention_heads.tsv"
    headtables.write(path, "duo_proxy", scores, {"test": True})
    return path


def ctx(layer: int, n_tokens: int, kept: int) -> SelectContext:
    return SelectContext(layer=layer, n_layers=3, n_tokens=n_tokens, kept=kept, scores=None,
                         keys=torch.zeros(2, n_tokens, 4), n_kv_heads=2, group=2)


def test_streaming_heads_are_the_lowest_globally():
    # ascending: (2,1) .05, (0,1) .1, (2,0) .2, (1,0) .4, (1,1) .7, (0,0) .9
    assert streaming_heads(PATTERN, 3).tolist() == [[False, True], [False, False], [True, True]]
    assert streaming_heads(torch.tensor([[1.0, 1.0], [1.0, 0.5]]), 2).tolist() == [[True, False], [False, True]]


def test_budget_allocation_is_the_fewest_heads_that_fit():
    # 6 heads, T = 1000, sink + recent = 100: each streaming head saves 900 entries. Budget k = 500 per head:
    # 6 (1000 - 500) = 3000 to save -> ceil(3000 / 900) = 4 heads.
    assert streaming_count(6, 1000, 500, 64, 36) == 4
    assert streaming_count(6, 1000, 1000, 64, 36) == 0
    assert streaming_count(6, 1000, 10, 64, 36) == 6  # even all streaming keeps more than the budget
    assert streaming_count(6, 90, 10, 64, 36) == 0  # nothing to evict when T <= sink + recent


def test_select_keeps_sink_and_recent_in_streaming_heads(tmp_path):
    method = build("duo_attention", {"pattern": str(pattern_file(tmp_path)), "sink": "4", "recent": "6"}).method
    kept = {layer: method.select(ctx(layer, 50, 25)) for layer in range(3)}
    # k = 25: 6 x 25 = 150 to save, 40 per streaming head -> ceil(3.75) = 4: (2,1), (0,1), (2,0), (1,0)
    local = list(range(4)) + list(range(44, 50))
    assert [r.tolist() for r in kept[0].rows()] == [list(range(50)), local]
    assert [r.tolist() for r in kept[1].rows()] == [local, list(range(50))]
    assert [r.tolist() for r in kept[2].rows()] == [local, local]
    ratio = build("duo_attention", {"pattern": str(pattern_file(tmp_path)), "sink": "4", "recent": "6",
                                    "allocation": "head_ratio", "head_ratio": "0.5"}).method
    kept = [Selection.of(ratio.select(ctx(layer, 50, 25))) for layer in range(3)]  # round(6 x 0.5) = 3 stream
    assert sum(sel.n_entries for sel in kept) == 3 * 50 + 3 * 10


def test_pattern_errors(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("0.1\t0.2\n0.3\n")
    with pytest.raises(InputError, match="one value per KV head"):
        build("duo_attention", {"pattern": str(bad)})
    method = build("duo_attention", {"pattern": str(pattern_file(tmp_path))}).method
    with pytest.raises(InputError, match="3 x 2 heads; the model has 2 layers x 2 heads"):
        method.select(SelectContext(layer=0, n_layers=2, n_tokens=500, kept=50, scores=None,
                                    keys=torch.zeros(2, 500, 4), n_kv_heads=2, group=2))
    with pytest.raises(InputError, match="--method duo_attention"):
        build("duo_attention").method.bind_model("dir-config-sha256:nowhere", "m")
    assert build("duoattention").method.name == "duo_attention"


def test_proxy_pattern_invariants():
    from kvbench.duo_patterns import proxy_pattern, text_scores

    torch.set_num_threads(1)
    model = make_tiny_llama(layers=2, seed=4)
    texts = [torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(2)]
    pattern = proxy_pattern(model, texts, q_len=64)
    assert pattern.shape == (2, 2)
    # the area under a CDF over 64 positions lies in [1/64, 1]
    assert bool(((pattern >= 1 / 64 - 1e-6) & (pattern <= 1 + 1e-6)).all())
    mean = (text_scores(model, texts[0], 64) + text_scores(model, texts[1], 64)) / 2
    assert torch.allclose(pattern, mean)


def test_engine_bytes_follow_the_pattern(tmp_path):
    torch.set_num_threads(1)
    model = make_tiny_llama(layers=3, seed=6).to(torch.float64)
    method = build("duo_attention", {"pattern": str(pattern_file(tmp_path)), "sink": "4", "recent": "8"}).method
    n = 90
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(8)).tolist()
    prompt = Prompt(ids=tuple(ids), question_start=n, n_original_tokens=n, truncated=False, max_new_tokens=5,
                    stop_ids=frozenset())
    budget = Budget(ratio=0.4)  # k = 36: 6 x 54 = 324 to save, 78 per head -> 5 streaming heads
    gen = Engine(model, StubTokenizer()).run(prompt, [Plan("duo_attention", method, budget)]).generations[0]
    streaming = math.ceil(6 * (n - 36) / (n - 12))
    assert streaming == 5
    entries = streaming * 12 + (6 - streaming) * n
    assert sum(sel.n_entries for sel in gen.kept_indices) == entries
    assert gen.cache_bytes == entries * 2 * 16 * 8
    assert entries <= 6 * 36  # within the budget
