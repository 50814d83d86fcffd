"""KIVI (methods-2.md §2.18): the quantizer against hand-computed groups, the cache lifecycle's counts, the
bytes of the worked-example table, and the lifecycle running per plan row of the batched decode cache."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

from kvbench.engine import Engine, Plan
from kvbench.methods import build
from kvbench.methods.base import Budget
from kvbench.methods.kivi import KIVI, KIVIState, quantize_kept
from kvbench.methods.quantizer import (
    dequantize_groups,
    fake_quantize_keys,
    fake_quantize_values,
    quantize_groups,
    quantized_after_append,
    quantized_after_prompt,
)
from kvbench.methods.storage import LayerStorage, QuantSpec
from kvbench.prompts import Prompt


# ---- the quantizer -------------------------------------------------------------------------------------------
def test_two_bit_group_by_hand():
    # min 0, max 3: step (3 - 0) / 3 = 1; x - m = [0, 0.5, 1.5, 2.5, 3]: round half to even -> 0, 0, 2, 2, 3
    x = torch.tensor([0.0, 0.5, 1.5, 2.5, 3.0])
    codes, step, low = quantize_groups(x, bits=2, group_size=5)
    assert codes.tolist() == [0, 0, 2, 2, 3]
    assert step.tolist() == [1.0] and low.tolist() == [0.0]
    assert dequantize_groups(codes, step, low, 5).tolist() == [0.0, 0.0, 2.0, 2.0, 3.0]


def test_four_bit_groups_of_32_by_hand():
    # group 0: -1 .. 2 in 32 steps; min -1, max 2, step 3 / 15 = 0.2. group 1: constant 7 (step 0: code 0, x = 7)
    first = torch.linspace(-1.0, 2.0, 32, dtype=torch.float64)
    x = torch.cat([first, torch.full((32,), 7.0, dtype=torch.float64)])
    codes, step, low = quantize_groups(x, bits=4, group_size=32)
    assert torch.allclose(step, torch.tensor([0.2, 0.0], dtype=torch.float64))
    assert low.tolist() == [-1.0, 7.0]
    want = torch.round((first + 1.0) / 0.2).clamp(0, 15)  # the formula written out for this group
    assert codes[:32].tolist() == want.tolist() and codes[32:].tolist() == [0.0] * 32
    assert codes[:32].max() == 15 and codes[:32].min() == 0
    back = dequantize_groups(codes, step, low, 32)
    assert torch.allclose(back[:32], want * 0.2 - 1.0) and back[32:].tolist() == [7.0] * 32
    assert (back[:32] - first).abs().max() <= 0.1 + 1e-12  # at most half a step off


def test_clamp_happens_before_round():
    # (x - m) / step can exceed 2^b - 1 by rounding error only; the code never leaves [0, 2^b - 1]
    x = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float16)
    codes, _, _ = quantize_groups(x, bits=2, group_size=3)
    assert codes.min() >= 0 and codes.max() <= 3


def test_keys_per_channel_values_per_token():
    # keys [n=4, d=2] with G = 2: channel 0 groups (entries 0-1), (2-3); a huge key channel 1 stays its own
    keys = torch.tensor([[0.0, 100.0], [3.0, 300.0], [1.0, 100.0], [2.0, 400.0]])
    k_hat = fake_quantize_keys(keys, bits=2, group_size=2)
    assert k_hat[:, 0].tolist() == [0.0, 3.0, 1.0, 2.0]  # two-valued groups are exact at any bit width
    assert k_hat[:, 1].tolist() == [100.0, 300.0, 100.0, 400.0]
    # values [n=1, d=4] with G = 2: groups (channels 0-1), (2-3) of the one token
    values = torch.tensor([[0.0, 1.0, 10.0, 12.0]])
    assert fake_quantize_values(values, bits=2, group_size=2).tolist() == [[0.0, 1.0, 10.0, 12.0]]
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]], dtype=torch.float64)  # d = 5, G = 2 [ours]: (0,1), (2,3), (10)
    codes, step, low = quantize_groups(values, bits=2, group_size=2)
    assert step.tolist() == [[1 / 3, 1 / 3, 0.0]] and low.tolist() == [[0.0, 2.0, 10.0]]
    assert codes.tolist() == [[0.0, 3.0, 0.0, 3.0, 0.0]]


def test_fake_quantization_stays_in_the_data_dtype():
    x = torch.randn(3, 64, 16, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    assert fake_quantize_keys(x, 2, 32).dtype == torch.float16


# ---- the lifecycle -------------------------------------------------------------------------------------------
def test_lifecycle_counts_of_the_worked_example():
    # T = 300, R = 128: keys 256 quantized + 44 full; values 172 + 128 (§2.18 parity test ii)
    keys, values = quantized_after_prompt(300, 128)
    assert (keys, 300 - keys, values, 300 - values) == (256, 44, 172, 128)
    n = 300
    for step in range(84):
        n += 1
        keys, values = quantized_after_append(n, keys, values, 128)
        if step < 83:
            assert keys == 256 and values == n - 128  # the key residual grows; values slide one at a time
    assert (keys, n - keys) == (384, 0)  # after 84 steps the 128-entry residual was quantized as one block
    assert values == n - 128


def test_short_prompts_quantize_nothing():
    assert quantized_after_prompt(100, 128) == (0, 0)
    assert quantized_after_prompt(128, 128) == (128, 0)
    assert quantized_after_prompt(129, 128) == (128, 1)


# ---- bytes: the table of §2.18 (d = 128, G = 32, R = 128, fp16) ------------------------------------------
@pytest.mark.parametrize("tokens,bits,k_bytes,v_bytes", [
    (7500, 2, 375_808, 386_624), (7500, 4, 613_376, 622_528), (750, 2, 58_880, 62_624)])
def test_byte_table(tokens, bits, k_bytes, v_bytes):
    storage = LayerStorage(torch.tensor([tokens]), 128, 128, 2, quant=QuantSpec(bits, 32, 128))
    assert storage.nbytes() == k_bytes + v_bytes
    plain = LayerStorage(torch.tensor([tokens]), 128, 128, 2)
    assert plain.nbytes() == 2 * tokens * 128 * 2


def test_ten_percent_eviction_plus_kivi2_is_3_16_percent():
    # §2.18: 10% of a 7,500-token prompt (750 kept) at 2 bits stores 121,504 of FullKV's 3,840,000 bytes
    kept = LayerStorage(torch.tensor([750]), 128, 128, 2, quant=QuantSpec(2, 32, 128))
    assert kept.nbytes() == 121_504
    assert round(kept.nbytes() / (2 * 7500 * 128 * 2), 4) == 0.0316


# ---- quantize_kept and the per-plan-row lifecycle --------------------------------------------------------
def test_quantize_kept_follows_each_heads_own_length():
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 70, 8, generator=gen), torch.randn(2, 70, 8, generator=gen)
    lengths = torch.tensor([70, 40])
    spec = QuantSpec(bits=2, group_size=16, residual=32)
    k, v = keys.clone(), values.clone()
    state = quantize_kept(k, v, lengths, spec)
    assert state.keys == [[64, 32]] and state.values == [[38, 8]]
    assert torch.equal(k[0, :64], fake_quantize_keys(keys[0, :64], 2, 16)) and torch.equal(k[0, 64:], keys[0, 64:])
    assert torch.equal(k[1, :32], fake_quantize_keys(keys[1, :32], 2, 16)) and torch.equal(k[1, 32:], keys[1, 32:])
    assert torch.equal(v[0, :38], fake_quantize_values(values[0, :38], 2, 16)) and torch.equal(v[0, 38:], values[0, 38:])
    assert torch.equal(v[1, :8], fake_quantize_values(values[1, :8], 2, 16)) and torch.equal(v[1, 8:], values[1, 8:])


def test_decode_state_quantizes_a_full_key_block_and_slides_values():
    gen = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, 48, 4, generator=gen), torch.randn(1, 48, 4, generator=gen)
    spec = QuantSpec(bits=4, group_size=8, residual=16)
    state = KIVIState(spec, [[32]], [[24]])  # 40 entries after the prompt: keys 32 + 8 full, values 24 + 16
    k, v = keys.clone(), values.clone()
    state.after_forward(0, k, v, torch.tensor([47]))  # 7 new entries: key residual 15, not yet R
    assert state.keys == [[32]] and state.values == [[31]]
    assert torch.equal(k, keys)
    state.after_forward(0, k, v, torch.tensor([48]))  # the residual reaches R = 16: one block
    assert state.keys == [[48]] and state.values == [[32]]
    assert torch.equal(k[0, 32:48], fake_quantize_keys(keys[0, 32:48], 4, 8))
    assert torch.equal(v[0, 24:32], fake_quantize_values(values[0, 24:32], 4, 8))


class Recorder(KIVIState):
    """Records, per forward and layer, the (keys, values) quantized counts after the update."""

    log: list = []

    def after_forward(self, layer, keys, values, lengths):
        super().after_forward(layer, keys, values, lengths)
        Recorder.log.append((id(self), layer, lengths.tolist(), list(self.keys[layer]), list(self.values[layer])))


def test_lifecycle_runs_per_plan_row_of_the_batched_cache(monkeypatch):
    """Two KIVI plans of different kept lengths decode together: each row keeps its own counts, the tokens
    equal a sequential decode, and the counts after every forward follow the rules from each plan's own
    length (G = 8, R = 16 so that blocks flush within a short answer)."""
    torch.set_num_threads(1)
    model = make_tiny_llama(layers=2, seed=3)
    ids = torch.randint(0, 256, (120,), generator=torch.Generator().manual_seed(4)).tolist()
    prompt = Prompt(ids=tuple(ids), question_start=110, n_original_tokens=120, truncated=False, max_new_tokens=12,
                    stop_ids=frozenset())
    lifecycle = KIVI.lifecycle

    def recording(self, storages):
        state = lifecycle(self, storages)
        state.__class__ = Recorder
        return state

    monkeypatch.setattr(KIVI, "lifecycle", recording)
    args = {"group_size": "8", "residual": "16"}
    plans = [Plan("snapkv+kivi4", build("snapkv+kivi4", args).method, Budget(tokens=37)),
             Plan("kivi2", build("kivi2", args).method, Budget(ratio=1.0))]
    outputs = {}
    for mode in ("batched", "sequential"):
        Recorder.log = []
        run = Engine(model, make_tiny_tokenizer(), decode=mode).run(prompt, plans, "context")
        outputs[mode] = ([g.token_ids for g in run.generations], list(Recorder.log))
    assert outputs["batched"][0] == outputs["sequential"][0]
    log = outputs["batched"][1]
    states = sorted({entry[0] for entry in log}, key=[entry[0] for entry in log].index)
    assert len(states) == 2
    for state, start in zip(states, (37, 110)):
        entries = [e for e in log if e[0] == state and e[1] == 0]
        keys, values = quantized_after_prompt(start, 16)
        n = start
        for step, (_, _, lengths, k, v) in enumerate(entries):
            n += 10 if step == 0 else 1  # the question (10 tokens), then one token per forward
            keys, values = quantized_after_append(n, keys, values, 16)
            assert lengths == [n, n] and k == [keys, keys] and v == [values, values]
        assert len(entries) == 12  # the question forward and 11 generated-token forwards
