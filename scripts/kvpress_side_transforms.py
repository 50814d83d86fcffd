"""The kvpress side of the ThinK and decoding-time parity tests (methods-2.md §5.2). Runs INSIDE .venv-kvpress
(scripts/setup_kvpress.sh), never in kvbench's environment. One JSON request on stdin, one JSON answer on
stdout, per line (several requests share one model load); token ids come from kvbench.

  {"op": "think", "context_ids": [...], "presses": [{"key_channel_compression_ratio": 0.25, "window_size": 4,
   "snapkv": {"compression_ratio": 0.5, "window_size": 4, "kernel_size": 5}}, ...]}
      For each press, a prefill of the context with ThinKPress (alone, or after SnapKVPress in a ComposedPress
      when "snapkv" is given), as kvpress's pipeline compresses a context; answers, per layer and KV head,
      the channels that are zero in every cached key ("zeroed") and the context positions kept (each kept
      key row matched to an uncompressed prefill's rows on its non-zeroed channels, exact float equality).
  {"op": "decoding", "context_ids": [...], "question_ids": [...], "max_new_tokens": 12,
   "base": {"name": "knorm"} | {"name": "streamingllm", "n_sink": 4}, "compression_interval": 4,
   "target_size": 40}
      kvpress's pipeline (`_forward`) with DecodingPress(base): after the context prefill and after every
      later forward, per layer, the cache length and the absolute positions of its entries (each new key
      row is recorded with its position as the cache layer receives it, and rows are identified by exact
      equality), and the generated ids.

Usage: .venv-kvpress/bin/python scripts/kvpress_side_transforms.py --model-dir DIR [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def think_press(spec: dict):
    from kvpress import ComposedPress, SnapKVPress, ThinKPress

    think = ThinKPress(key_channel_compression_ratio=float(spec["key_channel_compression_ratio"]),
                       window_size=int(spec.get("window_size", 32)))
    snap = spec.get("snapkv")
    if snap is None:
        return think
    return ComposedPress([SnapKVPress(compression_ratio=float(snap["compression_ratio"]),
                                      window_size=int(snap.get("window_size", 64)),
                                      kernel_size=int(snap.get("kernel_size", 5))), think])


def run_think(model, request: dict) -> list[dict]:
    from transformers import DynamicCache

    context = torch.tensor([request["context_ids"]])
    reference = DynamicCache()
    with torch.inference_mode():
        model.model(input_ids=context, past_key_values=reference)
    out = []
    for spec in request["presses"]:
        cache = DynamicCache()
        with torch.inference_mode(), think_press(spec)(model):
            model.model(input_ids=context, past_key_values=cache)
        zeroed, kept = [], []
        for layer, full in zip(cache.layers, reference.layers):
            keys = layer.keys[0]  # [H_kv, k, d]
            zero = (keys == 0).all(dim=1)  # [H_kv, d]
            zeroed.append([torch.nonzero(z).flatten().tolist() for z in zero])
            kept.append([match_rows(full.keys[0, h][:, ~zero[h]], keys[h][:, ~zero[h]]) for h in range(keys.shape[0])])
        out.append({"press": spec, "zeroed": zeroed, "kept": kept, "shape": list(cache.layers[0].keys.shape)})
    return out


def match_rows(full: torch.Tensor, kept: torch.Tensor) -> list[int]:
    rows = {full[pos].numpy().tobytes(): pos for pos in range(full.shape[0])}
    if len(rows) != full.shape[0]:
        raise RuntimeError("duplicate key rows: positions are ambiguous")
    return sorted(rows[row.numpy().tobytes()] for row in kept)


def run_decoding(model, tokenizer, request: dict) -> dict:
    from kvpress import DecodingPress, KnormPress, StreamingLLMPress
    from kvpress.pipeline import KVPressTextGenerationPipeline
    from transformers import DynamicCache

    base = request["base"]
    if base["name"] == "knorm":
        inner = KnormPress()
    elif base["name"] == "streamingllm":
        inner = StreamingLLMPress(n_sink=int(base.get("n_sink", 4)))
    else:
        raise ValueError(f"unknown base press {base['name']}")
    press = DecodingPress(base_press=inner, compression_interval=int(request["compression_interval"]),
                          target_size=int(request["target_size"]))
    seen: dict[tuple[int, int, bytes], int] = {}  # (layer, KV head, key row bytes) -> position
    appended: dict[int, int] = {}  # per layer, tokens appended so far: the next position
    cache = DynamicCache()
    update = cache.update

    def recording_update(key_states, value_states, layer_idx, *args, **kwargs):
        start = appended.get(layer_idx, 0)
        for h in range(key_states.shape[1]):
            for i in range(key_states.shape[2]):
                seen[(layer_idx, h, key_states[0, h, i].numpy().tobytes())] = start + i
        appended[layer_idx] = start + key_states.shape[2]
        return update(key_states, value_states, layer_idx, *args, **kwargs)

    trace: list[dict] = []

    def snapshot(*_):
        trace.append({"lengths": [layer.keys.shape[2] for layer in cache.layers],
                      "positions": [[sorted(seen[(i, h, row.numpy().tobytes())] for row in layer.keys[0, h])
                                     for h in range(layer.keys.shape[1])] for i, layer in enumerate(cache.layers)]})

    cache.update = recording_update
    hook = model.model.register_forward_hook(snapshot)  # the pipeline prefills through model.model
    try:
        pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device="cpu")
        with torch.inference_mode():
            answers = pipe._forward({"context_ids": torch.tensor([request["context_ids"]]),
                                     "questions_ids": [torch.tensor([request["question_ids"]])]},
                                    max_new_tokens=int(request["max_new_tokens"]), press=press, cache=cache)
    finally:
        hook.remove()
    return {"trace": trace, "answer": answers[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "think":
            answer = {"results": run_think(model, request)}
        elif request["op"] == "decoding":
            answer = run_decoding(model, AutoTokenizer.from_pretrained(args.model_dir), request)
        else:
            raise ValueError(f"unknown op {request['op']}")
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
