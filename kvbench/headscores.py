"""HeadKV's head-importance scores, computed by kvbench on the loaded model (`kvbench headscores --method
headkv`; methods-2 §2.21). The procedure of FYYFU/HeadKV `retrieval_head_detection_r2.py` (0862a09), on our
own needles and local haystack text:

- A grid of needle-in-a-haystack tests: for each needle, context lengths x depths (default: lengths
  round(linspace(1000, min(10000, the model's positions), 5)), depths round(linspace(0, 100, 10)), as the
  reference's 5 x 10 grid; two needles, 100 tests). A test's context is `length - 200` tokens of haystack
  and needle (the reference's 200-token buffer), the needle inserted at `depth`% of the haystack, moved back
  to just after a sentence end; then the question template. Built on token ids, so the needle's span is
  known exactly (the reference re-tokenises text and searches for the span).
- The prompt minus its last token is prefilled; then greedy decoding feeds the last token and each token it
  picks, for at most as many steps as the answer has tokens (stopping after a newline or an end token).
  At every step, for every (layer, query head): the newest query's attention row, its top n positions with
  n = the needle's length; each of them inside the needle adds 10 v / (n * answer tokens) to the head's
  accumulator (no copy-match condition, as the reference).
- A test is accepted when the answer's LongBench qa F1 is above `min_f1` (50, as the reference); every head
  then appends its accumulator to its list. A head's importance = the mean of its list.
Output: HeadKV's JSON layout ({"layer-head": [...]}, kvbench.headtables), one value per accepted test.

Needles (ours, in the reference's form: two people, their ages and favourite activities; the question asks
for the older or younger one's). Haystack: the contexts of local LongBench files (`--data-dir`, `--tasks`),
or, offline without data, the English filler of kvbench's synthetic tasks.

Interrupted work loses nothing: each finished test is appended to `<file>.partial.jsonl` and skipped on the
next run; the table is written (atomically) when the grid is complete."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from kvbench import headtables, metrics
from kvbench.engine import attention
from kvbench.errors import InputError

PROCEDURE = "kvbench-headscores-v1 (HeadKV retrieval_head_detection_r2.py semantics)"
BUFFER = 200  # tokens the reference leaves for the question and the answer
TEMPLATE = "\nAnswer from the text above. Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Needle:
    text: str
    question: str
    answer: str


NEEDLES = (
    Needle(" Clara is 34 years old and likes rowing best of all, while Martin, aged 29, likes pottery best of all. ",
           "Of Clara and Martin, which activity does the older one like best?", "rowing"),
    Needle(" Ravi, who is 52, spends every free hour birdwatching, and Ines, who is 47, spends every free hour "
           "fencing. ", "Of Ravi and Ines, what does the younger one spend every free hour doing?", "fencing"),
)


@dataclass(frozen=True)
class Grid:
    lengths: tuple[int, ...]
    depths: tuple[int, ...]
    min_f1: float = 50.0

    @classmethod
    def default(cls, max_positions: int) -> "Grid":
        top = min(10000, max_positions)
        return cls(lengths=linspace_ints(min(1000, top), top, 5), depths=linspace_ints(0, 100, 10))


def linspace_ints(start: int, stop: int, num: int) -> tuple[int, ...]:
    """round(linspace(start, stop, num)) as numpy computes it, without duplicates."""
    values = torch.linspace(float(start), float(stop), num, dtype=torch.float64).round().long().tolist()
    return tuple(dict.fromkeys(values))


@dataclass(frozen=True)
class Test:
    needle: int
    length: int
    depth: int

    @property
    def key(self) -> str:
        return f"{self.needle}:{self.length}:{self.depth}"


def step_scores(rows: torch.Tensor, start: int, stop: int, answer_tokens: int) -> torch.Tensor:
    """One decoding step's contribution, [L, H]: rows [L, H, K] are the newest query's attention; of each
    row's top n = stop - start positions, those inside [start, stop) add 10 v / (n * answer_tokens)."""
    n = stop - start
    values, index = rows.float().topk(n, dim=-1)
    inside = (index >= start) & (index < stop)
    return (values * inside).sum(dim=-1).double() * 10.0 / (n * answer_tokens)


class LastRows:
    """Attention observer: per layer, the newest query's softmax row over the whole cache, [H_q, K]."""

    def __init__(self, n_layers: int):
        self.rows: list[torch.Tensor | None] = [None] * n_layers

    def on_attention(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     lse: torch.Tensor | None = None) -> None:
        q = query[0, :, -1, :].float()  # [H_q, d]
        keys = key[0].float().repeat_interleave(q.shape[0] // key.shape[1], dim=0)  # [H_q, K, d]
        logits = torch.matmul(keys, q[:, :, None])[..., 0] * float(module.scaling)
        self.rows[module.layer_idx] = torch.softmax(logits, dim=-1)

    def stacked(self) -> torch.Tensor:
        return torch.stack([r for r in self.rows if r is not None])


def haystack_ids(tokenizer: Any, texts: list[str], need: int) -> list[int]:
    """At least `need` token ids of the texts, repeated in order until long enough."""
    if not texts:
        raise InputError("the haystack is empty")
    out: list[int] = []
    i = 0
    while len(out) < need:
        out += tokenizer.encode(texts[i % len(texts)] + "\n", add_special_tokens=False)
        i += 1
        if i > 100 * len(texts) and not out:
            raise InputError("the haystack text tokenises to nothing")
    return out


def sentence_ends(tokenizer: Any, ids: list[int]) -> set[int]:
    """Positions of the tokens that end with a full stop."""
    ending = {t for t in set(ids) if tokenizer.decode([t]).rstrip().endswith(".")}
    return {i for i, t in enumerate(ids) if t in ending}


def build_test(tokenizer: Any, hay: list[int], ends: set[int], needle: Needle, length: int,
               depth: int) -> tuple[list[int], int, int]:
    """(prompt ids, needle start, needle stop) for one test; `ends`: sentence_ends(hay)."""
    needle_ids = tokenizer.encode(needle.text, add_special_tokens=False)
    n_hay = max(0, length - BUFFER - len(needle_ids))
    context = hay[:n_hay]
    cut = int(n_hay * depth / 100)
    while 0 < cut < n_hay and (cut - 1) not in ends:
        cut -= 1  # back to just after a sentence end, as the reference
    prefix = tokenizer.encode("", add_special_tokens=True)  # BOS where the tokenizer adds one
    question = tokenizer.encode(TEMPLATE.format(question=needle.question), add_special_tokens=False)
    ids = prefix + context[:cut] + needle_ids + context[cut:] + question
    start = len(prefix) + cut
    return ids, start, start + len(needle_ids)


@torch.inference_mode()
def run_test(model: Any, tokenizer: Any, stop_ids: frozenset[int], ids: list[int], start: int, stop: int,
             answer: str) -> tuple[str, torch.Tensor]:
    """(response, per-head accumulator [L, H_q]) of one test."""
    device = next(model.parameters()).device
    n_layers = model.config.num_hidden_layers
    answer_tokens = max(1, len(tokenizer.encode(answer, add_special_tokens=False)))
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([ids[:-1]], device=device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    observer = LastRows(n_layers)
    token, output = ids[-1], []
    total = torch.zeros(n_layers, model.config.num_attention_heads, dtype=torch.float64)
    position = len(ids) - 1
    for _ in range(answer_tokens):
        with attention.observing(observer):
            logits = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache, use_cache=True,
                           position_ids=torch.tensor([[position]], device=device)).logits[0, -1]
        position += 1
        token = int(torch.argmax(logits))
        output.append(token)
        total += step_scores(observer.stacked(), start, stop, answer_tokens).cpu()
        if token in stop_ids or "\n" in tokenizer.decode([token]):
            break
    return tokenizer.decode(output, skip_special_tokens=True).strip(), total


def detect(model: Any, tokenizer: Any, stop_ids: frozenset[int], texts: list[str], grid: Grid, out: Path,
           meta: dict[str, Any], log: Callable[[str], None] = print) -> Path:
    """Run the grid (resuming from `<out>.partial.jsonl`) and write the table to `out`."""
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and max(grid.lengths) > max_positions:
        raise InputError(f"--lengths: {max(grid.lengths)} tokens exceed the model's {max_positions} positions")
    if min(grid.lengths) <= BUFFER:
        raise InputError(f"--lengths must be above the {BUFFER}-token buffer, got {min(grid.lengths)}")
    partial = out.with_name(out.name + ".partial.jsonl")
    done: dict[str, dict[str, Any]] = {}
    if partial.is_file():
        for line in partial.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                done[record["test"]] = record
            except (json.JSONDecodeError, KeyError):
                continue  # a line torn by a crash: redo that test
    hay = haystack_ids(tokenizer, texts, max(grid.lengths))
    ends = sentence_ends(tokenizer, hay)
    tests = [Test(n, length, depth) for n in range(len(NEEDLES)) for length in grid.lengths for depth in grid.depths]
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "a", encoding="utf-8") as handle:
        for i, test in enumerate(tests):
            if test.key in done:
                continue
            needle = NEEDLES[test.needle]
            began = time.perf_counter()
            ids, start, stop = build_test(tokenizer, hay, ends, needle, test.length, test.depth)
            response, total = run_test(model, tokenizer, stop_ids, ids, start, stop, needle.answer)
            f1 = 100 * metrics.qa_f1(response, needle.answer)
            record = {"test": test.key, "f1": f1, "response": response, "scores": total.tolist()}
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            done[test.key] = record
            log(f"[{i + 1}/{len(tests)}] needle {test.needle} length {test.length} depth {test.depth}%: "
                f"f1 {f1:.0f} ({time.perf_counter() - began:.1f}s) {response[:40]!r}")
    accepted = [done[t.key] for t in tests if done[t.key]["f1"] > grid.min_f1]
    if not accepted:
        raise InputError(f"no test was answered with F1 above {grid.min_f1} ({len(tests)} tests): this model "
                         "cannot do the retrieval-reasoning needles; a negative --min-f1 accepts every test "
                         "(heads are then scored on attention alone)")
    layers, heads = len(accepted[0]["scores"]), len(accepted[0]["scores"][0])
    table = {f"{layer}-{head}": [record["scores"][layer][head] for record in accepted]
             for layer in range(layers) for head in range(heads)}
    headtables.write(out, "retrieval_reasoning", table, {
        **meta, "procedure": PROCEDURE, "grid": asdict(grid), "needles": [asdict(n) for n in NEEDLES],
        "template": TEMPLATE, "tests": len(tests), "accepted": len(accepted)})
    partial.unlink()
    log(f"wrote {out}: {len(accepted)} of {len(tests)} tests accepted (F1 > {grid.min_f1})")
    return out
