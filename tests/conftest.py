"""Shared fixtures: a tiny random-weight Llama and a tiny offline tokenizer for unit tests, the shared LongBench
data folder, and (slow tests only) the real SmolLM2-135M loaded through kvbench.

The tiny tokenizer is byte-level with one token per byte and **token id == byte value** (0..255), plus four
special tokens (ids 256..259). That makes expected token ids derivable by hand: the ids of an ASCII text are
`list(text.encode())`, with BOS (256) in front when the tokenizer adds special tokens."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

SHARED_LONGBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "longbench"

BOS, EOS, IM_START, IM_END = "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"
BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = 256, 257, 258, 259
TINY_VOCAB = 260
SYSTEM_HEADER = f"{IM_START}system\nYou are a tiny test model.{IM_END}\n"
# ChatML-like, starting with BOS (like Llama-2/3 templates) so the "no double BOS" rule is exercised.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}" + SYSTEM_HEADER
    + "{% for m in messages %}" + IM_START + "{{ m['role'] }}\n{{ m['content'] }}" + IM_END + "\n{% endfor %}"
    + "{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}"
)


def wrap_chat(content: str) -> str:
    """What TINY_CHAT_TEMPLATE renders for one user message with the generation prompt (written out by hand)."""
    return f"{BOS}{SYSTEM_HEADER}{IM_START}user\n{content}{IM_END}\n{IM_START}assistant\n"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def save_reference_llama(path: Path, **tokenizer_options) -> torch.nn.Module:
    """The kvpress parity model of methods-2.md §5.1, saved to `path` and returned: LlamaConfig(vocab 256, hidden
    64, intermediate 128, 2 layers, 4 heads / 2 KV heads, head_dim 16, rope_theta 1e4, 4096 positions),
    torch.manual_seed(0) before construction, every parameter times 3, float32. Loading needs a tokenizer:
    the tiny byte one, with `tokenizer_options` (make_tiny_tokenizer's); the tests feed ids < 256 themselves."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e4,
                         max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(3.0)
    model.save_pretrained(path)
    make_tiny_tokenizer(**tokenizer_options).save_pretrained(path)
    return model


def make_tiny_tokenizer(chat_template: str | None = TINY_CHAT_TEMPLATE, add_bos: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}  # id == byte value
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, IM_START, IM_END])
    assert [tok.token_to_id(t) for t in (BOS, EOS, IM_START, IM_END)] == [BOS_ID, EOS_ID, IM_START_ID, IM_END_ID]
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
        )
    kwargs = {"chat_template": chat_template} if chat_template is not None else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, **kwargs)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


def make_tiny_llama(layers: int = 2, seed: int = 0, sharpen: float = 16.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvbench.engine import attention

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
    )
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    # At the default init (std 0.02) attention logits are ~0.1, attention is nearly uniform and the model is
    # blind to positions: an off-by-one decode position would not change a single greedy token. Scaling the
    # query and key projections makes attention sharp and position-dependent, so position bugs show.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    attention.install(model)
    return model


@pytest.fixture(scope="module")
def tiny_llama():
    """A seeded 2-layer Llama (hidden 64, 4 heads / 2 KV heads, vocab 260 = the tiny tokenizer's, 512
    positions), float32, eval mode, sharpened attention, with kvbench's attention installed."""
    return make_tiny_llama()


@pytest.fixture(scope="session")
def shared_longbench() -> Path:
    if not (SHARED_LONGBENCH / "config" / "dataset2prompt.json").is_file():
        pytest.skip(f"shared LongBench data not found at {SHARED_LONGBENCH}")
    return SHARED_LONGBENCH


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF, converted once into the kvbench cache), on CPU in float32."""
    from kvbench.errors import KvbenchError
    from kvbench.models import load_model, resolve_model

    try:
        return load_model(resolve_model("smollm2-135m"), device="cpu")
    except KvbenchError as exc:
        pytest.skip(f"SmolLM2 not available: {exc}")


# ---- Local model folders and data folders for `kvbench run` end to end (tests/test_reliability.py) ----
RUN_TASK = "multifieldqa_en"


def save_tiny_model_dir(path: Path, *, max_positions: int = 2048, seed: int = 0, tokenizer: bool = True,
                        rope: bool = True) -> Path:
    """A folder `kvbench run --model DIR` loads like any saved checkpoint: config.json, model.safetensors and
    the tiny tokenizer's files. A small seeded Llama (hidden 32, 2 layers, 4 heads / 2 KV heads); rope=False
    saves a GPT-2 (learned positions) instead, tokenizer=False leaves the tokenizer out."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    ids = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    if rope:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=max_positions, **ids))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=TINY_VOCAB, n_embd=32, n_layer=1, n_head=2,
                                           n_positions=max_positions, **ids))
    model.save_pretrained(path)
    if tokenizer:
        make_tiny_tokenizer().save_pretrained(path)
    return path


def write_task_data(directory: Path, task: str = RUN_TASK, n: int = 8, words: int = 30) -> Path:
    """`n` short samples of a real LongBench task in the official jsonl format, as <directory>/<task>.jsonl."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{task}.jsonl", "w", encoding="utf-8") as handle:
        for i in range(n):
            context = " ".join(f"Fact {i}.{j}: the box {j} holds {7 * i + j} red marbles." for j in range(words // 8 + 1))
            row = {"input": f"How many marbles does box {i % 3} hold?", "context": context,
                   "answers": [f"{7 * i + i % 3} red marbles"], "length": len(context.split()), "dataset": task,
                   "language": "en", "all_classes": None, "_id": f"{task}-{i:03d}"}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer folder (see save_tiny_model_dir), made once per session."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A data folder holding multifieldqa_en.jsonl with 8 short samples (see write_task_data)."""
    return write_task_data(tmp_path_factory.mktemp("data"))


def run_kvbench(args: list[str], capsys: Any = None) -> tuple[int, str, str]:
    """`kvbench ARGS` through cli.main() in this process with one torch thread (the caller's count restored after):
    (exit code as a shell sees it: SystemExit(None) is 0, a message 1; stdout; stderr). The output needs capsys,
    which this first drains of anything printed before; without it both strings are empty."""
    from kvbench import cli as cli_mod

    if capsys is not None:
        capsys.readouterr()
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["kvbench", *args]
    torch.set_num_threads(1)
    try:
        cli_mod.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err
