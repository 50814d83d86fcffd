"""kvbench.studies.sensitivity: the measures on a tiny random RoPE Llama, the fits on synthetic curves, and one small
end-to-end study. Expected values are derived independently of the code under test (closed forms, a
token-by-token decoding reference, hand-computed interpolation)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kvbench.studies.sensitivity import SensitivityOptions, fits, measure, run_sensitivity
from kvbench.studies.sensitivity import policies as P
from kvbench.studies.sensitivity.options import QUICK_GRID, SPEC_GRID
from kvbench.studies.sensitivity.plan import Document, plan_study


def make_model(layers: int = 3, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2,  # sharp, context-dependent
    )
    return LlamaForCausalLM(config).to(torch.float32).eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def doc():
    return [int(x) for x in np.random.default_rng(1).integers(0, 128, 160)]


def rows_of(model, doc, ts, cfg, doc_id="d0"):
    """Every row of one document (measure_document yields them batch by batch)."""
    return [row for batch in measure.measure_document(model, doc, ts, cfg, doc_id=doc_id) for row in batch]


def measure_rows(model, doc, ts, windows, **kw):
    return rows_of(model, doc, ts, measure.MeasureConfig(windows=tuple(windows), apply_modes=("M1", "M2"), seeds=2, **kw))


def test_kl_is_zero_when_the_whole_context_is_kept(model, doc):
    t = 40
    rows = measure_rows(model, doc, [t], (1, 2, 8, t))
    whole = [r for r in rows if r["B"] == t]
    assert {(r["policy"], r["pos_mode"], r["apply_mode"]) for r in whole} >= {
        (p, m, "M1") for p in P.POLICIES for m in P.POS_MODES}
    assert any(r["apply_mode"] == "M2" for r in whole)
    for r in whole:
        assert r["n_kept"] == t
        assert abs(r["kl_fwd"]) < 1e-6 and abs(r["kl_rev"]) < 1e-6 and r["tv"] < 1e-3, r
    # the test is not vacuous: cutting the context moves this model's distribution a lot
    one = [r for r in rows if r["B"] == 1 and r["apply_mode"] == "M1"]
    assert min(r["kl_fwd"] for r in one) > 1e-2


def test_sliding_window_kl_is_the_same_in_both_position_modes(model, doc):
    rows = measure_rows(model, doc, [100, 131], (1, 2, 4, 8, 16, 32, 64))
    sliding = {(r["t"], r["B"], r["pos_mode"]): r["kl_fwd"] for r in rows
               if r["policy"] == "sliding" and r["apply_mode"] == "M1"}
    pairs = [(v, sliding[(t, b, "original")]) for (t, b, m), v in sliding.items() if m == "contiguous"]
    assert len(pairs) == 14
    for contiguous, original in pairs:
        assert contiguous > 1e-4
        assert abs(contiguous - original) <= 1e-6 + 1e-4 * contiguous
    # and the position modes do differ where the kept set has gaps (so position ids reach the model)
    sink = {(r["t"], r["B"], r["pos_mode"]): r["kl_fwd"] for r in rows
            if r["policy"] == "sink_recent" and r["apply_mode"] == "M1"}
    assert max(abs(sink[(t, b, "contiguous")] - sink[(t, b, "original")]) for (t, b, _m) in sink) > 1e-4


def test_gapped_original_positions_match_token_by_token_decoding(model, doc):
    """Original mode with gaps must be one causal sequence, not 'packed sequences' split at the gaps."""
    from transformers import DynamicCache

    kept = P.kept_indices("random", 120, 12, seed=P.derive_seed(0, "d0", 120, 12, 1))
    assert np.any(np.diff(kept) > 1)
    ids, pos = np.asarray(doc)[kept], P.position_ids(kept, "original")
    batched = measure.reencode_logits(model, np.stack([ids, ids]), np.stack([pos, pos]))
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        for token, p in zip(ids.tolist(), pos.tolist()):
            out = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[p]]), past_key_values=cache,
                        use_cache=True)
    reference = out.logits[0, -1].float()
    torch.testing.assert_close(batched[0], reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched[1], reference, atol=1e-4, rtol=1e-4)


def test_random_retention_is_reproducible_from_its_seed(model, doc):
    seed = P.derive_seed(7, "doc-a", 300, 16, 1)
    assert seed == P.derive_seed(7, "doc-a", 300, 16, 1)
    assert len({seed, P.derive_seed(7, "doc-a", 300, 16, 2), P.derive_seed(7, "doc-b", 300, 16, 1),
                P.derive_seed(8, "doc-a", 300, 16, 1)}) == 4
    a, b = P.kept_indices("random", 300, 16, seed=seed), P.kept_indices("random", 300, 16, seed=seed)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 16 and len(set(a.tolist())) == 16 and a[-1] == 299 and a.min() >= 0
    assert np.all(np.diff(a) > 0)
    assert not np.array_equal(a, P.kept_indices("random", 300, 16, seed=seed + 1))
    # the same sets (and so the same numbers) on a rerun, and one set shared by both position modes and M2
    first, second = measure_rows(model, doc, [90], (1, 4, 16)), measure_rows(model, doc, [90], (1, 4, 16))
    assert [r for r in first if r["policy"] == "random"] == [r for r in second if r["policy"] == "random"]
    digests: dict[tuple, set] = {}
    for r in first:
        if r["policy"] == "random":
            digests.setdefault((r["t"], r["B"], r["seed"]), set()).add(r["kept_digest"])
            assert r["rng_seed"] == P.derive_seed(0, "d0", r["t"], r["B"], r["seed"])
    assert len(digests) == 3 * 2 and all(len(v) == 1 for v in digests.values())
    kept = P.kept_indices("random", 90, 16, seed=P.derive_seed(0, "d0", 90, 16, 2))
    row = next(r for r in first if r["policy"] == "random" and r["B"] == 16 and r["seed"] == 2)
    assert row["kept_digest"] == P.kept_digest(kept)


def test_kept_sets_follow_the_definitions():
    np.testing.assert_array_equal(P.kept_indices("sliding", 10, 3), [7, 8, 9])
    np.testing.assert_array_equal(P.kept_indices("sink_recent", 10, 6, sink=4), [0, 1, 2, 3, 8, 9])
    np.testing.assert_array_equal(P.kept_indices("sliding", 5, 9), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(P.position_ids(np.array([0, 1, 8, 9]), "contiguous"), [0, 1, 2, 3])
    np.testing.assert_array_equal(P.position_ids(np.array([0, 1, 8, 9]), "original"), [0, 1, 8, 9])
    with pytest.raises(ValueError):
        P.kept_indices("sink_recent", 10, 4, sink=4)


def test_divergences_match_closed_forms():
    p = torch.tensor([[0.5, 0.25, 0.25]])
    q = torch.tensor([[0.25, 0.5, 0.25]])
    kl = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # sum p log(p/q)
    out = measure.divergences(p.log(), q.log())[0]
    assert out.dtype == torch.float64
    assert out[0].item() == pytest.approx(kl, abs=1e-7)
    assert out[1].item() == pytest.approx(0.25 * math.log(0.5) + 0.5 * math.log(2), abs=1e-7)
    assert out[2].item() == pytest.approx(0.25, abs=1e-7)


GRID = np.array(SPEC_GRID, float)


def test_power_law_fit_recovers_alpha():
    rng = np.random.default_rng(0)
    for alpha in (0.3, 0.55, 1.2):
        d = 0.8 * GRID ** (-alpha) * np.exp(rng.normal(0, 0.02, len(GRID)))  # 2% noise: slope SE ~0.006
        fit = fits.fit_power(GRID, d, 8, 256)
        assert abs(fit.rate - alpha) < 0.02
        cmp = fits.compare_families(GRID, d, 8, 256)
        assert cmp["ratio"] > 1 and cmp["holdout"] == [384, 512, 768, 1024, 1536, 2048]
    exact = fits.fit_power(GRID, 3.0 * GRID**-0.7, 8, 256)
    assert exact.rate == pytest.approx(0.7, abs=1e-12) and exact.C == pytest.approx(3.0, rel=1e-12)
    assert exact.r2 == pytest.approx(1.0)
    assert fits.fit_power_linear(GRID, 3.0 * GRID**-0.7, 8, 256) == pytest.approx(0.7, abs=1e-6)


def test_exponential_data_prefers_the_exponential():
    rng = np.random.default_rng(1)
    w = GRID[GRID <= 1024]
    d = 2.0 * np.exp(-0.01 * w) * np.exp(rng.normal(0, 0.03, len(w)))
    cmp = fits.compare_families(w, d, 8, 256)
    assert cmp["exp"].rate == pytest.approx(0.01, abs=1e-3)
    assert cmp["exp"].r2 > cmp["power"].r2
    assert cmp["err_exp"] < cmp["err_pow"] and cmp["ratio"] < 1


def test_window_for_eps_interpolates_log_log():
    w = np.array([1.0, 2, 4, 8, 16])
    assert fits.empirical_window(w, 1 / w, 0.3) == (pytest.approx(1 / 0.3), "ok")  # exact on a power law
    assert fits.empirical_window(w, 1 / w, 0.125) == (pytest.approx(8.0), "ok")
    assert fits.empirical_window(w, 1 / w, 2.0) == (1.0, "below_grid")
    assert fits.empirical_window(w, 1 / w, 0.01) == (None, "not_reached")
    # between (2, 0.5) and (4, 0.1): ln w = ln 2 + ln(0.2/0.5) * ln 2 / ln(0.1/0.5)
    by_hand = 2 * 2 ** (math.log(0.4) / math.log(0.2))
    assert fits.empirical_window(np.array([1.0, 2, 4]), np.array([1.0, 0.5, 0.1]), 0.2)[0] == pytest.approx(by_hand)
    # first crossing, even if the curve comes back up
    assert fits.empirical_window(np.array([1.0, 2, 4]), np.array([1.0, 0.01, 0.5]), 0.1)[0] < 2
    assert fits.predicted_window(fits.Fit("power", 0.5, 2.0, 1.0, 5), 0.2) == pytest.approx(100.0)


def test_quick_plan_and_finite_size_note():
    docs = [Document(f"d{i}", "multi_news", list(range(3000))) for i in range(10)]
    plan = plan_study(SensitivityOptions(quick=True), docs, 8192)
    assert plan.windows == QUICK_GRID and plan.fit_range == (8, 128)
    assert (plan.t_min, plan.t_max) == (2048, 2560) and len(plan.docs) == 8
    assert all(len(ts) == 2 and all(2048 <= t <= 2560 for t in ts) for ts in plan.positions.values())
    assert plan.seeds == 1 and plan.other_max_budget == 128 and plan.sliding_pos_modes == ("contiguous",)
    assert not plan.notes
    small = plan_study(SensitivityOptions(windows=(1, 2, 4, 8, 16, 32), docs=2), docs, 100)
    assert small.t_max == 100 and small.t_min < 4 * 32
    assert any("t_min" in n for n in small.notes)


def test_small_study_writes_every_output(model, tmp_path):
    class Loaded:
        pass

    loaded = Loaded()
    loaded.model, loaded.tokenizer, loaded.identity = model, None, "tiny-random-llama"
    rng = np.random.default_rng(3)
    documents = [Document(f"task/{i}", "task", [int(x) for x in rng.integers(0, 128, 170)]) for i in range(3)]
    opts = SensitivityOptions(model="tiny", windows=(1, 2, 4, 8, 16, 32), docs=3, positions=2, seeds=2,
                                out_dir=tmp_path / "out", bootstrap=50, threads=1)
    logs: list[str] = []
    result = run_sensitivity(opts, logs.append, loaded=loaded, documents=documents)
    for name in ("kl_raw.jsonl", "T1.md", "T2.md", "T3.md", "summary.md", "F1.png", "F2.png", "F3.png", "manifest.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (tmp_path / "out" / "kl_raw.jsonl").read_text().splitlines()]
    # per (doc, t): M1 sliding 6x2 + sink_recent (B in 8,16,32) 3x2 + random 6x2x2 = 42; M2 6 + 3 + 12 = 21
    assert len(rows) == result.n_rows == 3 * 2 * 63
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["plan"]["t_min"] == 128 and manifest["plan"]["fit_range"] == [1, 8]
    assert manifest["choices"]["primary_position_mode"].startswith("contiguous")
    assert result.alpha is not None and result.err_ratio is not None and result.random_sliding_ratio is not None
    assert set(result.verdicts) >= {"power law extrapolates >=10x better than exponential",
                                    "recency beats random retention by ~100x"}
    assert "alpha" in result.report() and "T1.md" in result.report()


def test_prefill_then_evict_with_registered_methods():
    """M2 through the method registry: the registry's sliding window must give exactly the built-in M2 sliding
    numbers (two independent constructions of the same kept cache), and an attention-scored method runs."""
    from kvbench.engine import attention
    from kvbench.methods import build

    model = make_model(layers=2, seed=4)
    attention.install(model)  # the recorder needs kvbench's attention (as load_model installs it)
    doc = [int(x) for x in np.random.default_rng(5).integers(0, 128, 120)]
    cfg = measure.MeasureConfig(windows=(1, 2, 8, 32, 100), policies=("sliding",), apply_modes=("M2",),
                          methods={"method:sliding": build("sliding").method, "snapkv": build("snapkv").method})
    rows = rows_of(model, doc, [100], cfg, doc_id="d")
    m2 = {(r["policy"], r["B"]): r for r in rows}
    assert all(r["apply_mode"] == "M2" and r["pos_mode"] == "original" for r in rows)
    for b in (2, 8, 32, 100):
        assert m2[("method:sliding", b)]["kl_fwd"] == pytest.approx(m2[("sliding", b)]["kl_fwd"], abs=1e-6)
        assert m2[("snapkv", b)]["n_kept"] == b
    assert abs(m2[("snapkv", 100)]["kl_fwd"]) < 1e-6  # the whole prefix kept
    assert m2[("sliding", 8)]["kl_fwd"] > 1e-3


def ragged_heads():
    """A method whose two KV heads keep different numbers of tokens: head 0 the last `kept` prefix positions,
    head 1 the last kept // 2 (a ragged Selection, as the head-adaptive methods return)."""
    from dataclasses import dataclass
    from typing import ClassVar

    from kvbench.methods.base import Method, Selection

    @dataclass
    class RaggedHeads(Method):
        name: ClassVar[str] = "ragged_heads"

        def select(self, ctx):
            n = ctx.n_tokens
            return Selection.from_rows([torch.arange(n - k, n) for k in (ctx.kept, max(1, ctx.kept // 2))])

    return RaggedHeads()


@pytest.mark.parametrize("name", ["pyramidkv", "ragged_heads"])
def test_m2_with_uneven_kept_lengths_matches_masked_full_attention(name):
    """PyramidKV keeps a different number of tokens in each layer; `ragged_heads` a different number in each
    head. Their M2 divergence must equal the one of a plain causal forward over x_1..x_t in which, in every layer,
    the last query sees only that layer's kept prefix positions (per KV head) and itself: masking instead of
    gathering, an independent construction."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kvbench.engine import attention
    from kvbench.methods import build

    model = make_model(layers=3, seed=4)
    attention.install(model)
    doc = [int(x) for x in np.random.default_rng(5).integers(0, 128, 300)]
    t, budget = 250, 32
    method = build(name).method if name == "pyramidkv" else ragged_heads()
    cfg = measure.MeasureConfig(windows=(budget,), policies=(), apply_modes=("M2",), methods={name: method})
    (row,) = rows_of(model, doc, [t], cfg, doc_id="d")

    scorers = measure.PrefixScorers([method], 3, [t - 1])
    _, cache = measure.full_pass(model, doc, [t], keep_cache=True, observer=scorers)
    selections = measure.select_layers(method, scorers.by_length[t - 1], cache, t - 1, budget - 1, group=2, seed=0)
    kept = [sel.rows() for sel in selections]  # per layer, per KV head
    lengths = {len(r) for rows in kept for r in rows} if name == "ragged_heads" else {len(rows[0]) for rows in kept}
    assert len(lengths) > 1, "the layers (or heads) must keep different numbers of tokens"
    assert row["n_kept"] == max(len(r) for rows in kept for r in rows) + 1

    def masked(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        kwargs.pop("is_causal", None)
        n, h_q = key.shape[2], query.shape[1]
        group = h_q // key.shape[1]
        allow = torch.ones(n, n, dtype=torch.bool).tril()[None, None].repeat(1, h_q, 1, 1)
        allow[0, :, n - 1, :] = False
        allow[0, :, n - 1, n - 1] = True
        for head in range(h_q):
            allow[0, head, n - 1, kept[module.layer_idx][head // group]] = True  # that KV head's rows
        return sdpa_attention_forward(module, query, key, value, allow, dropout, scaling, is_causal=False, **kwargs)

    AttentionInterface.register("kvbench_test_masked", masked)
    reference = make_model(layers=3, seed=4)
    reference.set_attn_implementation("kvbench_test_masked")
    with torch.no_grad():
        logq = torch.log_softmax(reference(input_ids=torch.tensor([doc[:t]])).logits[0, -1].float(), -1)
        logp = torch.log_softmax(model(input_ids=torch.tensor([doc[:t]])).logits[0, -1].float(), -1)
    kl, rkl, tv = measure.divergences(logp[None], logq[None])[0].tolist()
    assert row["kl_fwd"] > 1e-3  # evicting changed the prediction, so the comparison below means something
    assert row["kl_fwd"] == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert row["tv"] == pytest.approx(tv, rel=1e-4, abs=1e-6)
