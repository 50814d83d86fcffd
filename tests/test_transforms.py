"""Transforms after selection (ThinK, KIVI), the `X+transform` composition, and the decoding-time wrapper
(methods-2.md §1.8, §2.17, §2.18, §2.22, §4), on tiny seeded models. kvpress parity is in
tests/test_kvpress_parity_transforms.py; the quantizer and the KIVI lifecycle in tests/test_kivi.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import RUN_TASK, make_tiny_llama, make_tiny_tokenizer
from test_reliability import cli

from kvbench.engine import Engine, Plan, attention
from kvbench.engine.compress import compress, full_layers
from kvbench.engine.prefill import PrefillObserver, prefill
from kvbench.errors import InputError
from kvbench.methods import build
from kvbench.methods.base import Budget, Method, SelectContext, Selection, topk_sorted
from kvbench.methods.decoding import DecodingDecoder
from kvbench.methods.think import ThinK
from kvbench.prompts import Prompt
from kvbench.results import store
from kvbench.runner import RunOptions, build_plans, config_fields


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(layers=2, seed=3)


def ids(n: int, seed: int = 5) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def compressed_plan(model, method: Method, budget: Budget, n: int = 200):
    """(full prefill layers, observer scores, the plan's Compressed) for a prefill of n tokens."""
    observer = PrefillObserver([method], model.config.num_hidden_layers)
    with torch.inference_mode():
        cache, _ = prefill(model, torch.tensor([ids(n)]), observer)
        full = full_layers(cache)
        out = compress(model, Plan("p", method, budget), full, observer.scores, 0)
    return full, observer, out


# ---- hand formulas for the bytes (methods-2 §1.8, §2.17, §2.18), written out independently -----------------
def think_bytes(k: int, d: int, pruned: int, recent: int, s: int) -> int:
    kept_full = min(recent, k)
    return ((k - kept_full) * (d - pruned) + kept_full * d) * s + k * d * s + -(-d // 8)


def kivi_bytes(k: int, d: int, bits: int, group: int, residual: int, s: int) -> int:
    n_k = 0 if k < residual else k - k % residual
    n_v = max(0, k - residual)
    keys = n_k * d * bits // 8 + (n_k // group) * d * 2 * s + (k - n_k) * d * s
    values = n_v * d * bits // 8 + n_v * -(-d // group) * 2 * s + (k - n_v) * d * s
    return keys + values


# ---- ThinK --------------------------------------------------------------------------------------------------
def test_think_zeroes_pruned_key_channels_except_the_recent_entries(model):
    method = build("snapkv+think", {"recent": "8", "channel_window": "16", "pruning_ratio": "0.4"}).method
    full, observer, out = compressed_plan(model, method, Budget(tokens=60))
    plain = compressed_plan(model, build("snapkv").method, Budget(tokens=60))[2]
    d = model.config.head_dim
    assert d == 16
    for layer, kept, ref, scores in zip(range(2), out.layers, plain.layers, observer.scores[method.scorer_key()].values()):
        zero = (kept.keys[:, :52] == 0).all(dim=1)  # [H, d]: channels zero in every pruned entry
        assert zero.sum(dim=1).tolist() == [6, 6]  # floor(0.4 * 16)
        # the kept channels and the recent entries are the eviction's keys, untouched; values too
        assert torch.equal(kept.keys[:, 52:], ref.keys[:, 52:])
        assert torch.equal(kept.keys[:, :52][~zero[:, None, :].expand(-1, 52, -1)],
                           ref.keys[:, :52][~zero[:, None, :].expand(-1, 52, -1)])
        assert torch.equal(kept.values, ref.values)
        # the channels are the lowest q-energy x k-energy, from the last 16 prefill queries (group mean)
        key_energy = ref.keys.float().pow(2).mean(dim=1)
        query_energy = scores.query_energy.reshape(2, 2, 16).mean(dim=1)  # query heads 2h, 2h + 1 -> KV head h
        want = torch.argsort(query_energy * key_energy, dim=-1)[:, :6].sort().values
        assert [torch.nonzero(z).flatten().tolist() for z in zero] == want.tolist()
    assert out.simulated
    assert out.stored_bytes == 2 * 2 * think_bytes(60, 16, 6, 8, 4)
    assert out.stages == [("select", 2 * 2 * 60 * 16 * 2 * 4), ("think", out.stored_bytes)]


def test_think_defaults_are_the_official_ones():
    method = build("think").method
    assert (method.pruning_ratio, method.channel_window, method.recent) == (0.4, 32, 32)
    assert method.inner_method.params() == build("snapkv_official").method.params()  # SnapKV w 32, k 7, max
    assert build("think_kvpress").method.recent == 0


@dataclass
class RaggedTopNorm(Method):
    """Head h keeps the kept * (h + 1) / H largest-norm keys: heads of different lengths."""

    name: ClassVar[str] = "ragged_top_norm"

    def select(self, ctx: SelectContext) -> Selection:
        norms = ctx.keys.float().norm(dim=-1)
        return Selection.from_rows([topk_sorted(norms[h][None], ctx.kept * (h + 1) // ctx.n_kv_heads)[0]
                                    for h in range(ctx.n_kv_heads)])


def test_think_and_kivi_follow_each_heads_own_length(model):
    think = ThinK(inner="fullkv", recent=4, pruning_ratio=0.5).with_inner(RaggedTopNorm())
    _, _, out = compressed_plan(model, think, Budget(tokens=80))
    for layer in out.layers:
        assert layer.lengths.tolist() == [40, 80]
        for h, n in enumerate(layer.lengths.tolist()):
            zero = (layer.keys[h, : n - 4] == 0).all(dim=0)
            assert int(zero.sum()) == 8 and not (layer.keys[h, n - 4 : n][:, zero] == 0).all()
    assert out.stored_bytes == 2 * (think_bytes(40, 16, 8, 4, 4) + think_bytes(80, 16, 8, 4, 4))
    kivi = build("kivi2", {"group_size": "8", "residual": "32"}).method.with_inner(RaggedTopNorm())
    _, _, out = compressed_plan(model, kivi, Budget(tokens=80))
    assert out.stored_bytes == 2 * (kivi_bytes(40, 16, 2, 8, 32, 4) + kivi_bytes(80, 16, 2, 8, 32, 4))


def test_think_then_kivi_bytes_by_hand(model):
    # 70 kept, recent 10, R = 32, G = 8, p = 6 of d = 16 channels: keys 0 .. 63 quantized, of which 60 .. 63
    # are recent (unpruned) ones, so the last block of 8 keeps all 16 channels; keys 64 .. 69 residual
    # (recent, unpruned); values 0 .. 37 quantized, 32 residual
    method = build("snapkv+think+kivi2", {"recent": "10", "group_size": "8", "residual": "32"}).method
    _, _, out = compressed_plan(model, method, Budget(tokens=70))
    s, d, p = 4, 16, 6
    key_payload = (60 * (d - p) + 4 * d) * 2  # bits
    key_groups = (7 * (d - p) + 1 * d) * 2 * s
    key_residual = 6 * d * s
    values = 38 * d * 2 // 8 + 38 * 2 * 2 * s + 32 * d * s
    per_head = key_payload // 8 + key_groups + key_residual + values + d // 8
    assert per_head == 166 + 688 + 384 + 2808 + 2
    assert out.stored_bytes == 2 * 2 * per_head
    assert [stage for stage, _ in out.stages] == ["select", "think", "kivi2"]
    assert out.stages[0][1] > out.stages[1][1] > out.stages[2][1] == out.stored_bytes


# ---- composition and the registry --------------------------------------------------------------------------
def test_composition_names_both_parts():
    choice = build("snapkv+kivi4", {"window_size": "16", "bits": "2"})
    assert (choice.label, choice.base) == ("snapkv+kivi4", "kivi4")
    params = choice.method.params()
    assert params["inner"] == "snapkv" and params["bits"] == 2 and params["inner_params"]["window_size"] == 16
    plan = Plan(choice.label, choice.method, Budget(ratio=0.1))
    fp = store.digest(config_fields(plan, "full"))
    alone = [build("kivi4").method, build("snapkv").method, build("snapkv+kivi4").method]
    assert all(store.digest(config_fields(Plan("x", m, Budget(ratio=0.1)), "full")) != fp for m in alone)
    assert json.dumps(params)  # rows serialise it
    assert choice.method.stages() == ("kivi4",)  # the registered transform, here with bits=2
    assert choice.method.window() == 16 and choice.method.scorer_key() == build("snapkv", {"window_size": "16"}).method.scorer_key()


@pytest.mark.parametrize("name,args,message", [
    ("snapkv+h2o", {}, "'h2o' is not a transform"),
    ("h2o+kivi4", {}, "keeps evicting while decoding"),
    ("snapkv+kivi4+think", {}, "must come before the quantize transform"),
    ("snapkv+kivi2+kivi4", {}, "already applies a quantize transform"),
    ("snapkv+", {}, "empty part"),
    ("snapkv+kivi4", {"nope": "1"}, "--method-arg nope: kivi4 (over snapkv) has no parameter 'nope'"),
    ("kivi4", {"residual": "48"}, "residual must be a positive multiple of group_size"),
    ("kivi4", {"storage": "packed"}, "packed storage is not implemented"),
    ("think", {"pruning_ratio": "1"}, "pruning_ratio must be in [0, 1)"),
    ("decoding", {"inner": "streamingllm"}, "position_mode=contiguous"),
    ("decoding", {"interval": "0"}, "interval must be >= 1"),
    ("decoding", {"inner": "snapkv+kivi4"}, "wrap an eviction method"),
    ("think_kvpress+think", {}, "already applies a channel_mask transform"),
])
def test_bad_compositions_are_refused_with_one_clear_line(name, args, message):
    with pytest.raises(InputError, match=None) as info:
        build(name, args)
    assert message in str(info.value)


def test_names_with_a_plus_that_are_registered_stay_themselves():
    assert build("sink+recent").base == "sink_recent"  # an alias, not a composition


def test_kivi_alone_is_one_full_budget_plan_per_run():
    plans = build_plans(RunOptions(methods=('kivi4', 'snapkv+kivi4', 'decoding'), ratios=[0.1, 0.2]))
    assert [(p.label, p.budget.label) for p in plans] == [
        ("kivi4", "full"), ("snapkv+kivi4", "r0.1"), ("snapkv+kivi4", "r0.2"), ("decoding", "r0.1"), ("decoding", "r0.2")]


def test_method_args_reach_the_part_that_has_them():
    plans = build_plans(RunOptions(methods=('snapkv+think+kivi2',), ratios=[0.1],
                                   method_args={"window_size": "16", "pruning_ratio": "0.25", "bits": "4"}))
    method = plans[0].method
    assert method.bits == 4
    assert method.inner_method.pruning_ratio == 0.25
    assert method.inner_method.inner_method.window_size == 16


def test_methods_command_lists_the_new_methods(capsys):
    code, out, _ = cli(["methods"], capsys)
    assert code == 0
    names = {line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")}
    assert {"think", "kivi2", "kivi4", "decoding"} <= names


def test_a_bad_composition_on_the_command_line_writes_nothing(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    results = tmp_path / "results"
    code, out, err = cli(["run", "--model", str(tiny_model_dir), "--method", "snapkv+h2o", "--tasks", RUN_TASK,
                          "--data-dir", str(tiny_data_dir), "--results", str(results), "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "is not a transform" in err and "Traceback" not in err
    assert not results.exists()


# ---- rows: cache_bytes is the formula's, the storage says simulated ---------------------------------------------
def test_rows_report_formula_bytes_and_simulated_storage(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    results = tmp_path / "results"
    code, out, err = cli(["run", "--model", str(tiny_model_dir), "--method", "snapkv,snapkv+kivi4,kivi2,think",
                        "--ratio", "0.5", "--method-arg", "residual=32", "--method-arg", "group_size=8",
                        "--tasks", RUN_TASK, "--data-dir", str(tiny_data_dir), "--results", str(results),
                        "--device", "cpu", "--limit", "2"], capsys)
    assert code == 0, err
    assert "snapkv+kivi4(group_size=8,residual=32): select -> kivi4; storage simulated" in out + err  # the run log
    rows = store.load_all_rows(results)
    assert len(rows) == 8
    d, heads, layers, s = 8, 2, 2, 4  # the tiny model folder: hidden 32, 4 heads / 2 KV heads, float32
    for row in rows:
        method = row["method"].split("(")[0]  # the label names the --method-arg values: kivi2(group_size=8,...)
        t = row["prefilled_tokens"]
        k = round(0.5 * t) if method != "kivi2" else t
        want = {"snapkv": 2 * k * d * s, "snapkv+kivi4": kivi_bytes(k, d, 4, 8, 32, s),
                "kivi2": kivi_bytes(k, d, 2, 8, 32, s), "think": think_bytes(k, d, int(0.4 * d), 32, s)}[method]
        assert row["cache_bytes"] == layers * heads * want, method
        assert row["storage"] == ("physical" if method == "snapkv" else "simulated")
        assert row["full_cache_bytes"] == layers * heads * 2 * t * d * s
        assert row["byte_ratio"] == round(row["cache_bytes"] / row["full_cache_bytes"], 6)
        assert row["token_keep_ratio"] == round(k / t, 6)
        assert row["cache_bytes_allocated"] >= layers * heads * 2 * k * d * s > row["cache_bytes"] or method == "snapkv"
        assert (row["stages"] is None) == (method == "snapkv")
        if row["stages"]:
            assert row["stages"][-1]["bytes"] == row["cache_bytes"]
            assert row["stages"][0] == {"stage": "select", "bytes": layers * heads * 2 * k * d * s}
    assert {r["budget"] for r in rows if r["method"].startswith("kivi2")} == {"full"}


# ---- decoding-time compression -----------------------------------------------------------------------------
def decode_trace(model, method: Method, budget: Budget, context: int = 96, question: int = 5, new: int = 12):
    lengths: list[int] = []
    original = DecodingDecoder.on_step

    def recording(self, step):
        keep = original(self, step)
        if self.layer == 0:
            lengths.append(self.positions.shape[1])
        return keep

    prompt = Prompt(ids=tuple(ids(context + question)), question_start=context,
                    n_original_tokens=context + question, truncated=False, max_new_tokens=new, stop_ids=frozenset())
    DecodingDecoder.on_step = recording
    try:
        run = Engine(model, make_tiny_tokenizer()).run(prompt, [Plan("d", method, budget)], "context")
    finally:
        DecodingDecoder.on_step = original
    return lengths, run.generations[0]


def test_decoding_compresses_every_interval_to_the_target(model):
    lengths, gen = decode_trace(model, build("decoding", {"interval": "4"}).method, Budget(tokens=40))
    assert lengths == [101, 102, 103, 40, 41, 42, 43, 40, 41, 42, 43, 40]  # methods-2 §2.22's trace
    assert gen.kept_entries == 2 * 2 * 96 and gen.cache_bytes == gen.full_cache_bytes  # the prefill is kept whole
    assert gen.final_cache_tokens == [40, 40]


def test_decoding_ratio_target_follows_the_tokens_seen(model):
    lengths, _ = decode_trace(model, build("decoding", {"interval": "3"}).method, Budget(ratio=0.5))
    # forward i (0 = the question, 5 tokens) has seen 101 + i tokens; every third compresses to round(0.5 * seen)
    want, length = [], 96
    for i in range(12):
        length += 5 if i == 0 else 1
        if i % 3 == 2:
            length = min(length, round(0.5 * (101 + i)))
        want.append(length)
    assert lengths == want
    assert lengths[:3] == [101, 102, 52]


def test_decoding_can_compress_the_prefill_too(model):
    lengths, gen = decode_trace(model, build("decoding", {"interval": "4", "prefill": "true"}).method, Budget(tokens=40))
    assert lengths[:4] == [45, 46, 47, 40]
    assert gen.kept_entries == 2 * 2 * 40


def rope_queries(model, tokens: list[int]) -> list[torch.Tensor]:
    """Per layer, the post-RoPE queries of an uncompressed forward over `tokens`: [H_q, T, d]."""
    seen: dict[int, torch.Tensor] = {}

    class Grab:
        def on_attention(self, module, query, key, value, lse=None):
            seen[module.layer_idx] = query[0].clone()

    with torch.inference_mode(), attention.observing(Grab()):
        model(input_ids=torch.tensor([tokens]), position_ids=torch.arange(len(tokens))[None])
    return [seen[i] for i in range(len(seen))]


@pytest.mark.parametrize("quirk", [False, True])
def test_window_scorers_get_the_buffered_queries_rotated_at_their_own_positions(model, quirk):
    method = build("decoding", {"inner": "snapkv", "window_size": "4", "interval": "6",
                                "kvpress_rope_quirk": str(quirk)}).method
    captured: list[torch.Tensor] = []
    inner = method.inner_method
    score = inner.score
    inner.score = lambda view: captured.append(view.query.clone()) or score(view)
    try:
        lengths, gen = decode_trace(model, method, Budget(tokens=40))
    finally:
        del inner.score
    assert lengths[5] == 40  # the sixth forward compressed (the question, then five tokens)
    tokens = ids(101) + gen.token_ids[:5]  # what the model had seen at that forward: positions 0 .. 105
    reference = rope_queries(model, tokens)[0][:, -4:]  # layer 0, the last 4 queries, uncompressed until then
    got = captured[0]
    if not quirk:
        assert torch.allclose(got, reference, atol=1e-5)
    else:
        from kvbench.engine import rope

        rotated = rope.for_model(model).rotate(reference, torch.tensor([3, 2, 1, 0]).expand(4, 4))
        assert torch.allclose(got, rotated, atol=1e-4)
        assert not torch.allclose(got, reference, atol=1e-2)


# ---- a sweep on a real LongBench sample: every row's cache_bytes is what §1.8 predicts ---------------------------
SWEEP = "think,think_kvpress,kivi2,kivi4,snapkv+kivi4,snapkv+kivi2,snapkv+think+kivi2,decoding"


def predicted_bytes(method: str, t: int, d: int, s: int) -> int:
    """Per (layer, KV head): SmolLM2's head dim 64, ratio 0.1 (k = round(0.1 T)), lambda 0.4 (25 channels)."""
    k = round(0.1 * t)
    return {
        "think": think_bytes(k, d, 25, 32, s),
        "think_kvpress": think_bytes(k, d, 25, 0, s),
        "kivi2": kivi_bytes(t, d, 2, 32, 128, s),
        "kivi4": kivi_bytes(t, d, 4, 32, 128, s),
        "snapkv+kivi4": kivi_bytes(k, d, 4, 32, 128, s),
        "snapkv+kivi2": kivi_bytes(k, d, 2, 32, 128, s),
        "decoding": 2 * t * d * s,  # decoding-time compression keeps the prefill whole
    }[method]


@pytest.mark.slow
def test_sweep_on_longbench_rows_hold_the_predicted_bytes(smollm2, shared_longbench, tmp_path, capsys):
    results = tmp_path / "results"
    code, _, err = cli(["run", "--model", "smollm2-135m", "--method", SWEEP, "--ratio", "0.1", "--tasks", RUN_TASK,
                        "--data-dir", str(shared_longbench / "minilongbench"), "--limit", "1", "--max-length", "3000",
                        "--results", str(results), "--device", "cpu"], capsys)
    assert code == 0, err
    rows = {row["method"]: row for row in store.load_all_rows(results)}
    assert set(rows) == set(SWEEP.split(","))
    config = smollm2.model.config
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for method, row in rows.items():
        t = row["prefilled_tokens"]
        assert t > 1280  # 10% of the prompt is more than the 128-entry residual: KIVI quantizes
        if method == "snapkv+think+kivi2":
            continue  # its layout is checked by hand on the tiny model
        want = layers * heads * predicted_bytes(method, t, d, 4)
        assert row["cache_bytes"] == want, (method, row["cache_bytes"], want)  # exact, so within 1%
        assert row["storage"] == ("physical" if method == "decoding" else "simulated")
