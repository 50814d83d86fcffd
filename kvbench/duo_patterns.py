"""DuoAttention head patterns for models DuoAttention ships none for, computed offline by kvbench
(`kvbench headscores --method duo_attention`; methods-2 §2.19, offline alternative 1). This is a PROXY:
DuoAttention trains one gate per (layer, KV head) on passkey data; kvbench cannot download the six
patterns kvpress fetches at run time, nor train gates on a CPU. Results must be labelled as the proxy's.

The proxy is kvpress's own on-the-fly estimate (0.5.5 duo_attention_press.py `duo_attention_on_the_fly`),
recomputed on local text instead of BookSum. For each text and layer:
1. the layer's input hidden states, through its input layer norm; the mean pre-RoPE query and the mean key
   over the text's tokens (q_proj / k_proj, then q_norm / k_norm where the model has them);
2. that one query and that one key placed at every position 0 .. q_len - 1 (500) and rotated by the model's
   own RoPE;
3. the last query's softmax attention over the q_len keys, per query head; score = the mean of its
   cumulative sum (the area under the attention's CDF), then the mean over the KV head's query heads.
Scores are averaged over the texts. A low score means the mass sits near the query (a local head: a
streaming candidate); DuoAttention's methods stream the lowest-scoring heads. Deterministic given the texts.

Output: DuoAttention's `full_attention_heads.tsv` layout (kvbench.headtables)."""

from __future__ import annotations

from typing import Any

import torch

from kvbench.engine import rope

PROCEDURE = "kvbench-duo-proxy-v1 (kvpress 0.5.5 duo_attention_on_the_fly on local text)"


def layer_inputs(model: Any, ids: list[int]) -> list[torch.Tensor]:
    """Each decoder layer's input hidden states [1, T, hidden] for one text (hidden_states[:-1])."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True, use_cache=False,
                logits_to_keep=1)
    return list(out.hidden_states[:-1])


def project(attn: Any, hidden: torch.Tensor, which: str) -> torch.Tensor:
    """Mean pre-RoPE query or key over the tokens: [heads, d]."""
    proj = getattr(attn, f"{which}_proj")(hidden)  # [1, T, heads * d]
    states = proj.view(1, hidden.shape[1], -1, attn.head_dim)
    norm = getattr(attn, f"{which}_norm", None)
    if norm is not None:
        states = norm(states)
    return states.mean(dim=1)[0].float()


def text_scores(model: Any, ids: list[int], q_len: int = 500) -> torch.Tensor:
    """[L, H_kv] proxy scores of one text."""
    rot = rope.for_model(model)
    config = model.config
    group = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    positions = torch.arange(q_len)[None]
    rows = []
    for layer, hidden in zip(model.model.layers, layer_inputs(model, ids)):
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        q = project(attn, normed, "q")[None, :, None, :].expand(1, -1, q_len, -1)  # [1, H_q, q_len, d]
        k = project(attn, normed, "k")[None, :, None, :].expand(1, -1, q_len, -1)  # [1, H_kv, q_len, d]
        cos, sin = rot.rotary(normed.float(), positions.to(normed.device))
        q, k = rot.apply(q, k, cos.float(), sin.float())
        k = k.repeat_interleave(group, dim=1)
        logits = torch.matmul(q[:, :, -1:, :], k.transpose(2, 3))[0, :, 0, :] / attn.head_dim**0.5  # [H_q, q_len]
        area = torch.softmax(logits.float(), dim=-1).cumsum(dim=-1).mean(dim=-1)
        rows.append(area.view(-1, group).mean(dim=-1))
    return torch.stack(rows).double().cpu()


@torch.inference_mode()
def proxy_pattern(model: Any, texts: list[list[int]], q_len: int = 500) -> torch.Tensor:
    """[L, H_kv]: text_scores averaged over the texts (token ids)."""
    total = None
    for ids in texts:
        scores = text_scores(model, ids, q_len)
        total = scores if total is None else total + scores
    return total / len(texts)
