"""Issue #14, first part: keydiff, block_keydiff, expected_attention, lagkv, observed_attention, criticalkv.

Each selection is checked against a reference written here from the formula in methods-2.md (plain loops or
explicit float64 matrices, none of the methods' helpers) on small random tensors with GQA groups 1, 3 and 7;
then through the engine on tiny random Llama (6/2 heads) and Qwen2 (14/2 heads) models; then (slow) the
bytes a real `kvbench run` writes on a LongBench sample at ratio 0.1."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from kvbench.engine import Engine, Plan, PrefillObserver, attention, rope
from kvbench.errors import InputError
from kvbench.methods import METHODS, build
from kvbench.methods.base import Budget, LayerView, topk_sorted
from kvbench.methods.block_keydiff import BlockKeyDiff
from kvbench.methods.criticalkv import CriticalKV
from kvbench.methods.expected_attention import ExpectedAttention
from kvbench.methods.keydiff import KeyDiff
from kvbench.methods.lagkv import LagKV, lagkv_scores
from kvbench.methods.observed_attention import ObservedAttention
from kvbench.methods.snapkv import SnapKV
from kvbench.prompts import Prompt
from test_methods_prefill import (
    GQA,
    StubTokenizer,
    assert_same_choice,
    ctx_for,
    rand_view,
    ref_attention_row,
    ref_reduce,
    ref_snapkv_scores,
    ref_topk,
    tiny_model,
    window_tail,
)

NEW = ["keydiff", "block_keydiff", "expected_attention", "lagkv", "observed_attention", "criticalkv"]


def norm(xs: list[float]) -> float:
    return math.sqrt(sum(x * x for x in xs))


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


# ---- KeyDiff ---------------------------------------------------------------------------------------------
def ref_keydiff(rows: list[list[float]]) -> list[float]:
    """methods-2 §2.16: minus the cosine of each key to the mean of the unit keys."""
    units = [[x / max(norm(r), 1e-12) for x in r] for r in rows]
    anchor = [sum(col) / len(rows) for col in zip(*units)]
    return [-dot(r, anchor) / (max(norm(r), 1e-8) * max(norm(anchor), 1e-8)) for r in rows]


@pytest.mark.parametrize("h_q,h_kv", GQA)
def test_keydiff_matches_reference(h_q, h_kv):
    view = rand_view(h_q, h_kv, 40, seed=h_q)
    view.keys[:, :, 0] += 2.0  # a shared direction, so the anchor is far from zero and the scores spread out
    keep = KeyDiff().select(ctx_for(view, 13, None))
    assert keep.shape == (h_kv, 13)
    for h in range(h_kv):
        ref = ref_keydiff(view.keys[h].double().tolist())
        assert_same_choice(keep[h].tolist(), ref_topk(ref, 13), ref)
    assert KeyDiff().select(ctx_for(view, 40, None)).tolist() == [list(range(40))] * h_kv


def ref_block_keydiff(rows: list[list[float]], kept: int, block: int) -> list[int]:
    """methods-2 §2.16: start with the first C positions; per block, keep the best C of kept + block, the
    anchor recomputed over those candidates (ties: the earlier token)."""
    chosen = list(range(kept))
    for start in range(kept, len(rows), block):
        candidates = chosen + list(range(start, min(start + block, len(rows))))
        scores = ref_keydiff([rows[j] for j in candidates])
        best = sorted(range(len(candidates)), key=lambda i: (-scores[i], candidates[i]))[:kept]
        chosen = sorted(candidates[i] for i in best)
    return chosen


@pytest.mark.parametrize("h_q,h_kv", GQA)
@pytest.mark.parametrize("block,kept", [(7, 12), (16, 5), (200, 12)])  # the last block: one-shot KeyDiff
def test_block_keydiff_matches_reference(h_q, h_kv, block, kept):
    view = rand_view(h_q, h_kv, 45, seed=block + h_kv)
    view.keys[:, :, 1] += 1.5
    keep = BlockKeyDiff(block_size=block).select(ctx_for(view, kept, None))
    assert keep.shape == (h_kv, kept)
    for h in range(h_kv):
        assert keep[h].tolist() == ref_block_keydiff(view.keys[h].double().tolist(), kept, block)
    if block == 200:
        assert torch.equal(keep, KeyDiff().select(ctx_for(view, kept, None)))
    else:  # the loop is not one-shot KeyDiff in disguise
        assert not torch.equal(keep, KeyDiff().select(ctx_for(view, kept, None)))


# ---- ObservedAttention -----------------------------------------------------------------------------------
@pytest.mark.parametrize("h_q,h_kv", GQA)
@pytest.mark.parametrize("how", ["mean", "max"])
def test_observed_attention_matches_reference(h_q, h_kv, how):
    t, kept = 36, 11
    view = rand_view(h_q, h_kv, t, seed=h_q + 11)
    method = ObservedAttention(gqa_reduce=how)
    keep = method.select(ctx_for(view, kept, method.score(view)))
    per_head = []
    for h in range(h_q):  # every query i sees keys 0..i; key j is seen by the T - j queries i >= j
        rows = [ref_attention_row(view, h, i) for i in range(t)]
        per_head.append([sum(r[j] for r in rows) / (t - j) for j in range(t)])
    ref = ref_reduce(per_head, h_kv, how)
    for h in range(h_kv):
        assert_same_choice(keep[h].tolist(), ref_topk(ref[h], kept), ref[h], tol=1e-5)
    # the mean, not H2O's sum: the last key (seen by one query) is a candidate, unlike under a column sum
    assert any(t - 1 in row for row in keep.tolist()) or all(ref[h][t - 1] < sorted(ref[h])[-kept] for h in range(h_kv))


def test_observed_attention_counts_a_query_suffix():
    full = rand_view(6, 2, 30, seed=3)
    view = LayerView(0, 1, full.query[:, -10:], full.keys, full.values, full.scaling)
    scores = ObservedAttention(gqa_reduce="sum").score(view)
    sums = view.column_sums()  # keys 0..20 are seen by all 10 queries, key 20 + i by 10 - i of them
    counts = [10] * 21 + [10 - i for i in range(1, 10)]
    want = [[sum(sums[h, j].item() for h in range(kv * 3, kv * 3 + 3)) / counts[j] for j in range(30)]
            for kv in range(2)]
    torch.testing.assert_close(scores.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-7)


# ---- LagKV -----------------------------------------------------------------------------------------------
def ref_partition_scores(rows: list[list[float]], lag: int) -> list[list[float]]:
    """Per scored partition p (all but the last): softmax over its tokens of the unbiased std over channels of
    (x - min) / (max - min), min and max per channel over partition p + 1."""
    parts = [rows[i : i + lag] for i in range(0, len(rows), lag)]
    out = []
    for cur, ref in zip(parts, parts[1:]):
        low = [min(col) for col in zip(*ref)]
        high = [max(col) for col in zip(*ref)]
        spread = []
        for x in cur:
            z = [(a - lo) / (hi - lo) for a, lo, hi in zip(x, low, high)]
            mean = sum(z) / len(z)
            spread.append(math.sqrt(sum((v - mean) ** 2 for v in z) / (len(z) - 1)))
        top = max(spread)
        e = [math.exp(v - top) for v in spread]
        out.append([v / sum(e) for v in e])
    return out


def ref_lagkv(keys: list[list[float]], values: list[list[float]], n_sink: int, lag: int, cross: bool) -> list[float]:
    t = len(keys)
    if t < n_sink + 2 * lag:
        return [1.0] * min(t, n_sink) + [(j - n_sink) / (t - n_sink) for j in range(n_sink, t)]
    end = n_sink + (t - n_sink) // lag * lag
    k = ref_partition_scores(keys[n_sink:end], lag)
    v = ref_partition_scores(values[n_sink:end], lag)
    scores = []
    for kp, vp in zip(k, v):
        part = [(a + b) / 2 for a, b in zip(kp, vp)]
        if not cross:  # rank within the partition / L, the best token (L-1)/L
            order = sorted(range(lag), key=lambda i: (-part[i], i))
            part = [(lag - 1 - order.index(i)) / lag for i in range(lag)]
        scores += part
    return [1.0] * n_sink + scores + [1.0] * (t - end + lag)


@pytest.mark.parametrize("h_q,h_kv", GQA)
@pytest.mark.parametrize("t,lag,kept,cross", [
    (75, 16, 40, False),  # end = 4 + 4 x 16 = 68: 3 scored partitions, tail 16 + 7 = 23, 27 protected
    (75, 16, 40, True),
    (75, 8, 30, False),  # 8 partitions, 7 scored, tail 8 + 7
    (30, 16, 12, False),  # 30 < 4 + 32: the short branch, sinks + most recent
])
def test_lagkv_matches_reference(h_q, h_kv, t, lag, kept, cross):
    view = rand_view(h_q, h_kv, t, seed=t + lag + h_q)
    method = LagKV(lag_size=lag, cross_scoring=cross)
    scores = method.score(view)
    keep = method.select(ctx_for(view, kept, scores))
    for h in range(h_kv):
        ref = ref_lagkv(view.keys[h].double().tolist(), view.values[h].double().tolist(), 4, lag, cross)
        assert len(ref) == t
        torch.testing.assert_close(scores[h].double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        assert_same_choice(keep[h].tolist(), ref_topk(ref, kept), ref)
        if t == 30:
            assert keep[h].tolist() == list(range(4)) + list(range(22, 30))


def test_lagkv_budget_below_sinks_and_tail_keeps_sinks_then_earliest_tail():
    """The kvbench side of the pinned kvpress difference (tests/test_kvpress_parity_2025.py): T = 96, L = 16,
    19 kept < 4 sinks + 28 tail tokens, all scoring 1: ties go to the earlier tokens."""
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 96, 16, generator=g), torch.randn(2, 96, 16, generator=g)
    kept = topk_sorted(lagkv_scores(keys, values, 4, 16, False), 19)
    assert kept.tolist() == [list(range(4)) + list(range(68, 83))] * 2


def test_lagkv_eps_guards_a_constant_channel():
    keys = torch.randn(1, 40, 4, generator=torch.Generator().manual_seed(1))
    keys[:, 20:36, 2] = 0.5  # channel 2 is constant over the reference partition 20..35 of partition 4..19
    raw = lagkv_scores(keys, keys.clone(), 4, 16, cross_scoring=True)
    assert raw[0, 4:20].isnan().all()  # kvpress's expression, no guard: 0 / 0
    guarded = lagkv_scores(keys, keys.clone(), 4, 16, cross_scoring=True, eps=1e-6)
    assert guarded.isfinite().all()
    with pytest.raises(InputError, match="lag_size"):
        LagKV(lag_size=1)


# ---- Expected Attention ----------------------------------------------------------------------------------
def rotary_for(d: int, yarn: bool) -> LlamaRotaryEmbedding:
    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e4} \
        if yarn else {"rope_type": "default", "rope_theta": 1e4}
    config = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, num_key_value_heads=2, head_dim=d,
                         max_position_embeddings=4096, rope_parameters=params)
    return LlamaRotaryEmbedding(config)


def ref_rotation(rotary: LlamaRotaryEmbedding, position: int, d: int) -> torch.Tensor:
    """R_p = diag(c) + diag(s) P in float64, c = a cos(p f), s = a sin(p f) (frequencies f repeated for both
    halves, a = attention_scaling), P x = [-x2; x1]: what the model multiplies a query at position p by."""
    angles = position * rotary.inv_freq.double()
    a = float(rotary.attention_scaling)
    c, s = torch.cat([angles.cos()] * 2) * a, torch.cat([angles.sin()] * 2) * a
    p = torch.zeros(d, d, dtype=torch.float64)
    p[: d // 2, d // 2 :] = -torch.eye(d // 2, dtype=torch.float64)
    p[d // 2 :, : d // 2] = torch.eye(d // 2, dtype=torch.float64)
    return torch.diag(c) + torch.diag(s) @ p


def ea_view(h_q: int, h_kv: int, t: int, d: int, yarn: bool,
            seed: int) -> tuple[LayerView, torch.Tensor, LlamaRotaryEmbedding]:
    """A view whose queries are RoPE'd (by the reference rotation) from known pre-RoPE queries."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(h_q, t, d, generator=g, dtype=torch.float64) + 0.5  # a non-zero mean direction
    keys = torch.randn(h_kv, t, d, generator=g) * 1.5
    values = torch.randn(h_kv, t, d, generator=g)
    rotary = rotary_for(d, yarn)
    post = torch.stack([pre[:, i] @ ref_rotation(rotary, i, d).T for i in range(t)], dim=1)
    view = LayerView(0, 1, post.float(), keys, values, d**-0.5, rope=lambda: rope.Rerotator(rotary))
    return view, pre, rotary


def ref_expected_attention(view: LayerView, pre: torch.Tensor, rotary, n_f: int, n_s: int, cov_on: bool,
                           vnorm_on: bool, eps: float) -> list[list[float]]:
    """methods-2 §2.15 steps 1-9 in float64 with explicit matrices."""
    h_q, t, d = pre.shape
    q = pre[:, n_s:]
    mu = q.mean(dim=1)
    cov = torch.einsum("hti,htj->hij", q - mu[:, None], q - mu[:, None]) / (t - n_s)
    r = sum(ref_rotation(rotary, p, d) for p in range(t, t + n_f)) / n_f
    mu, cov = mu @ r.T, r @ cov @ r.T
    g = view.group
    probs = []
    for h in range(h_q):
        k = view.keys[h // g, n_s:].double()
        z = k @ mu[h] / math.sqrt(d) + (0.5 * ((k @ cov[h]) * k).sum(-1) / d if cov_on else 0.0)
        probs.append(torch.softmax(z, dim=0))
    out = []
    for kv in range(view.keys.shape[0]):
        s = sum(probs[kv * g : (kv + 1) * g]) / g
        if vnorm_on:
            s = (s + eps) * view.values[kv, n_s:].double().norm(dim=-1)
        out.append(s)
    top = max(float(s.max()) for s in out) + 1
    return [[top] * n_s + s.tolist() for s in out]


@pytest.mark.parametrize("h_q,h_kv", GQA)
@pytest.mark.parametrize("yarn,n_f,cov_on,vnorm_on,eps", [
    (False, 512, True, True, 0.0),  # kvpress defaults
    (False, 7, False, True, 0.01),
    (True, 32, True, False, 0.0),  # attention_scaling != 1
])
def test_expected_attention_matches_reference(h_q, h_kv, yarn, n_f, cov_on, vnorm_on, eps):
    t, d, kept = 40, 8, 14
    view, pre, rotary = ea_view(h_q, h_kv, t, d, yarn, seed=h_q + n_f)
    torch.testing.assert_close(view.query_prerope("test").double(), pre, rtol=1e-5, atol=1e-5)
    method = ExpectedAttention(n_future_positions=n_f, use_covariance=cov_on, use_vnorm=vnorm_on, epsilon=eps)
    scores = method.score(view)
    keep = method.select(ctx_for(view, kept, scores))
    ref = ref_expected_attention(view, pre, rotary, n_f, 4, cov_on, vnorm_on, eps)
    torch.testing.assert_close(scores.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    for h in range(h_kv):
        assert keep[h, :4].tolist() == [0, 1, 2, 3]  # sinks first
        assert_same_choice(keep[h].tolist(), ref_topk(ref[h], kept), ref[h])


def test_expected_attention_edges_and_errors():
    view, _, _ = ea_view(6, 2, 30, 8, False, seed=1)
    method = ExpectedAttention()
    assert method.select(ctx_for(view, 30, method.score(view))).tolist() == [list(range(30))] * 2
    short = LayerView(0, 1, view.query[:, :4], view.keys[:, :4], view.values[:, :4], view.scaling, rope=view.rope)
    assert method.score(short) is None  # T <= n_sink: nothing to score, nothing evicted
    assert method.select(ctx_for(short, 2, None)).tolist() == [[0, 1, 2, 3]] * 2
    bare = LayerView(0, 1, view.query, view.keys, view.values, view.scaling)
    with pytest.raises(InputError, match="expected_attention needs the model's rotary embedding"):
        method.score(bare)

    def no_rope():
        raise InputError("GPT2LMHeadModel: no rotary embedding module")

    with pytest.raises(InputError, match="expected_attention needs a RoPE model: GPT2"):
        method.score(LayerView(0, 1, view.query, view.keys, view.values, view.scaling, rope=no_rope))


# ---- CriticalKV ------------------------------------------------------------------------------------------
def ref_value_norms(view: LayerView, weight: torch.Tensor) -> list[list[float]]:
    """u[kv][j] = mean over the group's query heads h of sum_c |sum_i v[kv, j, i] W_O^T[h d + i, c]|."""
    h_q, d, g = view.query.shape[0], view.values.shape[-1], view.group
    w_t = weight.double().t().tolist()  # [H_q d, hidden]
    out = []
    for kv in range(view.keys.shape[0]):
        row = []
        for v in view.values[kv].double().tolist():
            per_head = [sum(abs(sum(v[i] * w_t[h * d + i][c] for i in range(d))) for c in range(len(w_t[0])))
                        for h in range(kv * g, kv * g + g)]
            row.append(sum(per_head) / g)
        out.append(row)
    return out


@pytest.mark.parametrize("h_q,h_kv", GQA)
@pytest.mark.parametrize("rho,kept", [(0.5, 20), (0.5, 11), (0.0, 20), (1.0, 20), (0.3, 31)])
def test_criticalkv_matches_reference(h_q, h_kv, rho, kept):
    t, w, d, hidden, eps = 50, 4, 8, 12, 1e-4
    view = rand_view(h_q, h_kv, t, seed=h_q + kept)
    o_proj = torch.nn.Linear(h_q * d, hidden, bias=False)
    with torch.no_grad():
        o_proj.weight.copy_(torch.randn(hidden, h_q * d, generator=torch.Generator().manual_seed(kept)))
    view.module = SimpleNamespace(o_proj=o_proj)
    method = CriticalKV(window_size=w, kernel_size=5, pooling="avg", epsilon=eps, first_stage_ratio=rho)
    keep = method.select(ctx_for(view, kept, method.score(view)))
    s = [[x / w for x in row] for row in ref_snapkv_scores(view, w, 5, "avg", "mean")]  # mean over the window
    u = ref_value_norms(view, o_proj.weight)
    n1 = max(1, math.floor(rho * kept)) if rho > 0 else 0
    for h in range(h_kv):
        forced = ref_topk(s[h], max(0, n1 - w))
        weighted = [(x + eps) * y for x, y in zip(s[h], u[h])]
        rest = sorted((j for j in range(t - w) if j not in forced), key=lambda j: (-weighted[j], j))
        want = sorted(forced + rest[: kept - w - len(forced)])
        assert keep[h, -w:].tolist() == window_tail(t, w)
        assert keep[h, :-w].tolist() == want
    snap = SnapKV(window_size=w, kernel_size=5, pooling="avg")
    snap_keep = snap.select(ctx_for(view, kept, snap.score(view)))
    if rho == 1.0:  # the whole budget by attention: SnapKV
        assert torch.equal(keep, snap_keep)


def test_criticalkv_needs_an_output_projection():
    view = rand_view(6, 2, 30)
    with pytest.raises(InputError, match="criticalkv needs the attention module's output projection"):
        CriticalKV().score(view)
    with pytest.raises(InputError, match="first_stage_ratio"):
        build("criticalkv", {"first_stage_ratio": "1.5"})


# ---- every scored method on half-precision inputs ----------------------------------------------------------
def test_half_precision_views_score_in_float32():
    view, _, _ = ea_view(6, 2, 40, 8, False, seed=2)
    o_proj = torch.nn.Linear(6 * 8, 12, bias=False).bfloat16()
    half = LayerView(0, 1, view.query.bfloat16(), view.keys.bfloat16(), view.values.bfloat16(), view.scaling,
                     module=SimpleNamespace(o_proj=o_proj), rope=view.rope)
    for method in (ExpectedAttention(), LagKV(lag_size=8), ObservedAttention(), CriticalKV(window_size=4)):
        scores = method.score(half)
        assert scores.dtype == torch.float32 and scores.isfinite().all(), method.name
        keep = method.select(ctx_for(half, 12, scores))
        assert keep.shape == (2, 12) and all(len(set(row)) == 12 for row in keep.tolist()), method.name
    for method in (KeyDiff(), BlockKeyDiff(block_size=8)):
        assert method.select(ctx_for(half, 12, None)).shape == (2, 12)


# ---- registry, properties, `kvbench methods` -------------------------------------------------------------
def test_registry_properties_and_presets():
    for name in NEW:
        method = build(name).method
        assert method.name == name and "methods-2.md §2." in method.source and "arXiv" in method.source
        assert "methods-2.md §2." in sys.modules[type(method).__module__].__doc__  # the spec section, cited
        assert not method.head_adaptive and not method.continuous
    assert [n for n in NEW if build(n).method.query_aware] == ["expected_attention", "observed_attention", "criticalkv"]
    kv = build("criticalkv_kvpress").method
    assert (kv.window_size, kv.kernel_size, kv.pooling, kv.epsilon, kv.first_stage_ratio) == (64, 5, "avg", 1e-4, 0.5)
    ea = build("expected_attention").method
    assert (ea.n_future_positions, ea.n_sink, ea.use_covariance, ea.use_vnorm, ea.epsilon) == (512, 4, True, True, 0.0)
    lag = build("lagkv").method
    assert (lag.n_sink, lag.lag_size, lag.cross_scoring, lag.eps) == (4, 128, False, 0.0)
    assert build("block_keydiff").method.block_size == 128
    # methods with equal settings share one score computation, different settings do not
    assert LagKV().scorer_key() != LagKV(lag_size=64).scorer_key()
    assert CriticalKV().scorer_key() != SnapKV().scorer_key()


def test_methods_command_groups_by_family(capsys, monkeypatch):
    from kvbench import cli

    monkeypatch.setattr(sys, "argv", ["kvbench", "methods"])
    cli.main()
    chunks = capsys.readouterr().out.strip().split("\n\n")
    families = {}  # family -> {method: its first line}
    for chunk in chunks:
        header, *lines = chunk.splitlines()
        if header.startswith("["):
            families[header.strip("[]")] = {line.split()[0]: line for line in lines if not line.startswith(" ")}
    listed = [name for names in families.values() for name in names]
    assert sorted(listed) == sorted(METHODS.names())  # every method once, presets after the families
    assert list(families["key/value geometry"]) == ["knorm", "keydiff", "block_keydiff", "lagkv"]
    assert list(families["query statistics"]) == ["expected_attention"]
    assert {"h2o_prefill", "observed_attention"} <= set(families["accumulated attention"])
    assert "criticalkv" in families["window attention"]
    flags = {name: line.split(maxsplit=1)[1] for names in families.values() for name, line in names.items()}
    assert flags["h2o"] == "query-aware, continuous"
    assert flags["keydiff"] == flags["lagkv"] == "-"
    assert flags["expected_attention"] == flags["criticalkv"] == "query-aware"


# ---- end to end through the engine -----------------------------------------------------------------------
T_E2E = 680  # 10% = 68 per layer and KV head


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def e2e(request):
    model = tiny_model(request.param)
    g = torch.Generator().manual_seed(1)
    ids = tuple(torch.randint(0, 128, (T_E2E,), generator=g).tolist())
    prompt = Prompt(ids=ids, question_start=T_E2E - 20, n_original_tokens=T_E2E, truncated=False,
                    max_new_tokens=5, stop_ids=frozenset())
    plans = [Plan("fullkv", build("fullkv").method, Budget(ratio=1.0))]
    # lag 32: with the default 128 the 4 sinks + 164 tail tokens alone exceed 10% of 680
    args = {"lagkv": {"lag_size": "32"}}
    plans += [Plan(name, build(name, args.get(name)).method, Budget(ratio=r)) for name in NEW for r in (1.0, 0.1)]
    run = Engine(model, StubTokenizer()).run(prompt, plans, sample_id="s0", seed=0)
    return model, prompt, {(gen.plan.label, gen.plan.budget.ratio): gen for gen in run.generations}


def test_e2e_full_ratio_reproduces_fullkv_and_ten_percent_bytes(e2e):
    _, _, gens = e2e
    full = gens[("fullkv", 1.0)]
    for name in NEW:
        assert gens[(name, 1.0)].token_ids == full.token_ids, name
        gen = gens[(name, 0.1)]
        assert gen.kept_per_layer == [68] * 4, name
        assert gen.cache_bytes == round(0.1 * full.full_cache_bytes), name  # 68 / 680 exactly
        assert len(gen.token_ids) == 5
        assert len({tuple(map(tuple, k.indices.tolist())) for k in gen.kept_indices}) > 1, name  # layers choose


def test_e2e_prerope_queries_are_the_projections(e2e):
    """LayerView.query_prerope inside the engine (RoPE undone with the model's rotary embedding) equals the
    q_proj output, captured by a hook, for every layer: no positions are off by one."""
    model, prompt, _ = e2e
    captured, seen = {}, {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(
        lambda mod, args, out, i=i: captured.__setitem__(i, out[0])) for i, layer in enumerate(model.model.layers)]

    class Probe(ExpectedAttention):
        def score(self, view):
            seen[view.layer] = view.query_prerope("probe")
            return super().score(view)

    observer = PrefillObserver([Probe()], 4, model=model)
    try:
        with torch.inference_mode(), attention.observing(observer):
            model(input_ids=torch.tensor([prompt.ids[:200]]), position_ids=torch.arange(200)[None])
    finally:
        for hook in hooks:
            hook.remove()
    d = model.config.hidden_size // model.config.num_attention_heads
    for layer in range(4):
        want = captured[layer].reshape(200, -1, d).transpose(0, 1)
        torch.testing.assert_close(seen[layer], want, rtol=1e-4, atol=1e-4)


def test_runs_without_these_methods_never_touch_the_rotary_embedding(e2e, monkeypatch):
    model, prompt, _ = e2e

    def refuse(_model):
        raise AssertionError("rope.for_model called by a run that does not need it")

    monkeypatch.setattr(rope, "for_model", refuse)
    plans = [Plan(n, build(n).method, Budget(ratio=0.1)) for n in ("snapkv", "criticalkv", "keydiff", "lagkv")]
    run = Engine(model, StubTokenizer()).run(prompt, plans, sample_id="s0", seed=0)
    assert [g.kept_per_layer for g in run.generations] == [[68] * 4] * 4
    with pytest.raises(AssertionError, match="rope.for_model called"):
        Engine(model, StubTokenizer()).run(prompt, [Plan("ea", ExpectedAttention(), Budget(ratio=0.1))])


def test_chunked_prefill_keeps_the_same_tokens_and_refuses_expected_attention(e2e):
    """--prefill-chunk: column sums (ObservedAttention) are accumulated over the chunks with every query counted,
    the window (CriticalKV) comes from the last chunk's queries, keys and values are whole; Expected Attention
    needs every query's pre-RoPE moments and is refused in one line."""
    model, prompt, gens = e2e
    names = [n for n in NEW if n != "expected_attention"]
    args = {"lagkv": {"lag_size": "32"}}
    plans = [Plan(n, build(n, args.get(n)).method, Budget(ratio=0.1)) for n in names]
    run = Engine(model, StubTokenizer(), prefill_chunk=200).run(prompt, plans, sample_id="s0", seed=0)
    for name, gen in zip(names, run.generations):
        want = [k.indices.tolist() for k in gens[(name, 0.1)].kept_indices]
        assert [k.indices.tolist() for k in gen.kept_indices] == want, name
    with pytest.raises(InputError, match="expected_attention.*--prefill-chunk"):
        Engine(model, StubTokenizer(), prefill_chunk=200).run(prompt, [Plan("ea", ExpectedAttention(), Budget(ratio=0.1))])


# ---- the bytes a real run writes (slow) ------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_rows_cache_bytes_match_the_prediction(smollm2, shared_longbench, tmp_path):
    """kvbench run of every method above at ratio 0.1 on a real LongBench sample: every row's cache_bytes is
    within 1% of methods-2 §1.8's prediction for an eviction-only method, ratio x FullKV bytes, where FullKV bytes
    = 2 (K and V) x layers x KV heads x head_dim x 4 (float32) x the prompt tokens, from the model config."""
    from kvbench.results.store import load_all_rows

    results = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "kvbench", "run", "--model", "smollm2-135m", "--method",
                           ",".join(NEW), "--ratio", "0.1", "--tasks", "multifieldqa_en", "--limit", "1",
                           "--max-length", "1500", "--data-dir", str(shared_longbench / "minilongbench"), "--results",
                           str(results)],
                          env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in load_all_rows(results) if r["method"] in NEW]
    assert sorted(r["method"] for r in rows) == sorted(NEW)
    config = smollm2.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4
    assert per_token == 46_080  # methods-2 §1.6's table: SmolLM2 fp32, per budget token
    for row in rows:
        predicted = 0.1 * per_token * row["prompt_tokens"]
        assert abs(row["cache_bytes"] / predicted - 1) < 0.01, (row["method"], row["cache_bytes"], predicted)
        assert row["full_cache_bytes"] == per_token * row["prompt_tokens"]
    print(json.dumps({r["method"]: [r["cache_bytes"], r["full_cache_bytes"], r["prompt_tokens"]] for r in rows}))
