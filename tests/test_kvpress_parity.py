"""P3(a): kvbench keeps exactly the context positions NVIDIA kvpress 0.5.5 keeps, for KnormPress,
StreamingLLMPress and SnapKVPress with kvpress's settings (compression_ratio = 1 - ratio, n_kept =
int(T * (1 - compression_ratio)), context-only scope, SnapKV window 64, kernel 5, avg pooling), per layer and
KV head, on the same token ids.

kvpress runs in its own virtualenv (.venv-kvpress, built by scripts/setup_kvpress.sh: it needs transformers
< 5.3) through scripts/kvpress_side.py; these tests are skipped when that environment is missing or broken.
No network: both sides load local model folders. The fast test uses a small seeded Llama saved to a temporary
folder; the slow one the real SmolLM2-135M on a LongBench prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvbench.engine import Engine, Plan
from kvbench.methods import build
from kvbench.methods.base import Budget
from kvbench.prompts import Prompt

ROOT = Path(__file__).resolve().parents[1]
KVPRESS_PYTHON = ROOT / ".venv-kvpress" / "bin" / "python"
SIDE = ROOT / "scripts" / "kvpress_side.py"

# kvbench preset -> kvpress press with the same settings
PRESSES = {
    "knorm": {"name": "knorm"},
    "streamingllm_prefill": {"name": "streamingllm", "n_sink": 4},
    "snapkv_kvpress": {"name": "snapkv", "window_size": 64, "kernel_size": 5},
}
COMPRESSION_RATIOS = (0.9, 0.75, 0.5)  # kept 10%, 25%, 50%


def offline_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@pytest.fixture(scope="session")
def kvpress_python() -> Path:
    if not KVPRESS_PYTHON.is_file():
        pytest.skip(f"{KVPRESS_PYTHON} not found (build it with scripts/setup_kvpress.sh)")
    check = subprocess.run([str(KVPRESS_PYTHON), "-c", "import kvpress, importlib.metadata as m; "
                            "print(m.version('kvpress'))"], capture_output=True, text=True, timeout=300,
                           env=offline_env())
    if check.returncode != 0:
        pytest.skip(f"the kvpress environment does not work: {check.stderr.strip().splitlines()[-1:]}")
    if check.stdout.strip() != "0.5.5":
        pytest.skip(f"kvpress {check.stdout.strip()} installed; these checks are for 0.5.5")
    return KVPRESS_PYTHON


def kvpress_kept(python: Path, model_dir: Path, context: list[int], question: list[int]) -> list[dict]:
    """kvpress's kept positions for every (press, ratio), from scripts/kvpress_side.py."""
    request = {"op": "run", "context_ids": context, "question_ids": question, "max_new_tokens": 1, "kept": True,
               "presses": [{**PRESSES[m], "compression_ratio": cr} for m in PRESSES for cr in COMPRESSION_RATIOS]}
    proc = subprocess.run([str(python), str(SIDE), "--model-dir", str(model_dir), "--threads",
                           str(torch.get_num_threads())], input=json.dumps(request) + "\n", capture_output=True,
                          text=True, timeout=1800, env=offline_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[0])["ready"]
    return json.loads(lines[1])["results"]


def kvbench_kept(model, tokenizer, context: list[int], question: list[int]) -> list[tuple[Plan, list]]:
    """kvbench's kept positions, scope context, budgets in kvpress's rounding."""
    n = len(context)
    plans = [Plan(m, build(m).method, Budget(tokens=int(n * (1 - cr)))) for m in PRESSES for cr in COMPRESSION_RATIOS]
    recorded: list[list[torch.Tensor]] = []
    for plan in plans:  # what select() returns per layer, whatever Generation exposes
        calls: list[torch.Tensor] = []
        recorded.append(calls)
        select = plan.method.select
        plan.method.select = lambda ctx, select=select, calls=calls: calls.append(select(ctx)) or calls[-1]
    prompt = Prompt(ids=tuple(context + question), question_start=n, n_original_tokens=n + len(question),
                    truncated=False, max_new_tokens=1, stop_ids=frozenset())
    Engine(model, tokenizer).run(prompt, plans, "context")
    return [(plan, [[sorted(head) for head in layer.tolist()] for layer in calls])
            for plan, calls in zip(plans, recorded)]


def key_norms(model, context: list[int]) -> list[torch.Tensor]:
    """Per layer, the L2 norms of the context's cached keys ([H_kv, T], fp32): KnormPress's scores, negated."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([context]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return [torch.linalg.vector_norm(layer.keys[0], dim=-1, dtype=torch.float32) for layer in cache.layers]


def assert_same(ours: list[tuple[Plan, list]], theirs: list[dict], norms: list[torch.Tensor]) -> int:
    """Every (layer, KV head) kept set identical. The one allowed difference: KnormPress's exact score ties at
    the budget boundary, which kvbench gives to the earlier token (its documented rule) and torch.topk to
    whichever it meets first. They happen in layer 0, where a repeated token has the same key up to RoPE, a
    rotation, so equal norms. Returns how many sets differed only by such ties."""
    assert len(ours) == len(theirs)
    tie_only = 0
    for (plan, mine), result in zip(ours, theirs):
        press = result["press"]
        assert PRESSES[plan.label]["name"] == press["name"]
        assert result["kept_per_layer"] == [plan.budget.tokens] * len(mine), (plan.label, press)
        for layer, (a, b) in enumerate(zip(mine, result["kept"], strict=True)):
            for head, (x, y) in enumerate(zip(a, b, strict=True)):
                if x == y:
                    continue
                where = f"{plan.label} vs {press['name']} cr={press['compression_ratio']} layer {layer} head {head}"
                assert press["name"] == "knorm", f"{where}: {len(set(x) ^ set(y))} positions differ"
                scores = norms[layer][head]
                boundary = scores.sort().values[plan.budget.tokens - 1].item()
                differing = sorted(set(x) ^ set(y))
                assert all(scores[p].item() == boundary for p in differing), (
                    f"{where}: positions {differing} differ and are not an exact tie at the boundary")
                tie_only += 1
    return tie_only


def save_sharp_llama(path: Path) -> Path:
    """A seeded 4-layer Llama (hidden 64, 4 heads / 2 KV heads, head_dim 16) with sharpened queries and keys,
    so attention scores are far from uniform and SnapKV's ranking is decided by real differences."""
    from conftest import BOS_ID, EOS_ID, TINY_VOCAB, make_tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def test_kept_indices_match_kvpress_tiny_llama(kvpress_python, tmp_path):
    from kvbench.models import load_model, resolve_model

    model_dir = save_sharp_llama(tmp_path / "sharp-llama")
    loaded = load_model(resolve_model(str(model_dir)), device="cpu", dtype="float32")
    gen = torch.Generator().manual_seed(3)
    context = torch.randint(0, 256, (1000,), generator=gen).tolist()  # 10% = 100 > the 64-token window
    question = torch.randint(0, 256, (12,), generator=gen).tolist()
    ours = kvbench_kept(loaded.model, loaded.tokenizer, context, question)
    theirs = kvpress_kept(kvpress_python, model_dir, context, question)
    assert_same(ours, theirs, key_norms(loaded.model, context))


@pytest.mark.slow
def test_kept_indices_match_kvpress_smollm2(kvpress_python, smollm2, shared_longbench):
    from kvbench.data import load_task_specs, read_jsonl
    from kvbench.models import weights_location
    from kvbench.prompts import build_prompt

    task = load_task_specs()["multifieldqa_en"]
    sample = next(read_jsonl(shared_longbench / "minilongbench" / "multifieldqa_en.jsonl", "multifieldqa_en", limit=1))
    prompt = build_prompt(task, sample, smollm2.tokenizer, 1500, smollm2.spec.chat, smollm2.stop_ids)
    context, question = list(prompt.ids[: prompt.question_start]), list(prompt.ids[prompt.question_start:])
    assert len(context) > 1000 and question
    ours = kvbench_kept(smollm2.model, smollm2.tokenizer, context, question)
    theirs = kvpress_kept(kvpress_python, Path(weights_location(smollm2.spec)[0]), context, question)
    assert_same(ours, theirs, key_norms(smollm2.model, context))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-m", "slow or not slow", "-v"]))
