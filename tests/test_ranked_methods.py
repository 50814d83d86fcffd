"""`ranked` methods (kvbench.methods.base.Method.ranked): Ada-KV and HeadKV reallocate a method's budget by its
`ranking()`, which is only right if the method's own `select()` keeps exactly the top of that ranking. For every
registered ranked method, on a seeded tiny Llama through the engine, select() must equal the protected tokens
plus the best (kept - protected) of the others by ranking()'s scores (ties: the earlier token, the rule of
topk_sorted); methods that select otherwise must not claim it. Then Ada-KV over each of the newly ranked methods
(issue #14) and CriticalAdaKV's allocation on a hand-derived score matrix."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from test_engine_ragged import StubTokenizer

from kvbench.engine import Engine, Plan
from kvbench.errors import InputError
from kvbench.methods import METHODS, build
from kvbench.methods.base import Budget, HeadRanking, Selection, topk_sorted
from kvbench.methods.head_budgets import critical_allocation
from kvbench.prompts import Prompt

RANKED = [name for name, cls in METHODS.items() if cls.ranked]
N_TOKENS = 120


def prompt(n: int = N_TOKENS, seed: int = 4) -> Prompt:
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return Prompt(ids=tuple(ids), question_start=n, n_original_tokens=n, truncated=False, max_new_tokens=2,
                  stop_ids=frozenset())


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return make_tiny_llama(layers=3, seed=2)


def top_of_ranking(ranking: HeadRanking) -> list[list[int]]:
    """Per head: the protected tokens plus the best (kept - protected) others, ascending."""
    free = (~ranking.protected).nonzero().flatten()
    always = ranking.protected.nonzero().flatten()
    best = topk_sorted(ranking.scores[:, free], ranking.kept - always.numel())
    return [sorted(free[row].tolist() + always.tolist()) for row in best]


def test_the_ranked_set():
    assert {"snapkv", "pyramidkv", "h2o_prefill", "knorm", "expected_attention", "keydiff", "lagkv",
            "observed_attention"} <= set(RANKED)
    # two rankings (criticalkv), whole chunks (chunkkv), a block loop (block_keydiff), per-head caps (headkv)
    assert not {"criticalkv", "critical_adakv", "chunkkv", "block_keydiff", "headkv"} & set(RANKED)


@pytest.mark.parametrize("name", RANKED)
@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_select_keeps_the_top_of_its_ranking(model, name, ratio):
    method = build(name).method
    compared = []
    select = method.select

    def checked(ctx):
        chosen = select(ctx)
        ranking = method.ranking(ctx)
        assert ranking is not None, f"{name} claims ranked but gave no ranking at layer {ctx.layer}"
        assert not isinstance(chosen, Selection)
        assert [row.tolist() for row in chosen] == top_of_ranking(ranking), (name, ctx.layer)
        compared.append(ctx.layer)
        return chosen

    method.select = checked
    Engine(model, StubTokenizer()).run(prompt(), [Plan(name, method, Budget(ratio=ratio))])
    assert compared == [0, 1, 2]


# LagKV's within-partition ranks give every head the same multiset of scores, so Ada-KV could only move budget
# through ties; its raw cross-partition scores (cross_scoring, which kvpress's docstring names for AdaKV) with
# partitions short enough for this prompt are what a head-adaptive LagKV uses.
INNER_ARGS = {"lagkv": {"lag_size": "16", "cross_scoring": "true"}}


@pytest.mark.parametrize("inner", ["expected_attention", "keydiff", "lagkv", "observed_attention"])
def test_adakv_over_the_new_ranked_methods_keeps_the_layer_budget(model, inner):
    budget = Budget(ratio=0.3)
    args = INNER_ARGS.get(inner, {})
    if inner == "expected_attention":
        ada = build("expected_attention_adakv").method
    else:
        ada = build("adakv", {"inner": inner, **args}).method
    assert ada.inner_method.name == inner and ada.head_adaptive
    plans = [Plan("ada", ada, budget), Plan(inner, build(inner, args).method, budget)]
    ours, plain = Engine(model, StubTokenizer()).run(prompt(), plans).generations
    kept = budget.kept(N_TOKENS)
    for sel in ours.kept_indices:
        assert sel.n_entries == 2 * kept  # H k entries per layer: the bytes of the inner method
    assert ours.cache_bytes == plain.cache_bytes
    assert any(len(set(sel.lengths.tolist())) > 1 for sel in ours.kept_indices), "no head got another budget"


def test_adakv_refuses_unranked_inner_methods():
    for inner in ("criticalkv", "block_keydiff", "chunkkv"):
        with pytest.raises(InputError, match=f"inner method {inner} does not keep the top"):
            build("adakv", {"inner": inner})


# ---- CriticalAdaKV's allocation, worked out by hand ----------------------------------------------------------
# Two heads, six tokens, nothing protected, kept = 2 (layer total 4), alpha = 0 (no safeguard), rho = 0.5,
# epsilon = 0. The 4 best scores are head 0's 0.9, 0.8, 0.7 and head 1's 0.6: budgets b = [3, 1].
# Stage 1: int(3 x 0.5) = 1 -> head 0 forces token 0; int(0.5) = 0 for head 1.
# Stage 2, s x u: head 0 [0.9, 0.8, 0.07, 1.0, 0.05, 0] -> tokens 3 and 1 join token 0; head 1
# [0.6, 0.2, 0.15, 0.12, 0.11, 1.0] -> token 5 (its attention alone would have kept token 0).
def test_critical_allocation_hand_derived():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.05, 0.0], [0.6, 0.2, 0.15, 0.12, 0.11, 0.01]])
    norms = torch.tensor([[1, 1, 0.1, 10, 1, 1], [1, 1, 1, 1, 1, 100.0]])
    sel = critical_allocation(HeadRanking.plain(scores, 2), norms, alpha=0.0, epsilon=0.0, first_stage_ratio=0.5)
    assert [row.tolist() for row in sel.rows()] == [[0, 1, 3], [5]]
    # rho = 1: stage 1 takes all of each head's budget by attention alone
    sel = critical_allocation(HeadRanking.plain(scores, 2), norms, alpha=0.0, epsilon=0.0, first_stage_ratio=1.0)
    assert [row.tolist() for row in sel.rows()] == [[0, 1, 2], [0]]
    # alpha = 0.5: n_safe = 1 per head forces head 1's token 0 in; the 4 best are then head 1's token 0 and
    # head 0's 0.9, 0.8, 0.7 -> b = [3, 1] again, and head 1's one slot is its forced token 0
    sel = critical_allocation(HeadRanking.plain(scores, 2), norms, alpha=0.5, epsilon=0.0, first_stage_ratio=0.5)
    assert [row.tolist() for row in sel.rows()] == [[0, 1, 3], [0]]


def test_critical_adakv_through_the_engine(model):
    budget = Budget(ratio=0.3)
    plans = [Plan("critical_adakv", build("critical_adakv").method, budget),
             Plan("snapkv", build("snapkv").method, budget)]
    ours, snap = Engine(model, StubTokenizer()).run(prompt(), plans).generations
    kept = budget.kept(N_TOKENS)
    window = range(N_TOKENS - 8, N_TOKENS)
    for sel in ours.kept_indices:
        assert sel.n_entries == 2 * kept
        assert all(set(window) <= set(row.tolist()) for row in sel.rows())  # the whole window, every head
    assert ours.cache_bytes == snap.cache_bytes
    assert any(len(set(sel.lengths.tolist())) > 1 for sel in ours.kept_indices)


@pytest.mark.parametrize("name", ["expected_attention", "expected_attention_adakv", "criticalkv", "critical_adakv"])
def test_scorers_reading_the_module_or_rope_run_at_query_head_alone(name):
    """The query-head view must carry the attention module (o_proj: CriticalKV) and the model's RoPE (Expected
    Attention) as the kv_head view does; a run of the method alone at query_head stores g x the kv_head bytes."""
    model = make_tiny_llama(layers=2, seed=11)
    runs = {g: Engine(model, StubTokenizer()).run(prompt(80), [Plan(name, build(name).method, Budget(ratio=0.25), g)])
            for g in ("kv_head", "query_head")}
    kv, qh = (runs[g].generations[0] for g in ("kv_head", "query_head"))
    assert qh.cache_bytes == 2 * kv.cache_bytes  # g = 4 / 2
