"""Prefill-once methods: snapkv, pyramidkv, chunkkv, h2o_prefill, random, knorm, and the presets that
reproduce published baselines (h2o_factory_2024, chunkkv_paper).

Every selection is checked against a reference written here from the formula in docs/methods.md with plain
Python loops and an explicit softmax in float64 (none of the methods' helpers), on small random tensors with
GQA groups 1, 3 and 7. Then end to end through the engine on tiny random Llama (6/2 heads) and Qwen2 (14/2
heads, like Qwen2.5-0.5B) models."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kvbench.engine import attention
from kvbench.errors import InputError
from kvbench.engine import Engine, Plan, PrefillObserver, cache_layers, make_cache, sample_seed
from kvbench.engine.compress import compress
from kvbench.methods import build
from kvbench.methods.base import Budget, LayerView, SelectContext
from kvbench.methods.chunkkv import ChunkKV
from kvbench.methods.h2o_prefill import H2OPrefill, noncausal_column_sums
from kvbench.methods.knorm import KNorm
from kvbench.methods.pyramidkv import PyramidKV, pyramid_budgets
from kvbench.methods.random import RandomKeep
from kvbench.methods.snapkv import SnapKV
from kvbench.prompts import Prompt

GQA = [(4, 4), (6, 2), (14, 2)]  # (query heads, KV heads): groups 1, 3 and 7


# ---- naive references ------------------------------------------------------------------------------------
def rand_view(h_q: int, h_kv: int, t: int, d: int = 8, seed: int = 0, layer: int = 0, n_layers: int = 1) -> LayerView:
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(h_q, t, d, generator=g) * 1.5
    keys = torch.randn(h_kv, t, d, generator=g) * 1.5
    values = torch.randn(h_kv, t, d, generator=g)
    return LayerView(layer=layer, n_layers=n_layers, query=query, keys=keys, values=values, scaling=d**-0.5)


def ctx_for(view: LayerView, kept: int, scores, layer: int = 0, n_layers: int = 1, seed: int = 0, previous=None):
    return SelectContext(
        layer=layer,
        n_layers=n_layers,
        n_tokens=view.n_tokens,
        kept=kept,
        scores=scores,
        keys=view.keys,
        n_kv_heads=view.keys.shape[0],
        group=view.group,
        previous=previous,
        seed=seed,
    )


def ref_attention_row(view: LayerView, head: int, i: int) -> list[float]:
    """Causal softmax row of query i of query head `head` over all T keys (zeros beyond i), float64."""
    q = view.query[head].double().tolist()
    k = view.keys[head // view.group].double().tolist()
    logits = [sum(a * b for a, b in zip(q[i], k[j])) * view.scaling for j in range(i + 1)]
    top = max(logits)
    e = [math.exp(x - top) for x in logits]
    total = sum(e)
    return [x / total for x in e] + [0.0] * (view.n_tokens - i - 1)


def ref_unmasked_row(view: LayerView, head: int, i: int) -> list[float]:
    """Softmax row of query i of query head `head` over ALL T keys, future ones included, float64."""
    q = view.query[head].double().tolist()
    k = view.keys[head // view.group].double().tolist()
    logits = [sum(a * b for a, b in zip(q[i], k[j])) * view.scaling for j in range(view.n_tokens)]
    top = max(logits)
    e = [math.exp(x - top) for x in logits]
    return [x / sum(e) for x in e]


def ref_reduce(per_query_head: list[list[float]], h_kv: int, how: str) -> list[list[float]]:
    g = len(per_query_head) // h_kv
    out = []
    for kv in range(h_kv):
        group = per_query_head[kv * g : (kv + 1) * g]
        cols = list(zip(*group))
        if how == "mean":
            out.append([sum(c) / g for c in cols])
        elif how == "max":
            out.append([max(c) for c in cols])
        else:
            out.append([sum(c) for c in cols])
    return out


def ref_pool(xs: list[float], kernel: int, kind: str) -> list[float]:
    """torch's pool1d(stride 1, padding kernel//2) by hand: out[j] covers j - pad .. j - pad + kernel - 1;
    avg counts the zero padding (count_include_pad)."""
    if kind == "none" or kernel <= 1:
        return list(xs)
    pad, n, out = kernel // 2, len(xs), []
    for j in range(n):
        inside = [xs[i] for i in range(j - pad, j - pad + kernel) if 0 <= i < n]
        out.append(max(inside) if kind == "max" else sum(inside) / kernel)
    return out


def ref_snapkv_scores(view: LayerView, w: int, kernel: int, pooling: str, how: str) -> list[list[float]]:
    """methods.md §2.2: sum over the last w queries of their attention to prefix keys j < T - w, GQA-reduced
    per KV head, then pooled: [H_kv][T - w]."""
    t = view.n_tokens
    per_head = []
    for h in range(view.query.shape[0]):
        rows = [ref_attention_row(view, h, i) for i in range(t - w, t)]
        per_head.append([sum(r[j] for r in rows) for j in range(t - w)])
    return [ref_pool(row, kernel, pooling) for row in ref_reduce(per_head, view.keys.shape[0], how)]


def ref_topk(scores: list[float], k: int) -> list[int]:
    """k best positions, ties to the earlier token, returned in position order."""
    return sorted(sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k])


def assert_same_choice(got: list[int], want: list[int], scores: list[float], tol: float = 1e-6) -> None:
    """got must be the reference top set; a swap is tolerated only between scores equal within float noise
    (the method runs in float32, the reference in float64)."""
    assert len(got) == len(want) == len(set(got))
    if got == want:
        return
    cut = min(scores[j] for j in want)
    for j in set(got) ^ set(want):
        assert abs(scores[j] - cut) < tol, (got, want)


def window_tail(t: int, w: int) -> list[int]:
    return list(range(t - w, t))


# ---- SnapKV ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h_q,h_kv", GQA)
@pytest.mark.parametrize(
    "pooling,kernel,how", [("max", 7, "mean"), ("avg", 5, "mean"), ("none", 1, "max"), ("max", 3, "sum")]
)
def test_snapkv_matches_reference(h_q, h_kv, pooling, kernel, how):
    t, w, kept = 50, 8, 20
    view = rand_view(h_q, h_kv, t, seed=h_q + kernel)
    method = SnapKV(window_size=w, kernel_size=kernel, pooling=pooling, gqa_reduce=how)
    keep = method.select(ctx_for(view, kept, method.score(view)))
    assert keep.shape == (h_kv, kept)
    ref = ref_snapkv_scores(view, w, kernel, pooling, how)
    for h in range(h_kv):
        row = keep[h].tolist()
        assert row[-w:] == window_tail(t, w)
        assert_same_choice(row[:-w], ref_topk(ref[h], kept - w), ref[h])


def test_snapkv_edge_budgets_and_ties():
    view = rand_view(6, 2, 30)
    method = SnapKV()
    scores = method.score(view)
    # T <= C: nothing is compressed
    assert method.select(ctx_for(view, 30, scores)).tolist() == [list(range(30))] * 2
    # C < w: the last C tokens
    assert method.select(ctx_for(view, 5, scores)).tolist() == [list(range(25, 30))] * 2
    # zero keys: every prefix key gets the same score; ties go to the earliest tokens
    flat = LayerView(0, 1, view.query, torch.zeros_like(view.keys), view.values, view.scaling)
    keep = method.select(ctx_for(flat, 12, method.score(flat)))
    assert keep.tolist() == [list(range(4)) + window_tail(30, 8)] * 2


# ---- PyramidKV -------------------------------------------------------------------------------------------
def test_pyramid_budget_worked_example():
    # methods.md §2.3, Llama-3 (32 layers), T = 7500, C = 750, w = 8, beta = 20:
    #   min_num = (750 - 8) // 20 = 742 // 20 = 37;  max_num = 2 * 742 - 37 = 1447  (< T - w = 7492, no clamp)
    #   steps = (1447 - 37) // 31 = 1410 // 31 = 45
    #   layer 0 keeps 1447 + 8 = 1455; layer 31 keeps 1447 - 31 * 45 + 8 = 52 + 8 = 60
    #   mean = 1447 - 45 * 15.5 + 8 = 757.5 (floor division makes it 1% above 750)
    budgets = pyramid_budgets(7500, 750, 8, 32)
    assert budgets[0] == 1455 and budgets[31] == 60
    assert sum(budgets) / 32 == 757.5
    assert all(a - b == 45 for a, b in zip(budgets, budgets[1:]))
    # C = 128: min 6, max 234, steps 228 // 31 = 7, mean 234 - 7 * 15.5 + 8 = 133.5 (+4%)
    assert sum(pyramid_budgets(7500, 128, 8, 32)) / 32 == 133.5


def ref_pyramid_selected(t: int, c: int, w: int, n_layers: int, layer: int, beta: int = 20) -> int | None:
    """Selected prefix tokens at `layer` from the KVCache-Factory formula; None: no compression."""
    if t < c:
        return None
    if t < 2 * (c - w):
        return c - w
    min_num = (c - w) // beta
    max_num = (c - w) * 2 - min_num
    if max_num >= t - w:
        max_num = t - w
        min_num = (c - w) * 2 - max_num
    steps = (max_num - min_num) // (n_layers - 1)
    return max_num - layer * steps


@pytest.mark.parametrize("h_q,h_kv", GQA)
@pytest.mark.parametrize(
    "t,kept",
    [
        (40, 44),  # T < C: no compression
        (44, 28),  # T >= 2(C - w) = 40, max_num = 39 >= T - w = 36: pyramid clamped, k = 36/26/16/6
        (60, 40),  # C <= T < 2(C - w) = 64: uniform SnapKV
        (90, 30),  # pyramid: min 1, max 43, steps 14
    ],
)
def test_pyramidkv_matches_reference(h_q, h_kv, t, kept):
    w, n_layers = 8, 4
    view = rand_view(h_q, h_kv, t, seed=t + h_q)
    method = PyramidKV()
    scores = method.score(view)
    ref = ref_snapkv_scores(view, w, 7, "max", "mean")
    lengths = []
    for layer in range(n_layers):
        keep = method.select(ctx_for(view, kept, scores, layer=layer, n_layers=n_layers))
        k = ref_pyramid_selected(t, kept, w, n_layers, layer)
        if k is None:
            assert keep.tolist() == [list(range(t))] * h_kv
            lengths.append(t)
            continue
        assert keep.shape == (h_kv, k + w)
        lengths.append(k + w)
        for h in range(h_kv):
            assert keep[h, -w:].tolist() == window_tail(t, w)
            assert_same_choice(keep[h, :-w].tolist(), ref_topk(ref[h], k), ref[h])
    assert lengths == pyramid_budgets(t, kept, w, n_layers)
    if (t, kept) == (90, 30):
        assert lengths == [51, 37, 23, 9]


def test_pyramidkv_shares_snapkv_scores():
    assert PyramidKV().scorer_key() == SnapKV().scorer_key() == ChunkKV().scorer_key()
    assert PyramidKV(window_size=32).scorer_key() != SnapKV().scorer_key()


# ---- ChunkKV ---------------------------------------------------------------------------------------------
def ref_chunks(scores: list[float], c: int, budget: int, agg: str) -> list[int]:
    """Chunks [i c, (i+1) c) of the prefix ranked by sum/mean of their token scores (ties: earlier chunk);
    whole chunks in rank order until `budget` tokens, the last one cut to its leading tokens."""
    n = len(scores)
    chunks = [list(range(s, min(n, s + c))) for s in range(0, n, c)]
    value = [sum(scores[j] for j in ch) / (len(ch) if agg == "mean" else 1) for ch in chunks]
    kept: list[int] = []
    for i in sorted(range(len(chunks)), key=lambda i: (-value[i], i)):
        kept += chunks[i][: budget - len(kept)]
        if len(kept) == budget:
            break
    return sorted(kept)


@pytest.mark.parametrize("h_q,h_kv", GQA)
@pytest.mark.parametrize(
    "per_head,agg,pooling,c",
    [(False, "sum", "max", 10), (False, "mean", "none", 4), (True, "sum", "max", 4), (True, "mean", "avg", 10)],
)
def test_chunkkv_matches_reference(h_q, h_kv, per_head, agg, pooling, c):
    t, w, kept = 71, 8, 31  # prefix 63 = 6 x 10 + 3 (short tail chunk); budget 23 = 2 x 10 + 3 (cut chunk)
    view = rand_view(h_q, h_kv, t, seed=h_q * 3 + c)
    method = ChunkKV(chunk_size=c, chunk_agg=agg, pooling=pooling, kernel_size=7, per_head=per_head)
    keep = method.select(ctx_for(view, kept, method.score(view)))
    assert keep.shape == (h_kv, kept)
    token = ref_snapkv_scores(view, w, 7, pooling, "mean")
    rows = token if per_head else [[sum(col) for col in zip(*token)]] * h_kv
    for h in range(h_kv):
        assert keep[h, -w:].tolist() == window_tail(t, w)
        want = ref_chunks(rows[h], c, kept - w, agg)
        got = keep[h, :-w].tolist()
        assert got == want or _chunk_near_tie(rows[h], c, agg), (got, want)
    if not per_head:
        assert all(keep[h].tolist() == keep[0].tolist() for h in range(h_kv))


@pytest.mark.parametrize("h_q,h_kv", GQA)
def test_chunkkv_paper_is_algorithm_1_without_pooling(h_q, h_kv):
    """chunkkv_paper: the window queries' attention summed per token (no pooling), per chunk of 10, one chunk
    set per layer over the KV-head-summed scores."""
    t, w, kept = 71, 8, 31
    view = rand_view(h_q, h_kv, t, seed=h_q * 5)
    method = build("chunkkv_paper").method
    assert (method.pooling, method.chunk_size, method.chunk_agg, method.window_size) == ("none", 10, "sum", 8)
    keep = method.select(ctx_for(view, kept, method.score(view)))
    token = ref_snapkv_scores(view, w, 1, "none", "mean")
    shared = [sum(col) for col in zip(*token)]
    want = ref_chunks(shared, 10, kept - w, "sum")
    for h in range(h_kv):
        got = keep[h, :-w].tolist()
        assert got == want or _chunk_near_tie(shared, 10, "sum"), (got, want)
        assert keep[h, -w:].tolist() == window_tail(t, w)


def _chunk_near_tie(scores: list[float], c: int, agg: str, tol: float = 1e-6) -> bool:
    n = len(scores)
    chunks = [list(range(s, min(n, s + c))) for s in range(0, n, c)]
    vals = sorted(sum(scores[j] for j in ch) / (len(ch) if agg == "mean" else 1) for ch in chunks)
    return any(b - a < tol for a, b in zip(vals, vals[1:]))


def test_chunkkv_layer_reuse():
    view = rand_view(6, 2, 60)
    method = ChunkKV(reuse_layers=2)
    scores = method.score(view)
    fresh = method.select(ctx_for(view, 20, scores, layer=0, n_layers=4))
    other = torch.arange(20).expand(2, 20)
    # odd layers reuse the layer below when the shape fits, even layers select afresh
    assert method.select(ctx_for(view, 20, scores, layer=1, n_layers=4, previous=other)) is other
    assert torch.equal(method.select(ctx_for(view, 20, scores, layer=2, n_layers=4, previous=other)), fresh)
    # a previous selection of another size does not fit: select afresh
    small = torch.arange(10).expand(2, 10)
    assert torch.equal(method.select(ctx_for(view, 20, scores, layer=1, n_layers=4, previous=small)), fresh)
    assert ChunkKV().select(ctx_for(view, 20, scores, layer=1, n_layers=4, previous=other)) is not other


# ---- H2O (prefill, causal) -------------------------------------------------------------------------------
@pytest.mark.parametrize("h_q,h_kv", GQA)
@pytest.mark.parametrize("how", ["mean", "sum"])
def test_h2o_prefill_matches_reference(h_q, h_kv, how):
    t, w, kept = 40, 8, 18
    view = rand_view(h_q, h_kv, t, seed=h_q + 7)
    method = H2OPrefill(gqa_reduce=how)
    keep = method.select(ctx_for(view, kept, method.score(view)))
    per_head = []
    for h in range(h_q):  # every query i, causal: keys 0..i
        rows = [ref_attention_row(view, h, i) for i in range(t)]
        per_head.append([sum(r[j] for r in rows) for j in range(t - w)])
    ref = ref_reduce(per_head, h_kv, how)
    for h in range(h_kv):
        assert keep[h, -w:].tolist() == window_tail(t, w)
        assert_same_choice(keep[h, :-w].tolist(), ref_topk(ref[h], kept - w), ref[h], tol=1e-5)


@pytest.mark.parametrize("h_q,h_kv", GQA)
@pytest.mark.parametrize("how", ["mean", "sum"])
def test_h2o_factory_2024_matches_noncausal_reference(h_q, h_kv, how):
    """KVCache-Factory ffac160 H2OKVCluster: the first T - w queries attend to every key (no mask), the last w
    causally within the window (mask on the last w x w block only); columns summed over all T queries."""
    t, w, kept = 40, 8, 18
    view = rand_view(h_q, h_kv, t, seed=h_q + 11)
    method = build("h2o_factory_2024", {"gqa_reduce": how}).method
    assert (method.causal, method.window_size) == (False, 8)
    per_head = []
    for h in range(h_q):
        rows = [ref_unmasked_row(view, h, i) for i in range(t - w)] + [ref_attention_row(view, h, i) for i in range(t - w, t)]
        per_head.append([sum(r[j] for r in rows) for j in range(t - w)])
    ref = ref_reduce(per_head, h_kv, how)
    for block in (7, 512):  # blocks of unmasked rows: the result must not depend on the block size
        got = noncausal_column_sums(view, w, block=block)
        torch.testing.assert_close(reduce_cols(got[:, : t - w], h_kv, how), torch.tensor(ref, dtype=torch.float32),
                                   rtol=1e-5, atol=1e-5)
    keep = method.select(ctx_for(view, kept, method.score(view)))
    for h in range(h_kv):
        assert keep[h, -w:].tolist() == window_tail(t, w)
        assert_same_choice(keep[h, :-w].tolist(), ref_topk(ref[h], kept - w), ref[h], tol=1e-5)
    causal = H2OPrefill(gqa_reduce=how)
    assert not torch.equal(causal.score(view), method.score(view))  # the two rules really differ here


def reduce_cols(scores: torch.Tensor, h_kv: int, how: str) -> torch.Tensor:
    grouped = scores.reshape(h_kv, -1, scores.shape[-1])
    return grouped.mean(dim=1) if how == "mean" else grouped.sum(dim=1)


def test_new_hyper_parameters_keep_old_fingerprints():
    """A field added later stays out of params() (the configuration fingerprint) at its old behaviour."""
    assert build("h2o_prefill").method.params() == {"gqa_reduce": "mean", "position_mode": "original", "window_size": 8}
    assert build("h2o_factory_2024").method.params()["causal"] is False
    assert "causal=True" in build("h2o_prefill").method.describe()
    assert build("h2o_prefill", {"causal": "false"}).method == build("h2o_factory_2024").method


def test_noncausal_h2o_refuses_a_chunked_prefill():
    """The pre-fix scores read every query against every key, future ones included, which a chunked prefill
    never has at once; the causal rule's column sums are accumulated chunk by chunk."""
    PrefillObserver([build("h2o_prefill").method], n_layers=2, chunked=True)
    with pytest.raises(InputError, match="h2o_prefill.*drop --prefill-chunk"):
        PrefillObserver([build("h2o_factory_2024").method], n_layers=2, chunked=True)


@pytest.mark.parametrize("h_q,h_kv", GQA)
@pytest.mark.parametrize("tq", [50, 23])  # all queries, or the last 23 of 50 (a query suffix: causal offset)
def test_column_sums_blocked_match_dense_reference(h_q, h_kv, tq):
    t = 50
    full = rand_view(h_q, h_kv, t, seed=h_q + tq)
    view = LayerView(0, 1, full.query[:, -tq:, :], full.keys, full.values, full.scaling)
    g = h_q // h_kv
    logits = torch.einsum("hqd,hkd->hqk", view.query.double(), view.keys.double().repeat_interleave(g, 0))
    rows = torch.arange(t - tq, t)[:, None]
    logits = (logits * view.scaling).masked_fill(torch.arange(t)[None, :] > rows, float("-inf"))
    ref = torch.softmax(logits, dim=-1).sum(dim=1)
    for block in (7, 16, 512):  # blocks that end mid-sequence see only their visible keys
        fresh = LayerView(0, 1, view.query, view.keys, view.values, view.scaling)
        got = fresh.column_sums(block=block)
        assert got.shape == (h_q, t) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # each query's row sums to one, so the columns sum to the number of queries
    torch.testing.assert_close(got.sum(dim=1), torch.full((h_q,), float(tq)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("h_q,h_kv", GQA)
def test_column_sums_from_kernel_lse_match_dense_reference(h_q, h_kv):
    """The fast path: rows exp(logits - lse) with the attention kernel's own log-sum-exp (kvbench.engine.attention
    gets it from the CPU flash kernel) equal the dense float64 softmax sums to float32 rounding."""
    t = 300  # several 128-query blocks, the last one partial
    view = rand_view(h_q, h_kv, t, seed=h_q + 11)
    g = h_q // h_kv
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        view.query[None], view.keys[None], view.values[None], 0.0, True, scale=view.scaling)
    fast = LayerView(0, 1, view.query, view.keys, view.values, view.scaling, lse=lse[0])
    logits = torch.einsum("hqd,hkd->hqk", view.query.double(), view.keys.double().repeat_interleave(g, 0))
    logits = (logits * view.scaling).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.softmax(logits, dim=-1).sum(dim=1)
    torch.testing.assert_close(fast.column_sums().double(), ref, rtol=1e-5, atol=1e-5)
    # a wrong normaliser is caught: the check is not vacuous
    off = LayerView(0, 1, view.query, view.keys, view.values, view.scaling, lse=lse[0] + 0.01)
    assert not torch.allclose(off.column_sums().double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h_q,h_kv", GQA)
@pytest.mark.parametrize("tq", [300, 170])  # all queries, or a suffix (the causal offset of a chunked prefill)
def test_column_sums_in_key_tiles_match_dense_reference(h_q, h_kv, tq):
    """The lse path cuts each block of 128 queries into tiles of keys; tiles of any width, ones that cut a
    block's causal triangle included, give the dense float64 sums to float32 rounding."""
    t = 300
    full = rand_view(h_q, h_kv, t, seed=h_q + tq)
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        full.query[None], full.keys[None], full.values[None], 0.0, True, scale=full.scaling)
    view = LayerView(0, 1, full.query[:, -tq:, :], full.keys, full.values, full.scaling, lse=lse[0][:, -tq:])
    g = h_q // h_kv
    logits = torch.einsum("hqd,hkd->hqk", view.query.double(), view.keys.double().repeat_interleave(g, 0))
    rows = torch.arange(t - tq, t)[:, None]
    logits = (logits * view.scaling).masked_fill(torch.arange(t)[None, :] > rows, float("-inf"))
    ref = torch.softmax(logits, dim=-1).sum(dim=1)
    assert ref[:, -1].min() > 0  # the last key is seen by the last query: a real sum, not masked zeros
    for tile in (1, 37, 100, 256, 1000):
        torch.testing.assert_close(view._column_sums_lse(tile=tile).double(), ref, rtol=1e-5, atol=1e-5)


def test_prefill_with_column_sums_keeps_the_model_output_bit_identical(tiny_llama):
    """H2O's observer asks the attention kernel for its log-sum-exp; the prefill's logits and cache must be
    exactly those of a prefill without any observer, so FullKV rows do not depend on the sweep's methods."""
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(4))
    outs = []
    for methods in ([], [build("h2o_prefill").method]):
        observer = PrefillObserver(methods, 2)
        cache = DynamicCache(config=tiny_llama.config)
        with torch.inference_mode(), attention.observing(observer):
            logits = tiny_llama(input_ids=ids, position_ids=torch.arange(200)[None], past_key_values=cache).logits
        outs.append((logits, [(k.clone(), v.clone()) for k, v in cache_layers(cache)], observer))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(outs[0][1], outs[1][1]))
    assert attention._FLASH_MATCHES  # the fused path was probed (and, on this CPU, used)
    assert len(outs[1][2].scores[("h2o-prefill-colsum", 8, "mean")]) == 2


@pytest.mark.parametrize("chunk", [64, 100])
def test_chunked_prefill_scores_match_unchunked(tiny_llama, chunk):
    """--prefill-chunk: the cache equals an unchunked prefill's to float32 rounding, window scorers see the last
    window of queries across chunk boundaries, H2O's column sums accumulate over chunks."""
    from kvbench.engine.prefill import prefill

    ids = torch.randint(0, 256, (1, 230), generator=torch.Generator().manual_seed(6))
    names = ["snapkv", "snapkv_kvpress", "h2o_prefill", "tova", "scissorhands"]
    results = []
    for size in (0, chunk):
        observer = PrefillObserver([build(n).method for n in names], 2, chunked=size > 0)
        with torch.inference_mode():
            cache, out = prefill(tiny_llama, ids, observer, size)
        results.append((cache_layers(cache), observer.scores, out.logits[0, -1]))
    (full_a, scores_a, logits_a), (full_b, scores_b, logits_b) = results
    for (ka, va), (kb, vb) in zip(full_a, full_b):
        torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_a, logits_b, rtol=1e-4, atol=1e-4)
    assert scores_a.keys() == scores_b.keys()
    for key in scores_a:
        for layer in (0, 1):
            a, b = scores_a[key][layer], scores_b[key][layer]
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)


def test_chunked_prefill_refuses_methods_that_need_every_query():
    class AllQueries(H2OPrefill):
        def prefill_needs(self) -> frozenset[str]:
            return frozenset({"all_queries"})

    with pytest.raises(InputError, match="--prefill-chunk"):
        PrefillObserver([AllQueries()], 2, chunked=True)
    PrefillObserver([AllQueries()], 2, chunked=False)  # fine without chunking


# ---- Random ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("share", ["layer_shared", "per_head"])
def test_random_matches_documented_draw(share):
    view = rand_view(14, 2, 50)
    method = RandomKeep(share=share)
    keep = method.select(ctx_for(view, 12, None, layer=3, seed=1234))
    g = torch.Generator().manual_seed(zlib.crc32(b"1234:3"))  # crc32(f"{seed}:{layer}"), as documented
    first = sorted(torch.randperm(49, generator=g)[:11].tolist()) + [49]
    second = sorted(torch.randperm(49, generator=g)[:11].tolist()) + [49]
    assert keep[0].tolist() == first
    assert keep[1].tolist() == (first if share == "layer_shared" else second)
    # reproducible; another seed or layer draws another set
    assert torch.equal(keep, method.select(ctx_for(view, 12, None, layer=3, seed=1234)))
    assert not torch.equal(keep, method.select(ctx_for(view, 12, None, layer=4, seed=1234)))
    assert not torch.equal(keep, method.select(ctx_for(view, 12, None, layer=3, seed=1235)))


def test_random_is_uniform_and_keeps_the_last_token():
    view = rand_view(2, 1, 21)
    counts = [0] * 21
    for seed in range(400):
        row = RandomKeep().select(ctx_for(view, 11, None, seed=seed))[0].tolist()
        assert len(set(row)) == 11 and row[-1] == 20
        for j in row:
            counts[j] += 1
    assert counts[20] == 400
    assert all(140 < n < 260 for n in counts[:20])  # expected 400 x 10/20 = 200 each


# ---- KNorm -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h_q,h_kv", GQA)
def test_knorm_matches_reference(h_q, h_kv):
    view = rand_view(h_q, h_kv, 40, seed=5)
    keep = KNorm().select(ctx_for(view, 9, None))
    for h in range(h_kv):
        norms = [math.sqrt(sum(x * x for x in row)) for row in view.keys[h].double().tolist()]
        assert_same_choice(keep[h].tolist(), ref_topk([-n for n in norms], 9), [-n for n in norms])
    skip = KNorm(skip_layers=(0, 1))
    assert skip.select(ctx_for(view, 9, None, layer=1)).shape == (h_kv, 40)
    assert skip.select(ctx_for(view, 9, None, layer=2)).shape == (h_kv, 9)


# ---- registry and presets --------------------------------------------------------------------------------
def test_registry_and_presets_resolve():
    assert build("snapkv_official").method.params()["window_size"] == 32
    kv = build("snapkv_kvpress").method.params()
    assert (kv["window_size"], kv["kernel_size"], kv["pooling"]) == (64, 5, "avg")
    assert build("chunkkv_reuse").method.reuse_layers == 2
    ck = build("chunkkv_kvpress").method
    assert (ck.chunk_size, ck.chunk_agg, ck.window_size, ck.kernel_size, ck.pooling) == (20, "mean", 64, 5, "avg")
    assert build("knorm_factory").method.skip_layers == (0, 1)
    assert build("knorm", {"skip_layers": "0:1"}).method.skip_layers == (0, 1)
    assert "beta=20" in build("pyramidkv").method.describe()
    for name in ["snapkv", "pyramidkv", "chunkkv", "h2o_prefill", "random", "knorm"]:
        method = build(name).method
        assert method.name == name
        assert "arXiv" in method.source or name == "random"
    for bad in [{"pooling": "min"}, {"chunk_agg": "median"}, {"reuse_layers": "0"}, {"chunk_size": "0"}]:
        with pytest.raises(InputError):
            build("chunkkv", bad)
    with pytest.raises(InputError):
        build("random", {"share": "per_layer"})


@pytest.mark.parametrize("method", [SnapKV(), PyramidKV(), ChunkKV(), H2OPrefill()], ids=lambda m: m.name)
def test_scored_methods_edge_cases_and_half_precision(method):
    view = rand_view(6, 2, 40)
    half = LayerView(0, 1, view.query.bfloat16(), view.keys.bfloat16(), view.values.bfloat16(), view.scaling)
    for v in (view, half):
        scores = method.score(v)
        assert scores.dtype == torch.float32 and scores.shape == (2, 32)
        assert method.select(ctx_for(v, 40, scores)).tolist() == [list(range(40))] * 2  # T <= C
        assert method.select(ctx_for(v, 5, scores)).tolist() == [list(range(35, 40))] * 2  # C < w: last C
        keep = method.select(ctx_for(v, 16, scores, n_layers=1))
        assert keep.shape == (2, 16) and keep[:, -8:].tolist() == [window_tail(40, 8)] * 2
        assert all(len(set(row)) == 16 for row in keep.tolist())


# ---- end to end through the engine -----------------------------------------------------------------------
class StubTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def tiny_model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=4, num_attention_heads=6,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, initializer_range=0.1,
        )
        model = LlamaForCausalLM(config)
    else:  # Qwen2.5-0.5B's head layout: 14 query heads, 2 KV heads
        config = Qwen2Config(
            vocab_size=128, hidden_size=112, intermediate_size=128, num_hidden_layers=4, num_attention_heads=14,
            num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.1,
        )
        model = Qwen2ForCausalLM(config)
    model.eval()
    attention.install(model)
    return model


T_E2E = 680  # 10% = 68 = 60 + 8: PyramidKV's 4-layer budgets 125/87/49/11 average exactly 68
METHODS_E2E = ["snapkv", "pyramidkv", "chunkkv", "chunkkv_reuse", "h2o_prefill", "random", "knorm", "h2o_factory_2024",
               "chunkkv_paper"]


def e2e_prompt(n_new: int = 6) -> Prompt:
    g = torch.Generator().manual_seed(1)
    ids = tuple(torch.randint(0, 128, (T_E2E,), generator=g).tolist())
    return Prompt(ids=ids, question_start=T_E2E - 20, n_original_tokens=T_E2E, truncated=False,
                  max_new_tokens=n_new, stop_ids=frozenset())


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def e2e(request):
    model = tiny_model(request.param)
    plans = [Plan("fullkv", build("fullkv").method, Budget(ratio=1.0))]
    for name in METHODS_E2E + ["knorm_factory"]:
        for ratio in (1.0, 0.1):
            plans.append(Plan(name, build(name).method, Budget(ratio=ratio)))
    run = Engine(model, StubTokenizer()).run(e2e_prompt(), plans, sample_id="s0", seed=0)
    return model, {(g.plan.label, g.plan.budget.ratio): g for g in run.generations}


def test_e2e_full_ratio_reproduces_fullkv(e2e):
    _, gens = e2e
    full = gens[("fullkv", 1.0)]
    for name in METHODS_E2E + ["knorm_factory"]:
        gen = gens[(name, 1.0)]
        assert gen.token_ids == full.token_ids, name
        assert gen.kept_per_layer == [T_E2E] * 4 and gen.cache_bytes == full.full_cache_bytes


def test_e2e_cache_bytes_at_ten_percent(e2e):
    # Every method's budget includes its window (C = round(0.1 T) = 68 per layer and KV head); none adds one.
    _, gens = e2e
    for name in METHODS_E2E:
        gen = gens[(name, 0.1)]
        assert abs(gen.cache_bytes / (0.1 * gen.full_cache_bytes) - 1) < 0.01, (name, gen.kept_per_layer)
        assert len(gen.token_ids) == 6
    assert gens[("pyramidkv", 0.1)].kept_per_layer == [125, 87, 49, 11]
    assert gens[("snapkv", 0.1)].kept_per_layer == [68] * 4
    assert gens[("knorm_factory", 0.1)].kept_per_layer == [T_E2E, T_E2E, 68, 68]  # Factory keeps layers 0-1


def test_e2e_pyramid_uneven_cache_decodes_with_true_positions(e2e):
    """Multi-token forward over PyramidKV's uneven cache == token-by-token decoding (bottom-right mask per
    layer), and the engine's greedy tokens are those of positions continuing from T, not from the kept length."""
    model, gens = e2e
    prompt = e2e_prompt()
    ids = torch.tensor([prompt.ids])
    plan = Plan("pyramidkv", build("pyramidkv").method, Budget(ratio=0.1))
    observer = PrefillObserver([plan.method], 4)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode(), attention.observing(observer):
        first = model(input_ids=ids, position_ids=torch.arange(T_E2E)[None], past_key_values=cache).logits[0, -1]
    compressed = compress(model, plan, cache_layers(cache), observer.scores, sample_seed("s0", 0))
    layers = [(kept.keys[None], kept.values[None]) for kept in compressed.layers]
    assert sorted({k.shape[2] for k, _ in layers}) == [11, 49, 87, 125]

    new = torch.tensor([[5, 17, 99, 3, 64]])
    with torch.inference_mode():
        multi = model(input_ids=new, position_ids=torch.arange(T_E2E, T_E2E + 5)[None],
                      past_key_values=make_cache(model, layers)).logits[0]
        step_cache = make_cache(model, layers)
        steps = [model(input_ids=new[:, i : i + 1], position_ids=torch.tensor([[T_E2E + i]]),
                       past_key_values=step_cache).logits[0, -1] for i in range(5)]
        shifted = model(input_ids=new[:, :1], position_ids=torch.tensor([[125]]),
                        past_key_values=make_cache(model, layers)).logits[0, -1]
    assert (multi - torch.stack(steps)).abs().max() < 1e-4
    assert (shifted - steps[0]).abs().max() > 1e-3  # positions matter: the check above is not vacuous

    # greedy decoding by hand from the compressed cache, positions T, T+1, ...
    tokens, logits, cache2 = [], first, make_cache(model, layers)
    with torch.inference_mode():
        for i in range(prompt.max_new_tokens):
            tokens.append(int(torch.argmax(logits)))
            if i == prompt.max_new_tokens - 1:
                break
            logits = model(input_ids=torch.tensor([[tokens[-1]]]), position_ids=torch.tensor([[T_E2E + i]]),
                           past_key_values=cache2).logits[0, -1]
    assert gens[("pyramidkv", 0.1)].token_ids == tokens
