"""kvbench's ThinK and decoding-time compression against NVIDIA kvpress 0.5.5 (ThinKPress, DecodingPress), on
the seeded tiny Llama of methods-2.md §5.1, through scripts/kvpress_side_transforms.py in .venv-kvpress
(skipped when that environment is missing, like tests/test_kvpress_parity.py).

- ThinK in kvpress's zeroing mode (`recent=0`, query term averaged over the group, window 4): the zeroed key
  channels per (layer, KV head) are identical, alone (over FullKV) and after SnapKV eviction
  (ComposedPress([SnapKVPress, ThinKPress]) vs snapkv+think), and the kept positions too.
- Decoding-time compression with Knorm and StreamingLLM as bases: the per-forward cache lengths and, after
  every compression, the kept positions (mapped through the earlier compressions) are identical."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from test_kvpress_parity import kvpress_python, offline_env  # noqa: F401  (the session fixture)

from kvbench.engine import Engine, Plan
from kvbench.engine.compress import compress, full_layers
from kvbench.engine.prefill import PrefillObserver, prefill
from kvbench.methods import build
from kvbench.methods.base import Budget
from kvbench.methods.decoding import DecodingDecoder
from kvbench.prompts import Prompt

ROOT = Path(__file__).resolve().parents[1]
SIDE = ROOT / "scripts" / "kvpress_side_transforms.py"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """methods-2.md §5.1: seed 0, every parameter x 3, float32; saved for kvpress, kept in memory for kvbench."""
    from conftest import save_reference_llama
    from kvbench.engine import attention

    path = tmp_path_factory.mktemp("tiny-llama-5-1")
    model = save_reference_llama(path, chat_template=None, add_bos=False)
    attention.install(model)
    context = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(1))[0].tolist()
    return model, path, context


QUESTION = torch.randint(0, 256, (5,), generator=torch.Generator().manual_seed(2)).tolist()
INTERVAL, TARGET, MAX_NEW = 4, 40, 12


@pytest.fixture(scope="module")
def theirs(kvpress_python, reference) -> dict:
    """kvpress's answers to every request of this module, from one side-car process (one kvpress import)."""
    _, path, context = reference
    requests = [{"op": "think", "context_ids": context, "presses": [case[3] for case in THINK_CASES]}]
    requests += [{"op": "decoding", "context_ids": context, "question_ids": QUESTION, "max_new_tokens": MAX_NEW,
                  "base": base, "compression_interval": INTERVAL, "target_size": TARGET} for base, _ in DECODING_CASES]
    proc = subprocess.run([str(kvpress_python), str(SIDE), "--model-dir", str(path), "--threads", "1"],
                          input="".join(json.dumps(r) + "\n" for r in requests), capture_output=True, text=True,
                          timeout=1800, env=offline_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [json.loads(line) for line in proc.stdout.strip().splitlines()[-len(requests):]]
    return {"think": answers[0]["results"], **{inner: a for (_, inner), a in zip(DECODING_CASES, answers[1:])}}


# ---- ThinK --------------------------------------------------------------------------------------------------
THINK_CASES = [  # (kvbench method, overrides, kvbench budget, kvpress press spec)
    ("fullkv+think", {"pruning_ratio": "0.25"}, None, {"key_channel_compression_ratio": 0.25, "window_size": 4}),
    ("fullkv+think", {"pruning_ratio": "0.5"}, None, {"key_channel_compression_ratio": 0.5, "window_size": 4}),
    ("snapkv_kvpress+think", {"pruning_ratio": "0.5", "window_size": "4"}, 48,
     {"key_channel_compression_ratio": 0.5, "window_size": 4, "snapkv": {"compression_ratio": 0.5, "window_size": 4, "kernel_size": 5}}),
]


def kvbench_think(model, context: list[int], name: str, overrides: dict, tokens: int | None):
    method = build(name, {**overrides, "recent": "0", "channel_window": "4"}).method
    budget = Budget(tokens=tokens) if tokens else Budget(ratio=1.0)
    ids = torch.tensor([context])
    observer = PrefillObserver([method], model.config.num_hidden_layers)
    with torch.inference_mode():
        cache, _ = prefill(model, ids, observer)
        compressed = compress(model, Plan(name, method, budget), full_layers(cache), observer.scores, 0)
    zeroed = [[torch.nonzero((layer.keys[h] == 0).all(dim=0)).flatten().tolist() for h in range(layer.keys.shape[0])]
              for layer in compressed.layers]
    kept = [[row.tolist() for row in sel.rows()] for sel in compressed.selections]
    return zeroed, kept, compressed


def test_think_zeroed_channels_match_kvpress(theirs, reference):
    model, _, context = reference
    for (name, overrides, tokens, _), result in zip(THINK_CASES, theirs["think"]):
        zeroed, kept, compressed = kvbench_think(model, context, name, overrides, tokens)
        dim = model.config.head_dim
        n_pruned = int(dim * float(overrides["pruning_ratio"]))
        assert all(len(head) == n_pruned for layer in zeroed for head in layer), (name, zeroed)
        assert zeroed == result["zeroed"], (name, overrides)
        assert kept == result["kept"], (name, overrides)
        assert result["shape"][2] == (tokens or len(context))  # kvpress keeps the shape: no memory saved
        assert compressed.simulated  # and so does kvbench, which says so


# ---- decoding-time compression ------------------------------------------------------------------------------
DECODING_CASES = [({"name": "knorm"}, "knorm"), ({"name": "streamingllm", "n_sink": 4}, "streamingllm_prefill")]


def kvbench_decoding_trace(model, tokenizer, context, question, inner, interval, target, max_new):
    method = build("decoding", {"inner": inner, "interval": str(interval)}).method
    traces: dict[int, list[tuple[int, list[list[int]]]]] = {}
    original = DecodingDecoder.on_step

    def recording(self, step):
        keep = original(self, step)
        traces.setdefault(self.layer, []).append((self.positions.shape[1], self.positions.sort(dim=1).values.tolist()))
        return keep

    prompt = Prompt(ids=tuple(context + question), question_start=len(context),
                    n_original_tokens=len(context) + len(question), truncated=False, max_new_tokens=max_new,
                    stop_ids=frozenset())
    DecodingDecoder.on_step = recording
    try:
        run = Engine(model, tokenizer, decode="sequential").run(prompt, [Plan("d", method, Budget(tokens=target))],
                                                                "context")
    finally:
        DecodingDecoder.on_step = original
    n_layers = model.config.num_hidden_layers
    steps = len(traces[0])
    lengths = [[len(context)] * n_layers] + [[traces[layer][s][0] for layer in range(n_layers)] for s in range(steps)]
    positions = [[traces[layer][s][1] for layer in range(n_layers)] for s in range(steps)]
    return lengths, positions, run.generations[0].text


@pytest.mark.parametrize("base,inner", DECODING_CASES, ids=[c[1] for c in DECODING_CASES])
def test_decoding_lengths_and_kept_positions_match_kvpress(theirs, reference, base, inner):
    from conftest import make_tiny_tokenizer

    model, _, context = reference
    question, target = QUESTION, TARGET
    theirs = theirs[inner]
    lengths, positions, text = kvbench_decoding_trace(model, make_tiny_tokenizer(chat_template=None, add_bos=False),
                                                      context, question, inner, INTERVAL, target, MAX_NEW)
    their_lengths = [step["lengths"] for step in theirs["trace"]]
    assert lengths == their_lengths
    assert their_lengths[:6] == [[96] * 2, [101] * 2, [102] * 2, [103] * 2, [40] * 2, [41] * 2]  # §2.22's trace
    their_positions = [step["positions"] for step in theirs["trace"][1:]]
    if inner == "knorm":
        assert positions == their_positions
        assert text == theirs["answer"]
        return
    # StreamingLLM: identical up to the second compression. There kvpress's StreamingLLMPress keeps the first
    # n_sink *columns* and the last ones, but ScorerPress.compress stored the first compression's survivors in
    # torch.topk order, which for tied scores is not position order; kvbench keeps columns in position order,
    # so it keeps the 4 sinks and the newest tokens, as StreamingLLM's rule says. Pinned: if kvpress changes,
    # this test says so.
    second = [i for i, step in enumerate(lengths[1:]) if step == [target] * 2][1]
    assert positions[:second] == their_positions[:second]
    seen = len(context) + len(question) + second  # tokens seen after that forward (positions[0]: the question)
    rule = list(range(4)) + list(range(seen - (target - 4), seen))
    assert positions[second] == [[rule] * 2] * 2
    assert their_positions[second] != positions[second]
    assert all(len(head) == target and head[:4] == [0, 1, 2, 3] for layer in their_positions[second] for head in layer)
