"""The kvpress side of the P3 side-by-side. Runs INSIDE .venv-kvpress (scripts/setup_kvpress.sh), never in
kvbench's environment: kvpress 0.5.5 needs transformers < 5.3.

A worker: it loads the model once, prints one JSON line {"ready": ...}, then answers one JSON request per
stdin line with one JSON line on stdout (so a benchmark can interleave kvbench and kvpress runs while both
processes stay loaded). Requests:

  {"op": "run", "context_ids": [...], "question_ids": [...], "max_new_tokens": 32, "stop_ids": [2, ...],
   "presses": [{"name": "snapkv", "compression_ratio": 0.75}, ...], "kept": true}
      For each press: kvpress's own KVPressTextGenerationPipeline._forward (prefill of the context with the
      press hooked in, then its greedy generate_answer for the question), timed on the wall clock and on
      this process's CPU time. With "kept": the kept
      context positions per layer and KV head, recovered by matching every compressed key row against the
      keys of an uncompressed prefill of the same ids (exact float equality; kvpress gathers keys without
      changing them; the uncompressed prefill uses the press's attention implementation, eager for the presses
      in EAGER). Not timed.
      Press names: knorm, streamingllm, snapkv, pyramidkv, chunkkv, tova, and (methods-2.md §5.2) keydiff,
      block_keydiff, expected_attention, lagkv, observed_attention, criticalkv (over SnapKVPress); other keys
      of a press entry are that press's parameters.
      With "masked": for presses that mask instead of evicting (adakv, critical_adakv, duo_attention: see
      scripts/kvpress_headwise.py), the masked context positions per layer and KV head and the press's
      reported compression ratio.
  {"op": "duo_on_the_fly", "texts": [...], "q_len": 500}
      kvpress's on-the-fly DuoAttention head scores computed on these texts (scripts/kvpress_headwise.py).
  {"op": "quit"}

Token ids come from kvbench (the same ids on both sides); no tokenizer is used for the input.
Usage: .venv-kvpress/bin/python scripts/kvpress_side.py --model-dir DIR [--threads N] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import kvpress_headwise  # noqa: E402  (this script's folder is on sys.path)


def build_press(spec: dict):
    from kvpress import ChunkKVPress, KnormPress, PyramidKVPress, SnapKVPress, StreamingLLMPress, TOVAPress

    if spec["name"] in kvpress_headwise.HEADWISE:  # presses that mask instead of evicting (methods-2 §5.2)
        return kvpress_headwise.build(spec)
    name, cr = spec["name"], float(spec["compression_ratio"])
    if name == "knorm":
        return KnormPress(compression_ratio=cr)
    if name == "streamingllm":
        return StreamingLLMPress(compression_ratio=cr, n_sink=int(spec.get("n_sink", 4)))
    if name == "snapkv":
        return SnapKVPress(compression_ratio=cr, window_size=int(spec.get("window_size", 64)),
                           kernel_size=int(spec.get("kernel_size", 5)))
    if name == "pyramidkv":
        return PyramidKVPress(compression_ratio=cr, window_size=int(spec.get("window_size", 64)),
                              kernel_size=int(spec.get("kernel_size", 5)))
    if name == "chunkkv":
        inner = SnapKVPress(compression_ratio=cr, window_size=int(spec.get("window_size", 64)),
                            kernel_size=int(spec.get("kernel_size", 5)))
        return ChunkKVPress(press=inner, chunk_length=int(spec.get("chunk_length", 20)))
    if name == "tova":
        return TOVAPress(compression_ratio=cr)
    return build_press_2025(name, cr, spec)


def build_press_2025(name: str, cr: float, spec: dict):
    """The presses of methods-2.md §5.2 whose heads keep equal numbers of tokens (kvpress 0.5.5 defaults
    unless the spec overrides them)."""
    from kvpress import (BlockPress, CriticalKVPress, ExpectedAttentionPress, KeyDiffPress, LagKVPress,
                         ObservedAttentionPress, SnapKVPress)

    if name == "keydiff":
        return KeyDiffPress(compression_ratio=cr)
    if name == "block_keydiff":
        return BlockPress(press=KeyDiffPress(compression_ratio=cr), block_size=int(spec.get("block_size", 128)))
    if name == "expected_attention":
        return ExpectedAttentionPress(compression_ratio=cr,
                                      n_future_positions=int(spec.get("n_future_positions", 512)),
                                      n_sink=int(spec.get("n_sink", 4)),
                                      use_covariance=bool(spec.get("use_covariance", True)),
                                      use_vnorm=bool(spec.get("use_vnorm", True)),
                                      epsilon=float(spec.get("epsilon", 0.0)))
    if name == "lagkv":
        return LagKVPress(compression_ratio=cr, n_sink=int(spec.get("n_sink", 4)),
                          lag_size=int(spec.get("lag_size", 128)), cross_scoring=bool(spec.get("cross_scoring", False)))
    if name == "observed_attention":  # needs the eager attention weights: see EAGER
        return ObservedAttentionPress(compression_ratio=cr)
    if name == "criticalkv":
        inner = SnapKVPress(compression_ratio=cr, window_size=int(spec.get("window_size", 64)),
                            kernel_size=int(spec.get("kernel_size", 5)))
        return CriticalKVPress(inner, epsilon=float(spec.get("epsilon", 1e-4)),
                               first_stage_ratio=float(spec.get("first_stage_ratio", 0.5)))
    raise ValueError(f"unknown press {name}")


# Presses that read the full attention matrix, which only eager attention returns (kvpress asserts it).
EAGER = ("observed_attention",)


def kept_positions(full_keys: list[torch.Tensor], cache) -> list[list[list[int]]]:
    """[layer][kv head] -> sorted positions of the kept keys, by exact row equality with the full keys."""
    out = []
    for layer_idx, full in enumerate(full_keys):
        kept = cache.layers[layer_idx].keys[0]  # [H_kv, k, d]
        per_head = []
        for head in range(full.shape[1]):
            rows = {full[0, head, pos].numpy().tobytes(): pos for pos in range(full.shape[2])}
            if len(rows) != full.shape[2]:
                raise RuntimeError(f"layer {layer_idx} head {head}: duplicate key rows, positions are ambiguous")
            positions = []
            for row in kept[head]:
                pos = rows.get(row.numpy().tobytes())
                if pos is None:
                    raise RuntimeError(f"layer {layer_idx} head {head}: a kept key matches no full key")
                positions.append(pos)
            per_head.append(sorted(positions))
        out.append(per_head)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import importlib.metadata as md

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
    from kvpress.pipeline import KVPressTextGenerationPipeline

    transformers.utils.logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device="cpu")
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    versions = {n: md.version(n) for n in ("kvpress", "torch", "transformers")}
    print(json.dumps({"ready": True, "versions": versions, "attn": model.config._attn_implementation,
                      "threads": torch.get_num_threads()}), flush=True)

    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        if request.get("op") == "duo_on_the_fly":  # {"texts": [...], "q_len": 500}: kvpress's DuoAttention proxy
            print(json.dumps(kvpress_headwise.duo_on_the_fly(model, request)), flush=True)
            continue
        context = torch.tensor([request["context_ids"]])
        question = torch.tensor([request["question_ids"]])
        default_attn = model.config._attn_implementation
        full_keys: dict[str, list[torch.Tensor]] = {}  # per attention implementation: later layers' keys differ

        def reference_keys(attn: str) -> list[torch.Tensor]:
            if attn not in full_keys:
                cache = DynamicCache()
                with torch.inference_mode():
                    model.model(input_ids=context, past_key_values=cache)
                full_keys[attn] = [layer.keys.clone() for layer in cache.layers]
            return full_keys[attn]
        # Stop tokens: kvpress's generate_answer stops on generation_config.eos_token_id (a list is allowed);
        # the caller passes its own (kvbench's: the model's end tokens, plus newline for samsum).
        eos = model.generation_config.eos_token_id
        if request.get("stop_ids"):
            model.generation_config.eos_token_id = list(request["stop_ids"])
        results = []
        for spec in request["presses"]:
            press = build_press(spec)
            attn = "eager" if spec["name"] in EAGER else default_attn
            model.set_attn_implementation(attn)
            cache = DynamicCache()
            calls[0] = 0
            start, cpu_start = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                answers = pipe._forward({"context_ids": context, "questions_ids": [question]},
                                        max_new_tokens=int(request["max_new_tokens"]), press=press, cache=cache)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            result = {"press": spec, "seconds": seconds, "cpu_seconds": cpu_seconds, "answer": answers[0],
                      "generated_tokens": calls[0],  # one question forward + one per later token = tokens made
                      "kept_per_layer": [layer.keys.shape[2] for layer in cache.layers]}
            if request.get("kept"):
                result["kept"] = kept_positions(reference_keys(attn), cache)
            if request.get("masked"):  # what a masking press evicted, and the ratio it reports
                result["masked"] = kvpress_headwise.masked_positions(model, context.shape[1])
                result["ratio"] = kvpress_headwise.reported_ratio(press)
            results.append(result)
        model.set_attn_implementation(default_attn)
        model.generation_config.eos_token_id = eos
        print(json.dumps({"results": results}), flush=True)


if __name__ == "__main__":
    main()
