"""Ada-KV (methods-2 §2.13): the official allocation on hand-made score matrices whose caps are worked out by
hand below; kvpress's safeguarded allocation against a plain-Python reference of its steps; the wrapper's
configuration (presets, inner.<param>, errors); and runs through the engine, where heads keep different real
lengths and the layer holds exactly H k entries (the bytes of the inner method at the same budget)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_tiny_llama
from test_engine_ragged import StubTokenizer

from kvbench import runner
from kvbench.engine import Engine, Plan
from kvbench.errors import InputError
from kvbench.methods import build
from kvbench.methods.base import Budget, HeadRanking
from kvbench.methods.head_budgets import keep_top_caps, kvpress_allocation, official_caps
from kvbench.prompts import Prompt


def window_ranking(prefix: list[list[float]], window: int, kept: int) -> HeadRanking:
    return HeadRanking.with_window(torch.tensor(prefix, dtype=torch.float32), len(prefix[0]) + window, kept)


# ---- official allocation: hand-derived caps -----------------------------------------------------------------
# Three heads, a prefix of 10 tokens, B = 5 (so H B = 15), alpha = 0.2. The 15 largest scores are head 0's
# seven values >= 0.94, head 1's six values 0.88 .. 0.93 and head 2's 0.87 and 0.86: c = [7, 6, 2].
# floor = int(5 * 0.2) = 1; cap = round(0.8 c + 1) = round([6.6, 5.8, 2.6]) = [7, 6, 3]: 16 entries, one more
# than H B = 15 (the official rounding does not preserve the total).
HAND = [
    [1.00, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.10, 0.09, 0.08],
    [0.93, 0.92, 0.91, 0.90, 0.89, 0.88, 0.07, 0.06, 0.05, 0.04],
    [0.87, 0.86, 0.03, 0.02, 0.01, 0.009, 0.008, 0.007, 0.006, 0.005],
]


def test_official_caps_hand_derived():
    caps = official_caps(torch.tensor(HAND), 5, 0.2, normalize=False)
    assert caps.tolist() == [7, 6, 3]
    # alpha = 0.5: floor = int(2.5) = 2; 0.5 c + 2 = [5.5, 5.0, 3.0] -> half to even: [6, 5, 3]
    assert official_caps(torch.tensor(HAND), 5, 0.5, normalize=False).tolist() == [6, 5, 3]
    # alpha = 0: the unconstrained counts; alpha = 1: everyone gets B
    assert official_caps(torch.tensor(HAND), 5, 0.0, normalize=False).tolist() == [7, 6, 2]
    assert official_caps(torch.tensor(HAND), 5, 1.0, normalize=False).tolist() == [5, 5, 5]


def test_official_caps_half_to_even():
    # Two heads, B = 3, alpha = 0.5, floor = int(1.5) = 1. Head 0 holds all six of the top 2 B: c = [6, 0]
    # -> 0.5 * 6 + 1 = 4.0 and 0.5 * 0 + 1 = 1.0. Head 0 five of six: c = [5, 1] -> 3.5 -> 4 (even), 1.5 -> 2.
    scores = torch.tensor([[9.0, 8, 7, 6, 5, 4, 0.3], [0.5, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02]])
    assert official_caps(scores, 3, 0.5, normalize=False).tolist() == [4, 1]
    scores[1, 0] = 4.5  # now above head 0's 4: c = [5, 1]
    assert official_caps(scores, 3, 0.5, normalize=False).tolist() == [4, 2]
    scores[1, :2] = torch.tensor([5.7, 5.5])  # both above head 0's 5: c = [4, 2] -> [3.0, 2.0]: 5 entries for H B = 6
    assert official_caps(scores, 3, 0.5, normalize=False).tolist() == [3, 2]


def test_official_caps_normalize_moves_budget_to_peaked_heads():
    # B = 2. Head 0 is flat [3, 2.9, 2.8, 2.7]: unnormalised it holds the whole top 4, c = [4, 0].
    # normalize: r_0 = 5.9 / 11.4 -> [1.5526, 1.5009, 1.4491, 1.3974]; head 1 [2.5, .1, .1, .1], r_1 = 2.6 / 2.8
    # -> [2.3214, .0929, ...]; top 4 = 2.3214, 1.5526, 1.5009, 1.4491: c = [3, 1].
    # alpha 0.2: floor = int(0.4) = 0, caps = round(0.8 c): [3.2, 0] -> [3, 0] and [2.4, 0.8] -> [2, 1].
    scores = torch.tensor([[3.0, 2.9, 2.8, 2.7], [2.5, 0.1, 0.1, 0.1]])
    assert official_caps(scores, 2, 0.2, normalize=False).tolist() == [3, 0]
    assert official_caps(scores, 2, 0.2, normalize=True).tolist() == [2, 1]


def test_official_selection_keeps_each_heads_top_cap_plus_the_window():
    ranking = window_ranking(HAND, window=2, kept=7)  # B = 7 - 2 = 5
    sel = keep_top_caps(ranking, official_caps(ranking.scores[:, :10], 5, 0.2, normalize=False))
    window = [10, 11]
    assert [r.tolist() for r in sel.rows()] == [list(range(7)) + window, list(range(6)) + window, [0, 1, 2] + window]
    assert sel.lengths.tolist() == [9, 8, 5]


def test_caps_above_the_prefix_are_truncated():
    ranking = window_ranking([[0.3, 0.2, 0.1], [0.6, 0.5, 0.4]], window=1, kept=3)
    sel = keep_top_caps(ranking, torch.tensor([5, 0]))
    assert [r.tolist() for r in sel.rows()] == [[0, 1, 2, 3], [3]]


# ---- kvpress allocation against a plain-Python reference ----------------------------------------------------
def kvpress_reference(scores: list[list[float]], protected: set[int], kept: int, alpha: float) -> list[list[int]]:
    """adakv_press.py L54-81 step by step: protected tokens above everything (SnapKV's max + 1), each head's
    n_safe best forced, then the layer's H * kept best entries."""
    heads, n = len(scores), len(scores[0])
    s = [[float("inf") if j in protected else scores[h][j] for j in range(n)] for h in range(heads)]
    n_safe = int(kept * alpha)
    if alpha > 0:
        n_safe = max(1, n_safe) if kept > 0 else 0
    for h in range(heads):
        for j in sorted(range(n), key=lambda j: (-s[h][j], j))[:n_safe]:
            s[h][j] = float("inf")
    flat = sorted(((s[h][j], h, j) for h in range(heads) for j in range(n)), key=lambda e: (-e[0], e[1], e[2]))
    kept_entries = flat[: heads * kept]
    return [sorted(j for _, hh, j in kept_entries if hh == h) for h in range(heads)]


@pytest.mark.parametrize("seed", range(6))
def test_kvpress_allocation_matches_reference(seed):
    rng = random.Random(seed)
    heads, n, window = rng.choice([(2, 30), (4, 50), (8, 41)]) + (rng.choice([0, 3, 8]),)
    # head-dependent scales make the allocation uneven
    scores = [[rng.random() ** (1 + 3 * h) for _ in range(n - window)] for h in range(heads)]
    kept = rng.randint(window + 1, n - 1)
    alpha = rng.choice([0.0, 0.2, 0.5, 1.0])
    ranking = window_ranking(scores, window, kept)
    got = [r.tolist() for r in kvpress_allocation(ranking, alpha).rows()]
    assert got == kvpress_reference(ranking.scores.tolist(), set(range(n - window, n)), kept, alpha)
    assert sum(len(r) for r in got) == heads * kept
    assert all(len(r) >= max(window, int(kept * alpha)) for r in got)


# ---- configuration --------------------------------------------------------------------------------------------
def test_presets_and_inner_params():
    assert build("snapkv_adakv").method.inner == "snapkv"
    pyr = build("pyramidkv_adakv").method.params()["inner_params"]
    assert pyr == {"gqa_reduce": "mean", "position_mode": "original", "window_size": 8, "kernel_size": 7,
                   "pooling": "max", "beta": 20}
    official = build("snapkv_adakv_official").method
    assert (official.variant, official.inner_method.window_size) == ("official", 32)
    kcf = build("snapkv_adakv_kcf").method
    assert (kcf.variant, kcf.normalize, kcf.inner_method.window_size) == ("official", True, 8)
    tuned = build("snapkv_adakv", {"window_size": "16", "alpha": "0.5", "gqa_reduce": "max"}).method
    assert tuned.params()["inner_params"]["window_size"] == 16 and tuned.alpha == 0.5
    assert tuned.gqa_reduce == tuned.inner_method.gqa_reduce == "max"  # the inner method's, mirrored
    assert tuned.scorer_key() == build("snapkv", {"window_size": "16", "gqa_reduce": "max"}).method.scorer_key()
    assert build("adakv", {"inner": "knorm"}).method.query_head_selection() is False


def test_inner_code_version_is_the_inner_configurations():
    # causal h2o_prefill's sums moved code version; its non-causal preset did not (H2OPrefill.code_version), and
    # a wrapper's configuration records the version of the inner configuration it wraps, not of its class
    causal = build("adakv", {"inner": "h2o_prefill"}).method
    factory = build("adakv", {"inner": "h2o_factory_2024"}).method
    assert causal.params()["inner_version"] == build("h2o_prefill").method.code_version() > 2
    assert factory.params()["inner_version"] == build("h2o_factory_2024").method.code_version() == 2
    assert "inner_version" not in build("adakv", {"inner": "knorm"}).method.params()  # knorm is at version 1


@pytest.mark.parametrize("overrides, message", [
    ({"inner": "chunkkv"}, "does not keep the top of a per-token ranking"),
    ({"inner": "snapkv_adakv"}, "does not keep the top of a per-token ranking"),
    ({"inner": "snapkvv"}, "unknown method 'snapkvv'"),
    ({"window": "4"}, "adakv (over snapkv) has no parameter 'window'"),
    ({"window_size": "four"}, "window_size=four: snapkv.window_size expects int"),
    ({"variant": "kcf"}, "variant must be kvpress or official"),
    ({"alpha": "1.5"}, "alpha must be in [0, 1]"),
    ({"normalize": "true"}, "normalize applies to variant=official only"),
])
def test_bad_configurations(overrides, message):
    with pytest.raises(InputError) as err:
        build("adakv", overrides)
    assert message in str(err.value)


def test_method_args_reach_the_inner_method_through_the_runner():
    plans = runner.build_plans(runner.RunOptions(methods=('knorm', 'snapkv_adakv'), method_args={"kernel_size": "5"}))
    assert plans[1].method.inner_method.kernel_size == 5
    with pytest.raises(InputError, match="no selected method has a parameter 'alpha'"):
        runner.build_plans(runner.RunOptions(methods=('snapkv',), method_args={"alpha": "0.5"}))


# ---- through the engine ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["snapkv_adakv", "pyramidkv_adakv", "snapkv_adakv_official", "snapkv_adakv_kcf"])
def test_engine_stores_real_per_head_lengths(name):
    torch.set_num_threads(1)
    model = make_tiny_llama(layers=3, seed=2).to(torch.float64)
    n = 120
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(4)).tolist()
    prompt = Prompt(ids=tuple(ids), question_start=n, n_original_tokens=n, truncated=False, max_new_tokens=6,
                    stop_ids=frozenset())
    inner = "pyramidkv" if name.startswith("pyramidkv") else "snapkv"
    budget = Budget(ratio=0.3)
    plans = [Plan(name, build(name).method, budget), Plan(inner, build(inner).method, budget)]
    runs = {mode: Engine(model, StubTokenizer(), decode=mode).run(prompt, plans) for mode in ("sequential", "batched")}
    ada, plain = runs["sequential"].generations
    assert ada.token_ids == runs["batched"].generations[0].token_ids
    assert any(len(set(sel.lengths.tolist())) > 1 for sel in ada.kept_indices), "no head got a different budget"
    entry = 2 * 16 * 8  # K and V, head_dim 16, float64
    if name in ("snapkv_adakv", "pyramidkv_adakv"):  # kvpress variant: each layer holds exactly H k entries
        assert ada.cache_bytes == plain.cache_bytes
        for sel, kept in zip(ada.kept_indices, plain.kept_per_layer):
            assert sel.n_entries == 2 * kept
    else:  # official: per layer H w + sum of caps, within the rounding of H B
        for sel, kept in zip(ada.kept_indices, plain.kept_per_layer):
            assert abs(sel.n_entries - 2 * kept) <= 2
    assert ada.cache_bytes == sum(sel.n_entries for sel in ada.kept_indices) * entry
    assert ada.cache_bytes_allocated > ada.cache_bytes
