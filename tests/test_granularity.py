"""Query-head granularity (`--granularity query_head`, methods-2 §1.6), the three checks the spec asks for:

- MHA (g = 1): query_head and kv_head keep bit-identical sets and decode bit-identical tokens and logits;
- GQA: query_head SnapKV keeps, per query head, the top-k of that head's own unreduced window scores, computed
  here from the model's eager attention probabilities (nothing of kvbench's scoring code);
- decode logits of a query_head cache equal a reference that attends, on the full prompt cache, only to each
  query head's kept positions through an explicit -inf mask (fp32, 1e-5).

Plus what the run needs around it: bytes are g times the kv_head bytes, positional and layer-shared methods
keep H_kv storage, batched decoding of mixed granularities equals sequential, fingerprints of kv_head rows do
not move, and a bad --granularity is one line and exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama
from test_engine_ragged import StubTokenizer
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM

from kvbench import runner
from kvbench.engine import Engine, Plan, PrefillObserver, attention, cache_layers, storage_granularity
from kvbench.engine.cache import RaggedCache
from kvbench.engine.compress import compress
from kvbench.engine.prefill import prefill
from kvbench.methods import build
from kvbench.methods.base import Budget, pool1d
from kvbench.prompts import Prompt

T = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mha_llama(seed: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(16.0)
            layer.self_attn.k_proj.weight.mul_(16.0)
    attention.install(model)
    return model


def prompt(n: int = T, seed: int = 5, new: int = 8) -> Prompt:
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return Prompt(ids=tuple(ids), question_start=n, n_original_tokens=n, truncated=False, max_new_tokens=new,
                  stop_ids=frozenset())


PREFILL_METHODS = ["snapkv", "pyramidkv", "h2o_prefill", "snapkv_kvpress"]


def test_mha_query_head_equals_kv_head_bit_for_bit():
    model = mha_llama()
    p = prompt()
    plans = {g: [Plan(m, build(m).method, Budget(ratio=0.3), g) for m in PREFILL_METHODS + ["h2o"]]
             for g in ("kv_head", "query_head")}
    runs = {g: Engine(model, StubTokenizer(), decode="sequential").run(p, plans[g]) for g in plans}
    for a, b in zip(runs["kv_head"].generations, runs["query_head"].generations):
        assert a.token_ids == b.token_ids, a.plan.label
        assert a.cache_bytes == b.cache_bytes
        for x, y in zip(a.kept_indices, b.kept_indices):
            assert torch.equal(x.indices, y.indices) and torch.equal(x.lengths, y.lengths)


def test_mha_query_head_decode_logits_are_bit_identical():
    model = mha_llama()
    ids = list(prompt().ids)
    logits = {}
    for granularity in ("kv_head", "query_head"):
        plan = Plan("snapkv", build("snapkv").method, Budget(ratio=0.3), granularity)
        observer = PrefillObserver([plan.method], 2, granularities=[granularity])
        with torch.inference_mode():
            cache, _ = prefill(model, torch.tensor([ids]), observer)
            kept = compress(model, plan, cache_layers(cache), observer.scores, 0)
            ragged = RaggedCache([kept.layers], reserve=4, head_repeat=1)
            with attention.decoding(ragged):
                logits[granularity] = model(input_ids=torch.tensor([[7]]), position_ids=torch.tensor([[T]]),
                                            past_key_values=ragged).logits[0, -1]
    assert torch.equal(logits["kv_head"], logits["query_head"])


def eager_window_topk(model, ids: list[int], window: int, kernel: int, kept: int) -> list[torch.Tensor]:
    """Per layer [H_q, kept] ascending: each query head's top (kept - window) prefix positions by its own sum
    of the last `window` rows of the eager attention probabilities, max-pooled, ties to the earlier token,
    plus the window (SnapKV without the group reduction: KVCache-Factory's query_head mode)."""
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    finally:
        attention.install(model)
    rows = []
    n = len(ids)
    for probs in out.attentions:  # [1, H_q, T, T]
        summed = probs[0, :, n - window:, : n - window].sum(dim=1)  # [H_q, T - w]
        pooled = pool1d(summed, kernel, "max")
        heads = []
        for h in range(pooled.shape[0]):
            order = sorted(range(pooled.shape[1]), key=lambda j: (-float(pooled[h, j]), j))[: kept - window]
            heads.append(torch.tensor(sorted(order) + list(range(n - window, n))))
        rows.append(torch.stack(heads))
    return rows


def test_gqa_query_head_snapkv_is_per_query_head_topk_of_unreduced_scores():
    model = make_tiny_llama(layers=2, seed=3).to(torch.float64)
    p = prompt(n=80, seed=2)
    method = build("snapkv").method  # w = 8, k = 7, max
    budget = Budget(ratio=0.25)
    runs = {g: Engine(model, StubTokenizer(), decode="sequential").run(p, [Plan("snapkv", method, budget, g)])
            for g in ("kv_head", "query_head")}
    want = eager_window_topk(model, list(p.ids), 8, 7, budget.kept(80))
    got = runs["query_head"].generations[0].kept_indices
    for layer, (sel, ref) in enumerate(zip(got, want)):
        assert sel.indices.shape == (4, 20) and sel.is_uniform
        assert torch.equal(sel.indices, ref), layer
    # not vacuous: the two query heads of some KV head keep different sets, so per-KV-head storage could not hold it
    differs = any(not torch.equal(sel.indices[2 * h], sel.indices[2 * h + 1]) for sel in got for h in range(2))
    assert differs
    kv, qh = runs["kv_head"].generations[0], runs["query_head"].generations[0]
    assert kv.kept_indices[0].indices.shape == (2, 20)
    assert qh.cache_bytes == 2 * kv.cache_bytes  # g = 2: every kept token is stored once per query head
    assert qh.full_cache_bytes == kv.full_cache_bytes


def masked_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Full prompt cache at H_kv; query head h sees only the positions in ALLOWED[layer][h] (and every decode
    token), through an explicit -inf additive mask. No kvbench code."""
    allowed = ALLOWED[module.layer_idx]  # [H_q, L] bool over the prompt
    h_q, q_len, n = query.shape[1], query.shape[2], key.shape[2]
    g = h_q // key.shape[1]
    k = key.repeat_interleave(g, dim=1)[0]
    v = value.repeat_interleave(g, dim=1)[0]
    visible = torch.ones(h_q, q_len, n, dtype=torch.bool)
    visible[:, :, : allowed.shape[1]] = allowed[:, None, :]
    visible &= torch.ones(q_len, n, dtype=torch.bool).tril(n - q_len)[None]
    logits = (query[0] @ k.transpose(1, 2)) * scaling
    logits = logits + torch.zeros_like(logits).masked_fill(~visible, float("-inf"))
    out = torch.softmax(logits, dim=-1) @ v
    return out[None].transpose(1, 2).contiguous(), None


ALLOWED: list[torch.Tensor] = []
AttentionInterface.register("kvbench_test_qh_mask", masked_reference)


@pytest.mark.parametrize("name", ["snapkv", "h2o_prefill"])
def test_query_head_decode_logits_match_an_explicit_per_query_head_mask(name):
    model = make_tiny_llama(layers=2, seed=8)  # float32
    ids = list(prompt(n=T, seed=6).ids)
    plan = Plan(name, build(name).method, Budget(ratio=0.3), "query_head")
    observer = PrefillObserver([plan.method], 2, granularities=["query_head"])
    with torch.inference_mode():
        cache, _ = prefill(model, torch.tensor([ids]), observer)
        full = cache_layers(cache)
        kept = compress(model, plan, full, observer.scores, 0)
    ALLOWED.clear()
    for sel in kept.selections:
        mask = torch.zeros(sel.n_heads, T, dtype=torch.bool)
        for h, row in enumerate(sel.rows()):
            mask[h, row] = True
        ALLOWED.append(mask)
    assert kept.layers[0].keys.shape[0] == 4  # H_q heads stored
    tokens = [11, 200, 45, 3, 99]
    ours, ref = [], []
    with torch.inference_mode():
        ragged = RaggedCache([kept.layers], reserve=len(tokens), head_repeat=2)
        with attention.decoding(ragged):
            for i, tok in enumerate(tokens):
                ours.append(model(input_ids=torch.tensor([[tok]]), position_ids=torch.tensor([[T + i]]),
                                  past_key_values=ragged).logits[0, -1])
        reference = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([ids]), past_key_values=reference)
        model.set_attn_implementation("kvbench_test_qh_mask")
        try:
            for i, tok in enumerate(tokens):
                ref.append(model(input_ids=torch.tensor([[tok]]), position_ids=torch.tensor([[T + i]]),
                                 past_key_values=reference).logits[0, -1])
        finally:
            attention.install(model)
    for a, b in zip(ours, ref):
        assert (a - b).abs().max() < 1e-5
    # the reference is not trivially close: with every query head seeing its KV head's union it differs
    ALLOWED[:] = [m.reshape(2, 2, T).any(dim=1).repeat_interleave(2, dim=0) for m in ALLOWED]
    with torch.inference_mode():
        reference = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([ids]), past_key_values=reference)
        model.set_attn_implementation("kvbench_test_qh_mask")
        try:
            union = model(input_ids=torch.tensor([[tokens[0]]]), position_ids=torch.tensor([[T]]),
                          past_key_values=reference).logits[0, -1]
        finally:
            attention.install(model)
    assert (union - ours[0]).abs().max() > 1e-3


def test_positional_and_layer_shared_methods_keep_kv_head_storage():
    for name in ("fullkv", "streamingllm", "streamingllm_prefill", "sliding", "sink_recent", "tova", "chunkkv",
                 "random", "knorm"):
        assert storage_granularity(build(name).method, "query_head") == "kv_head", name
    for name in ("snapkv", "pyramidkv", "h2o_prefill", "h2o", "scissorhands"):
        assert storage_granularity(build(name).method, "query_head") == "query_head", name
    assert storage_granularity(build("chunkkv", {"per_head": "true"}).method, "query_head") == "query_head"
    assert storage_granularity(build("random", {"share": "per_head"}).method, "query_head") == "query_head"
    with pytest.raises(Exception, match="kv_head"):
        Plan("tova", build("tova").method, Budget(ratio=0.5), "query_head")


@pytest.mark.parametrize("scope", ["full", "context"])
def test_batched_mixed_granularities_equal_sequential(scope):
    model = make_tiny_llama(layers=2, seed=7).to(torch.float64)
    n = 72
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(9)).tolist()
    p = Prompt(ids=tuple(ids), question_start=n - 10, n_original_tokens=n, truncated=False, max_new_tokens=10,
               stop_ids=frozenset({65, 101}))
    plans = [Plan("fullkv", build("fullkv").method, Budget(ratio=1.0))]
    for name in ("snapkv", "pyramidkv", "h2o", "scissorhands", "streamingllm", "tova"):
        method = build(name).method
        for r in (0.2, 0.5):
            plans.append(Plan(name, method, Budget(ratio=r), storage_granularity(method, "query_head")))
            plans.append(Plan(name, method, Budget(ratio=r)))
    seq = Engine(model, StubTokenizer(), decode="sequential").run(p, plans, scope)
    bat = Engine(model, StubTokenizer(), decode="batched").run(p, plans, scope)
    for a, b in zip(seq.generations, bat.generations):
        assert a.token_ids == b.token_ids, (a.plan.label, a.plan.granularity, a.plan.budget)
        assert a.cache_bytes == b.cache_bytes and a.max_cache_tokens == b.max_cache_tokens
    by_key = {(g.plan.label, g.plan.budget, g.plan.granularity): g for g in seq.generations}
    for name in ("snapkv", "pyramidkv", "h2o", "scissorhands"):
        for r in (0.2, 0.5):
            qh, kv = by_key[(name, Budget(ratio=r), "query_head")], by_key[(name, Budget(ratio=r), "kv_head")]
            assert qh.cache_bytes == 2 * kv.cache_bytes, name


def test_fingerprints_move_only_under_query_head():
    plan = Plan("snapkv", build("snapkv").method, Budget(ratio=0.1))
    assert "granularity" not in runner.config_fields(plan, "full")
    qh = Plan("snapkv", plan.method, plan.budget, "query_head")
    assert runner.config_fields(qh, "full")["granularity"] == "query_head"
    opts = runner.RunOptions(methods=('snapkv', 'streamingllm', 'fullkv'), granularity="query_head")
    plans = runner.build_plans(opts)
    assert [(p.label, p.granularity) for p in plans] == [
        ("snapkv", "query_head"), ("streamingllm", "kv_head"), ("fullkv", "kv_head")]
    assert "streamingllm" in runner.granularity_note(opts, plans)
    assert runner.granularity_note(runner.RunOptions(methods=('snapkv',)), runner.build_plans(runner.RunOptions())) is None


def test_run_rows_report_granularity_and_g_times_the_bytes(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    from test_reliability import cli, run_args

    from kvbench.results import store

    for granularity in ("kv_head", "query_head"):
        code, _, err = cli(run_args(tiny_model_dir, tiny_data_dir, tmp_path / granularity, "--limit", "2",
                                    "--granularity", granularity), capsys)
        assert code == 0, err
    rows = {g: {(r["method"], r["_id"]): r for r in store.load_all_rows(tmp_path / g)} for g in ("kv_head", "query_head")}
    for key, kv in rows["kv_head"].items():
        qh = rows["query_head"][key]
        assert kv["granularity"] == "kv_head"
        if key[0] == "snapkv":
            assert qh["granularity"] == "query_head" and qh["cache_bytes"] == 2 * kv["cache_bytes"]
            assert qh["config_fp"] != kv["config_fp"]
        else:  # fullkv keeps H_kv storage and its fingerprint
            assert qh["granularity"] == "kv_head" and qh["cache_bytes"] == kv["cache_bytes"]
            assert qh["config_fp"] == kv["config_fp"]
    manifest = next((tmp_path / "query_head").rglob("manifests/*.json"))
    assert {p["granularity"] for p in json.loads(manifest.read_text())["plans"]} == {"kv_head", "query_head"}


def test_bad_granularity_is_one_line_and_exit_2(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    from test_reliability import cli, run_args

    code, out, err = cli(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "r", "--granularity", "head"), capsys)
    assert code == 2 and err.strip().splitlines() == [
        "kvbench: error: --granularity must be one of kv_head, query_head, got 'head'"]
    assert not (tmp_path / "r").exists()


def table_args(method_name: str, tmp_path, layers: int, q_heads: int, kv_heads: int) -> dict[str, str]:
    """Head tables for the methods that read one (a file per method, any positive values)."""
    from kvbench import headtables

    if method_name == "headkv":
        path = tmp_path / "headkv.json"
        headtables.write(path, "retrieval_reasoning",
                         {f"{l}-{h}": [float(1 + (l * 7 + h * 3) % 5)] for l in range(layers) for h in range(q_heads)}, {})
        return {"scores": str(path)}
    if method_name == "duo_attention":
        path = tmp_path / "duo.tsv"
        headtables.write(path, "duo_proxy", torch.rand(layers, kv_heads, generator=torch.Generator().manual_seed(0)), {})
        return {"pattern": str(path), "sink": "4", "recent": "8"}
    return {}


def test_every_prefill_method_runs_at_query_head_with_g_times_the_bytes(tmp_path):
    from kvbench.methods import METHODS

    model = make_tiny_llama(layers=2, seed=11)
    p = prompt(n=80, seed=12, new=3)
    names = [n for n, cls in METHODS.items() if not cls.continuous and n != "fullkv"]
    assert {"snapkv", "adakv", "headkv", "duo_attention"} <= set(names)
    plans = []
    for name in names:
        method = build(name, table_args(name, tmp_path, 2, 4, 2)).method
        for granularity in ("kv_head", storage_granularity(method, "query_head")):
            plans.append(Plan(name, method, Budget(ratio=0.25), granularity))
    gens = Engine(model, StubTokenizer()).run(p, plans).generations
    for kv, qh in zip(gens[::2], gens[1::2]):
        name = kv.plan.label
        if qh.plan.granularity == "kv_head":
            assert qh.cache_bytes == kv.cache_bytes, name
        elif name == "headkv":  # per-query-head caps vs their rounded group means
            assert abs(qh.cache_bytes / kv.cache_bytes - 2) < 0.05, name
        else:
            assert qh.cache_bytes == 2 * kv.cache_bytes, name
            assert all(sel.n_heads == 4 for sel in qh.kept_indices), name
