"""What H2O's causal column sums cost against one decoder layer's prefill, and what their floor is.

    .venv/bin/python scripts/bench_colsum.py [--tokens 3530] [--repeats 9]

One thread, CPU time, the parts run in alternation --repeats times (medians printed). The shape is
SmolLM2-135M's (hidden 576, MLP 1536, 9 query / 3 KV heads of 64), random weights from its config:
- layer: one Llama decoder layer's forward over the prompt (SDPA), what P5's prefill pays per layer;
- flash: torch's CPU flash kernel alone, causal (the layer's attention, which returns the log-sum-exp);
- sums: LayerView.column_sums from that log-sum-exp, as h2o / h2o_prefill / observed_attention compute them;
- floor parts, over the same tiles the sums use: the matmul alone (every causal query-key logit has to be
  formed again: the kernel never hands its logits out) and the exponentials alone (one per logit).
The last line gives sums / layer (what P5's H2O line measures, less the model's embedding and head) and
(matmul + exp) / layer: no second pass over the logits can cost less than that.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaModel

from kvbench.methods.base import LOG2_E, LayerView


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=3530, help="prompt length (P5's longest prompts: 3530)")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, attn_implementation="sdpa")
    model = LlamaModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.tokens))
    t, h_q, h_kv, d = args.tokens, 9, 3, 64
    query, keys, values = torch.randn(h_q, t, d), torch.randn(h_kv, t, d), torch.randn(h_kv, t, d)
    g = h_q // h_kv

    def flash():
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query[None], keys.repeat_interleave(g, 0)[None], values.repeat_interleave(g, 0)[None],
            is_causal=True, scale=d**-0.5)

    lse = flash()[1][0]

    def view() -> LayerView:
        return LayerView(layer=0, n_layers=1, query=query, keys=keys, values=values, scaling=d**-0.5, lse=lse)

    defaults = inspect.signature(LayerView._column_sums_lse).parameters  # the tiles the sums use
    block, tile = defaults["block"].default, defaults["tile"].default
    scaled = (query * (d**-0.5 * LOG2_E)).reshape(h_kv, g, t, d)
    keys_t = keys.transpose(1, 2)
    shift = (lse * -LOG2_E).reshape(h_kv, g, t)
    spans = [(s, min(s + block, t), a, min(a + tile, min(s + block, t)))
             for s in range(0, t, block) for a in range(0, min(s + block, t), tile)]
    tiles = {(s, a): torch.baddbmm(shift[:, :, s:e].reshape(h_kv, -1, 1), scaled[:, :, s:e].reshape(h_kv, -1, d),
                                   keys_t[:, :, a:b]) for s, e, a, b in spans}

    def matmul_only():
        for s, e, a, b in spans:
            torch.baddbmm(shift[:, :, s:e].reshape(h_kv, -1, 1), scaled[:, :, s:e].reshape(h_kv, -1, d),
                          keys_t[:, :, a:b])

    def exp_only():
        for logits in tiles.values():
            torch.exp2(logits)

    with torch.inference_mode():
        parts = {"layer": lambda: model(ids), "flash": flash, "sums": lambda: view().column_sums(),
                 "matmul": matmul_only, "exp": exp_only}
        for fn in parts.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in parts}
        for _ in range(args.repeats):
            for name, fn in parts.items():
                times[name].append(cpu_seconds(fn))
    med = {name: statistics.median(v) for name, v in times.items()}
    for name, value in med.items():
        print(f"{name:>7}: {value:.3f} s (min {min(times[name]):.3f})")
    floor = med["matmul"] + med["exp"]
    print(f"colsum | {t} tokens, SmolLM2 shape, 1 thread, CPU time, {args.repeats} repeats: sums / layer "
          f"{med['sums'] / med['layer']:+.1%}, floor (matmul + exp) / layer {floor / med['layer']:+.1%}, "
          f"flash / layer {med['flash'] / med['layer']:.1%}, sums / flash {med['sums'] / med['flash']:.2f}x")


if __name__ == "__main__":
    main()
