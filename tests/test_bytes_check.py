"""scripts/bytes_check.py's predictions (issue #14: rows' cache_bytes within 1% of methods-2 §1.8), checked
against numbers derived by hand, not against kvbench's own storage formula: §2.18's worked KIVI examples, a
ThinK head worked out below, and the budget rules of the head-adaptive and decoding-time methods. The script
itself runs a real LongBench sample (slow; its output is quoted in the issue's report)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvbench.methods import build

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bytes_check.py"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("bytes_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n, bits, keys, values", [(7500, 2, 375_808, 386_624), (7500, 4, 613_376, 622_528),
                                                    (750, 2, 58_880, 62_624)])
def test_kivi_bytes_reproduce_the_worked_examples(check, n, bits, keys, values):
    """methods-2 §2.18's table: d = 128, G = 32, R = 128, fp16."""
    method = build(f"kivi{bits}").method
    assert check.kivi_bytes(n, 128, 128, 2, method) == keys + values


def test_think_bytes_by_hand(check):
    # d = 64, lambda 0.4 -> p = 25 pruned channels; k = 100 kept, recent 32, fp32: keys 68 x 39 x 4 + 32 x 64 x 4
    # = 10,608 + 8,192; values 100 x 64 x 4 = 25,600; mask 64 bits = 8 bytes
    assert check.think_bytes(100, 64, 64, 4, build("think").method) == 10_608 + 8_192 + 25_600 + 8
    assert check.think_bytes(100, 64, 64, 4, build("think", {"pruning_ratio": "0.01"}).method) == 100 * 128 * 4


def test_every_new_method_has_a_prediction(check):
    """The sweep's methods build, and each resolves to the rule the docstring gives it (SmolLM2's shape)."""
    config = SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, num_attention_heads=9, head_dim=64,
                             hidden_size=576)
    t, entry = 2000, 2 * 64 * 4
    row = {"granularity": "kv_head", "prefilled_tokens": t, "ratio": 0.1, "budget_tokens": None,
           "full_cache_bytes": 30 * 3 * t * entry}
    uniform = 30 * 3 * 200 * entry
    for name in ("criticalkv", "expected_attention", "keydiff", "block_keydiff", "lagkv", "observed_attention",
                 "snapkv_adakv", "expected_attention_adakv", "critical_adakv"):
        assert check.predicted_bytes(row, config, build(name).method) == uniform, name
    assert check.predicted_bytes(row, config, build("decoding").method) == row["full_cache_bytes"]
    full_row = {**row, "ratio": 1.0}
    assert check.predicted_bytes(full_row, config, build("kivi4").method) == \
        90 * check.kivi_bytes(t, 64, 64, 4, build("kivi4").method)
    assert check.predicted_bytes(row, config, build("snapkv+kivi2").method) == \
        90 * check.kivi_bytes(200, 64, 64, 4, build("kivi2").method)
    query_head = {**row, "granularity": "query_head"}
    assert check.predicted_bytes(query_head, config, build("keydiff").method) == 3 * uniform
    assert set(check.NEW + check.HEADWISE) >= {"criticalkv", "expected_attention", "keydiff", "block_keydiff",
                                                "think", "lagkv", "observed_attention", "headkv", "duo_attention",
                                                "kivi2", "kivi4", "snapkv+kivi4", "decoding", "snapkv_adakv",
                                                "critical_adakv"}
