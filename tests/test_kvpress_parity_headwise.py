"""Head-wise parity with NVIDIA kvpress 0.5.5 on the seeded tiny Llama of methods-2 §5.1: the (layer, KV head,
position) entries kvpress MASKS (its head-wise presses keep the cache whole and record what they evict in
`masked_key_indices`; scripts/kvpress_headwise.py reads them) are exactly the context entries kvbench's
ragged selection does NOT keep.

- AdaKV(SnapKV w = 4, k = 5, avg) at cr 0.5 and 0.8: kvbench `adakv` over `snapkv` with kvpress's settings;
- CriticalAdaKV(SnapKV w = 4) likewise: kvbench `critical_adakv`;
- DuoAttention with an injected pattern (sink 8, recent 16, head ratio 0.5): the masked set (streaming heads x
  [8, T - 16)) and the compression ratio kvpress reports.

Budgets in kvpress's rounding (n_kept = max(1, int(T (1 - cr)))), --scope context, as the existing parity
tests. Skipped when .venv-kvpress is missing (scripts/setup_kvpress.sh)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

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


def save_reference_llama(path: Path) -> Path:
    """methods-2 §5.1: LlamaConfig(vocab 256, hidden 64, intermediate 128, 2 layers, 4 heads / 2 KV heads,
    head_dim 16, rope_theta 1e4, 4096 positions), torch.manual_seed(0), every parameter times 3."""
    from conftest import make_tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e4,
                         max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(3)
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from kvbench.models import load_model, resolve_model

    folder = save_reference_llama(tmp_path_factory.mktemp("ref") / "methods2-llama")
    loaded = load_model(resolve_model(str(folder)), device="cpu", dtype="float32")
    context = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(1))[0].tolist()
    question = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))[0].tolist()
    return folder, loaded, context, question


def kvpress_masked(python: Path, folder: Path, context: list[int], question: list[int], presses: list[dict]):
    request = {"op": "run", "context_ids": context, "question_ids": question, "max_new_tokens": 1,
               "masked": True, "presses": presses}
    proc = subprocess.run([str(python), str(SIDE), "--model-dir", str(folder), "--threads", "1"],
                          input=json.dumps(request) + "\n", capture_output=True, text=True, timeout=900,
                          env=offline_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[0])["ready"]
    return json.loads(lines[1])["results"]


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


def test_adakv_snapkv_masks_what_kvpress_masks(kvpress_python, reference):
    folder, loaded, context, question = reference
    presses = [{"name": "adakv", "compression_ratio": cr, "window_size": 4, "kernel_size": 5} for cr in RATIOS]
    theirs = kvpress_masked(kvpress_python, folder, context, question, presses)
    method = build("adakv", {"window_size": "4", "kernel_size": "5", "pooling": "avg"}).method
    plans = [Plan("adakv", method, Budget(tokens=compute_n_kept(T, cr))) for cr in RATIOS]
    ours = kvbench_selections(loaded, context, question, plans)
    for cr, mine, result in zip(RATIOS, ours, theirs):
        assert masked_from(mine, T) == result["masked"], cr
        lengths = [sel.lengths.tolist() for sel in mine]
        assert all(sum(row) == 2 * compute_n_kept(T, cr) for row in lengths)
        assert any(len(set(row)) > 1 for row in lengths), "every head kept the same count: not head-adaptive"
