"""The engine at real scale, on random-weight models of real shapes (no weights can reach a GPU machine here).

    python scripts/gpu_check.py                      # on a CUDA machine: Qwen2-7B and Llama-3.1-8B shapes, bf16
    python scripts/gpu_check.py --device cpu --tiny  # the same code path on tiny shapes (CI runs this)

For each model shape it prints one table:
- prefill seconds at each length (the longest with --prefill-chunk), FullKV only, and with H2O's column sums at
  the middle length (what the observer costs on this device);
- decode tokens/s of FullKV alone and of a 6-method x 1-ratio sweep decoded sequentially and batched, and each
  sweep's wall time over the FullKV run's (one prefill each);
- peak device memory of each run against the theoretical full K/V cache of that length;
and a CPU-vs-device check on a tiny random model: the relative error of the prefill logits.

Prompts are random token ids and every plan decodes exactly --decode-tokens tokens (no stop tokens), so the
timings compare equal work. Nothing here is a LongBench score.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SWEEP = ("streamingllm_prefill", "h2o_prefill", "snapkv", "pyramidkv", "chunkkv", "knorm")


def real_configs() -> dict:
    from transformers import LlamaConfig, Qwen2Config

    return {
        # Qwen/Qwen2-7B-Instruct config.json
        "qwen2-7b": Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                                rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False),
        # meta-llama/Llama-3.1-8B-Instruct config.json (llama3 rope scaling, 128k context)
        "llama-3.1-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                    rope_theta=5e5, rms_norm_eps=1e-5,
                                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    }


def tiny_configs() -> dict:
    from transformers import LlamaConfig, Qwen2Config

    return {
        "qwen2-tiny": Qwen2Config(vocab_size=512, hidden_size=112, intermediate_size=224, num_hidden_layers=2,
                                  num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=4096),
        "llama-tiny": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
    }


class StubTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return ""


def build(config, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from kvbench.engine import attention

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    attention.install(model)
    return model


def prompt_of(length: int, vocab: int, new_tokens: int):
    from kvbench.prompts import Prompt

    ids = torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    return Prompt(ids=tuple(ids), question_start=length, n_original_tokens=length, truncated=False,
                  max_new_tokens=new_tokens, stop_ids=frozenset())


def plans_of(names) -> list:
    from kvbench.engine import Plan
    from kvbench.methods import build as build_method
    from kvbench.methods.base import Budget

    out = []
    for name in names:
        choice = build_method(name)
        out.append(Plan(choice.label, choice.method, Budget(ratio=1.0 if choice.base == "fullkv" else 0.1)))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timed:
    wall: float
    prefill: float
    peak: int | None
    tokens: int


def run_once(engine, prompt, plans, device) -> Timed:
    sync(device)
    start = time.perf_counter()
    result = engine.run(prompt, plans, "full", "gpu-check")
    sync(device)
    wall = time.perf_counter() - start
    return Timed(wall, result.prefill_seconds, result.peak_memory_bytes, sum(len(g.token_ids) for g in result.generations))


def full_cache_bytes(config, length: int, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * length * torch.finfo(dtype).bits // 8


def gib(n: int | None) -> str:
    if n is None:
        return "n/a (CPU)"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def check_model(name: str, config, device, dtype, lengths, chunk: int, new_tokens: int, rows: list) -> None:
    from kvbench.engine import Engine

    model = build(config, device, dtype)
    fullkv = plans_of(["fullkv"])
    sweep = plans_of(SWEEP)
    print(f"\n## {name}: {config.num_hidden_layers} layers, {config.num_attention_heads} q / "
          f"{config.num_key_value_heads} kv heads, {dtype}, {device}", flush=True)
    print("| measure | length | value |\n|---|---:|---|")

    def line(measure: str, length: int, value: str) -> None:
        print(f"| {measure} | {length:,} | {value} |", flush=True)
        rows.append({"model": name, "measure": measure, "length": length, "value": value})

    plain = Engine(model, StubTokenizer())
    warm = prompt_of(min(lengths[0], 256), config.vocab_size, 2)
    run_once(plain, warm, fullkv, device)  # kernels and allocator warm-up
    for i, length in enumerate(lengths):
        chunked = chunk if i == len(lengths) - 1 and chunk and chunk < length else 0
        engine = Engine(model, StubTokenizer(), prefill_chunk=chunked)
        timed = run_once(engine, prompt_of(length, config.vocab_size, 1), fullkv, device)
        label = f"prefill s (FullKV{f', chunks of {chunked}' if chunked else ''})"
        line(label, length, f"{timed.prefill:.2f}")
        line("peak memory / full K/V cache", length,
             f"{gib(timed.peak)} / {gib(full_cache_bytes(config, length, dtype))}")
    mid = lengths[min(1, len(lengths) - 1)]
    plain_prefill = run_once(plain, prompt_of(mid, config.vocab_size, 1), fullkv, device).prefill
    h2o = run_once(plain, prompt_of(mid, config.vocab_size, 1), plans_of(["h2o_prefill"]), device).prefill
    line("prefill with H2O's column sums / without", mid, f"{h2o / plain_prefill:.2f}x ({h2o:.2f} s vs {plain_prefill:.2f} s)")

    decode_len = lengths[0]
    prompt = prompt_of(decode_len, config.vocab_size, new_tokens)
    base = run_once(plain, prompt, fullkv, device)
    line("FullKV decode tokens/s", decode_len, f"{base.tokens / (base.wall - base.prefill):.1f}")
    for mode in ("sequential", "batched"):
        engine = Engine(model, StubTokenizer(), decode=mode)
        timed = run_once(engine, prompt, sweep, device)
        decode_s = timed.wall - timed.prefill
        line(f"sweep {len(sweep)} methods x 0.1, {mode}: decode tokens/s (all plans)", decode_len,
             f"{timed.tokens / decode_s:.1f}")
        line(f"sweep {len(sweep)} methods x 0.1, {mode}: wall / FullKV wall", decode_len, f"{timed.wall / base.wall:.2f}x")
        line(f"sweep {mode}: peak memory / full K/V cache", decode_len,
             f"{gib(timed.peak)} / {gib(full_cache_bytes(config, decode_len, dtype))}")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cpu_vs_device(device: torch.device, rows: list) -> None:
    """The tiny random model's prefill logits on the CPU and on `device`, both float32."""
    config = tiny_configs()["llama-tiny"]
    ids = torch.randint(0, config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(1))
    logits = []
    for dev in (torch.device("cpu"), device):
        model = build(config, dev, torch.float32)
        with torch.inference_mode():
            logits.append(model(input_ids=ids.to(dev), position_ids=torch.arange(200, device=dev)[None]).logits.float().cpu())
    error = float((logits[0] - logits[1]).norm() / logits[0].norm())
    print(f"\nCPU vs {device}: relative logit error (tiny random Llama, float32, 200 tokens) {error:.2e}", flush=True)
    rows.append({"model": "llama-tiny", "measure": f"relative logit error CPU vs {device}", "length": 200,
                 "value": f"{error:.2e}"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and lengths (a CPU smoke test)")
    parser.add_argument("--models", default=None, help="comma list (default: every shape of the mode)")
    parser.add_argument("--lengths", default=None, help="prompt lengths (default 8192,32768,131072; tiny 128,256,512)")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="chunk for the longest length (default 8192; tiny 128)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="tokens every plan decodes (default 64; tiny 4)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: more threads only contend
    configs = tiny_configs() if args.tiny else real_configs()
    names = [n.strip() for n in args.models.split(",")] if args.models else list(configs)
    unknown = [n for n in names if n not in configs]
    if unknown:
        print(f"gpu_check: unknown model shape {unknown[0]}; known: {', '.join(configs)}", file=sys.stderr)
        return 2
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else ([128, 256, 512] if args.tiny else [8192, 32768, 131072])
    chunk = args.prefill_chunk if args.prefill_chunk is not None else (128 if args.tiny else 8192)
    new_tokens = args.decode_tokens or (4 if args.tiny else 64)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# kvbench gpu_check | {time.strftime('%Y-%m-%d %H:%M %Z')} | {name} | torch {torch.__version__} | "
          f"lengths {lengths} (chunks of {chunk} at the longest) | {new_tokens} new tokens per plan")
    rows: list = []
    start = time.perf_counter()
    for model_name in names:
        check_model(model_name, configs[model_name], device, dtype, lengths, chunk, new_tokens, rows)
    if device.type != "cpu":
        cpu_vs_device(device, rows)
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
