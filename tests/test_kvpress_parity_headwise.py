"""Head-wise parity with NVIDIA kvpress 0.5.5 on the seeded tiny Llama of methods-2 §5.1: the (layer, KV head,
position) entries kvpress MASKS (its head-wise presses keep the cache whole and record what they evict in
`masked_key_indices`; scripts/kvpress_headwise.py reads them) are exactly the context entries kvbench's
ragged selection does NOT keep.

- AdaKV(SnapKV w = 4, k = 5, avg) at cr 0.5 and 0.8: kvbench `adakv` over `snapkv` with kvpress's settings;
- CriticalAdaKV(SnapKV w = 4) likewise: kvbench `critical_adakv`;
- AdaKV(ExpectedAttention) at epsilon 0 and 1e-2: kvbench's expected_attention_adakv presets;
- DuoAttention with an injected pattern (sink 8, recent 16, head ratio 0.5): the masked set (streaming heads x
  [8, T - 16)) and the compression ratio kvpress reports.

Budgets in kvpress's rounding (n_kept = max(1, int(T (1 - cr)))), --scope context, as the existing parity
tests. Skipped when .venv-kvpress is missing (scripts/setup_kvpress.sh)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from test_kvpress_parity import SIDE, kvpress_python, offline_env  # noqa: F401  (kvpress_python: a fixture)

from kvbench.engine import Engine, Plan
from kvbench.methods import build
from kvbench.methods.base import Budget, Selection
from kvbench.prompts import Prompt

T = 96
RATIOS = (0.5, 0.8)


def compute_n_kept(n: int, cr: float) -> int:
    """kvpress 0.5.5 utils.compute_n_kept (L104-114)."""
    return 0 if cr >= 1 else max(1, int(n * (1 - cr)))


EA_EPSILONS = (0.0, 1e-2)  # the bare press's default, and kvpress's leaderboard "expected_attention"
DUO_PATTERN = torch.rand(2, 2, generator=torch.Generator().manual_seed(3)).tolist()  # untied gates
DUO_TEXTS = ["The lighthouse keeper counted ships every night. " * 12, "Rain fell on the quiet harbour town. " * 9,
             "A list: apples, pears, plums, figs, and more apples. " * 7]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import save_reference_llama
    from kvbench.models import load_model, resolve_model

    folder = tmp_path_factory.mktemp("ref") / "methods2-llama"
    save_reference_llama(folder, add_bos=False)  # no BOS: its id 256 is outside this vocabulary
    loaded = load_model(resolve_model(str(folder)), device="cpu", dtype="float32")
    context = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(1))[0].tolist()
    question = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))[0].tolist()
    return folder, loaded, context, question


@pytest.fixture(scope="module")
def theirs(kvpress_python, reference) -> dict:
    """kvpress's answers for every check of this module, from one side-car process."""
    folder, _, context, question = reference
    presses = [{"name": name, "compression_ratio": cr, "window_size": 4, "kernel_size": 5}
               for name in ("adakv", "critical_adakv") for cr in RATIOS]
    presses += [{"name": "adakv", "inner": "expected_attention", "epsilon": eps, "compression_ratio": cr}
                for eps in EA_EPSILONS for cr in RATIOS]
    presses.append({"name": "duo_attention", "pattern": DUO_PATTERN, "sink": 8, "recent": 16,
                    "head_compression_ratio": 0.5})
    requests = [{"op": "run", "context_ids": context, "question_ids": question, "max_new_tokens": 1, "masked": True,
                 "presses": presses}, {"op": "duo_on_the_fly", "texts": DUO_TEXTS, "q_len": 500}]
    proc = subprocess.run([str(kvpress_python), str(SIDE), "--model-dir", str(folder), "--threads", "1"],
                          input="".join(json.dumps(r) + "\n" for r in requests), capture_output=True, text=True,
                          timeout=900, env=offline_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert lines[0]["ready"]
    results = lines[1]["results"]
    n_ea = len(EA_EPSILONS) * len(RATIOS)
    return {"adakv": results[0:2], "critical_adakv": results[2:4], "adakv_expected_attention": results[4:4 + n_ea],
            "duo_attention": results[4 + n_ea], "duo_on_the_fly": lines[2]["scores"]}


def kvbench_selections(loaded, context: list[int], question: list[int], plans: list[Plan]) -> list[list[Selection]]:
    prompt = Prompt(ids=tuple(context + question), question_start=len(context), truncated=False,
                    n_original_tokens=len(context) + len(question), max_new_tokens=1, stop_ids=frozenset())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = Engine(loaded.model, loaded.tokenizer, decode="sequential").run(prompt, plans, "context")
    finally:
        torch.set_num_threads(threads)
    return [g.kept_indices for g in run.generations]


def masked_from(selections: list[Selection], n_tokens: int) -> list[list[list[int]]]:
    """[layer][head] -> the positions NOT kept."""
    return [[sorted(set(range(n_tokens)) - set(row.tolist())) for row in sel.rows()] for sel in selections]


def test_adakv_snapkv_masks_what_kvpress_masks(theirs, reference):
    _, loaded, context, question = reference
    method = build("adakv", {"window_size": "4", "kernel_size": "5", "pooling": "avg"}).method
    plans = [Plan("adakv", method, Budget(tokens=compute_n_kept(T, cr))) for cr in RATIOS]
    ours = kvbench_selections(loaded, context, question, plans)
    for cr, mine, result in zip(RATIOS, ours, theirs["adakv"]):
        assert masked_from(mine, T) == result["masked"], cr
        lengths = [sel.lengths.tolist() for sel in mine]
        assert all(sum(row) == 2 * compute_n_kept(T, cr) for row in lengths)
        assert any(len(set(row)) > 1 for row in lengths), "every head kept the same count: not head-adaptive"
    # methods-2 §2.13's verified allocation at cr 0.5 (n_kept = 48)
    assert [sel.lengths.tolist() for sel in ours[0]] == [[44, 52], [67, 29]]


def test_critical_adakv_masks_what_kvpress_masks(theirs, reference):
    """CriticalAdaKVPress(SnapKVPress(w = 4, k = 5)): identical masks at cr 0.5 and 0.8 (methods-2 §2.14's
    verified claim). Here every head's forced tokens (its safeguard n_safe or stage 1's int(rho b_h)) cover the
    window, so kvbench's always-kept window (critical_adakv's documented edge) changes nothing."""
    _, loaded, context, question = reference
    method = build("critical_adakv", {"window_size": "4", "kernel_size": "5", "pooling": "avg"}).method
    plans = [Plan("critical_adakv", method, Budget(tokens=compute_n_kept(T, cr))) for cr in RATIOS]
    ours = kvbench_selections(loaded, context, question, plans)
    for cr, mine, result in zip(RATIOS, ours, theirs["critical_adakv"]):
        assert masked_from(mine, T) == result["masked"], cr
        assert all(sel.n_entries == 2 * compute_n_kept(T, cr) for sel in mine)
    assert [sel.lengths.tolist() for sel in ours[0]] == [[44, 52], [67, 29]]  # §2.14: Ada-KV's budgets at cr 0.5


@pytest.mark.parametrize("eps", EA_EPSILONS)
def test_adakv_expected_attention_masks_what_kvpress_masks(theirs, reference, eps):
    """AdaKVPress(ExpectedAttentionPress(epsilon)) = kvbench expected_attention_adakv (epsilon 0) and
    expected_attention_adakv_kvpress (epsilon 1e-2, kvpress's leaderboard "expected_attention")."""
    _, loaded, context, question = reference
    label = "expected_attention_adakv" if eps == 0 else "expected_attention_adakv_kvpress"
    method = build(label).method
    assert method.inner_method.epsilon == eps
    plans = [Plan(label, build(label).method, Budget(tokens=compute_n_kept(T, cr))) for cr in RATIOS]
    ours = kvbench_selections(loaded, context, question, plans)
    results = theirs["adakv_expected_attention"][EA_EPSILONS.index(eps) * len(RATIOS):][: len(RATIOS)]
    for cr, mine, result in zip(RATIOS, ours, results):
        assert result["press"]["epsilon"] == eps and result["press"]["compression_ratio"] == cr
        assert masked_from(mine, T) == result["masked"], cr
        assert all(sel.n_entries == 2 * compute_n_kept(T, cr) for sel in mine)


def test_duo_attention_injected_pattern_masks_and_reports_what_kvpress_does(theirs, reference, tmp_path):
    _, loaded, context, question = reference
    pattern = tmp_path / "full_attention_heads.tsv"
    pattern.write_text("\n".join("\t".join(repr(v) for v in row) for row in DUO_PATTERN) + "\n")
    method = build("duo_attention", {"pattern": str(pattern), "sink": "8", "recent": "16",
                                     "allocation": "head_ratio", "head_ratio": "0.5"}).method
    ours = kvbench_selections(loaded, context, question, [Plan("duo_attention", method, Budget(ratio=0.5))])[0]
    result = theirs["duo_attention"]
    assert masked_from(ours, T) == result["masked"]
    masked = [m for heads in result["masked"] for m in heads]
    assert sorted(masked) == [[], [], list(range(8, T - 16)), list(range(8, T - 16))]  # round(4 x 0.5) streaming
    kept = sum(sel.n_entries for sel in ours)
    assert abs((1 - kept / (2 * 2 * T)) - result["ratio"]) < 1e-12
    assert result["ratio"] == pytest.approx(0.5 * (1 - 24 / T))  # 0.375: methods-2 §2.19's verified value


def test_duo_proxy_pattern_equals_kvpress_on_the_fly(theirs, reference):
    from kvbench.duo_patterns import proxy_pattern

    _, loaded, _, _ = reference
    ids = [loaded.tokenizer.encode(text, add_special_tokens=True) for text in DUO_TEXTS]
    ours = proxy_pattern(loaded.model, ids)
    want = torch.tensor(theirs["duo_on_the_fly"], dtype=torch.float64)
    assert ours.shape == want.shape == (2, 2)
    assert torch.allclose(ours, want, rtol=0, atol=1e-6), (ours, want)
