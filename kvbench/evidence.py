"""Evidence retention and cross-layer overlap: why a compressed method lost points.

Evidence is the part of the context a correct answer needs, where it is known exactly:

- passage_retrieval_en / passage_retrieval_zh (and their LongBench-E variants): the gold paragraph, found from
  the answer's number ("Paragraph 19" / "段落27") and the paragraph's label in the context ("Paragraph 19:" /
  "段落27：" at the start of a line); the span runs from the label to the end of the paragraph's text.
- synthetic tasks: the needles, whose character spans in the context `Sample.extra` carries
  (`evidence_char_spans`).

Spans are character ranges in `sample.context`. They are mapped into the final prompt through the filled
template and `Prompt.segments` (the head and tail that middle truncation kept, inside any chat template), then
to tokens through the final text's offsets: a token is evidence when its characters overlap a span. A span cut
by truncation counts only its surviving tokens; tokens at or after `Prompt.question_start` (the question part)
never count.

Retention of one layer whose kept indices are [H_kv, k] (or one index set per head, of per-head lengths) is the
fraction of (KV head, evidence token) pairs kept; a row records the mean and the min over layers. Overlap is the Jaccard similarity |A ∩ B| / |A ∪ B| of
the kept index sets of adjacent layers, per KV head, averaged over heads and then over the L - 1 adjacent
pairs (the ChunkKV paper's "index-reuse Jaccard similarity", its Table 2).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvbench.data import Sample, TaskSpec
from kvbench.prompts import Prompt, template_halves

PASSAGE_LABELS = {"passage_retrieval_en": "Paragraph", "passage_retrieval_zh": "段落"}


# ---- evidence spans ---------------------------------------------------------------------------------------
def passage_span(context: str, label: str, answer: str) -> tuple[int, int] | None:
    """The gold paragraph's span: from "<label> N" (line start, followed by ':' or '：') to the start of the
    next labelled paragraph (whitespace before it excluded) or the end of the context."""
    number = re.search(r"\d+", answer)
    if number is None:
        return None
    heads = list(re.finditer(rf"(?:^|\n)[ \t]*({re.escape(label)}\s*(\d+)\s*[:：])", context))
    gold = [m for m in heads if m.group(2) == number.group(0)]
    if len(gold) != 1:
        return None  # missing or ambiguous: no evidence rather than a wrong one
    start = gold[0].start(1)
    later = [m.start(1) for m in heads if m.start(1) > start]
    end = min(later) if later else len(context)
    while end > start and context[end - 1].isspace():
        end -= 1
    return (start, end)


def char_spans(task: TaskSpec, sample: Sample) -> tuple[tuple[int, int], ...] | None:
    """Evidence spans in sample.context, or None when the task has no known evidence."""
    if task.synthetic:
        spans = sample.meta("evidence_char_spans")
        return tuple((int(a), int(b)) for a, b in spans) if spans else None
    label = PASSAGE_LABELS.get(task.base)
    if label is None or not sample.answers:
        return None
    span = passage_span(sample.context, label, sample.answers[0])
    return (span,) if span is not None else None


def context_offset(task: TaskSpec, sample: Sample) -> int | None:
    """Where {context} starts in the filled template (prompts.fill)."""
    halves = template_halves(task)
    return None if halves is None else len(halves[0].format(input=sample.input))


def token_positions(spans: Sequence[tuple[int, int]], prompt: Prompt, filled_offset: int = 0) -> tuple[int, ...]:
    """Token indices of the final prompt that overlap any span (character ranges of the filled template minus
    `filled_offset`), through prompt.segments and prompt.offsets; tokens from question_start on excluded."""
    final_spans = []
    for start, end in spans:
        start, end = start + filled_offset, end + filled_offset
        for final_start, filled_start, length in prompt.segments:
            lo, hi = max(start, filled_start), min(end, filled_start + length)
            if hi > lo:
                final_spans.append((final_start + lo - filled_start, final_start + hi - filled_start))
    if not final_spans:
        return ()
    limit = min(prompt.question_start, len(prompt.offsets))
    out = []
    for index in range(limit):
        a, b = prompt.offsets[index]
        if b > a and any(a < hi and lo < b for lo, hi in final_spans):
            out.append(index)
    return tuple(out)


def evidence_positions(task: TaskSpec, sample: Sample, prompt: Prompt) -> tuple[int, ...] | None:
    """Evidence token positions in the final prompt; None when the task has no known evidence (or the
    prompt carries no text/offsets to map through); () when all of it was truncated away."""
    spans = char_spans(task, sample)
    offset = context_offset(task, sample)
    if spans is None or offset is None or not prompt.offsets:
        return None
    return token_positions(spans, prompt, offset)


# ---- retention and overlap ---------------------------------------------------------------------------------
def retention_per_layer(kept: Sequence[torch.Tensor], positions: Sequence[int]) -> list[float]:
    """For each layer's kept indices [H_kv, k]: the fraction of (head, evidence token) pairs kept."""
    if not positions:
        raise ValueError("retention of zero evidence tokens")
    evidence = np.unique(np.asarray(positions, dtype=np.int64))
    out = []
    for layer in kept:
        heads = _heads(layer)
        hits = sum(np.intersect1d(evidence, np.unique(head), assume_unique=True).size for head in heads)
        out.append(hits / (len(heads) * evidence.size))
    return out


def _heads(layer: Any) -> list[np.ndarray]:
    """A layer's kept indices, one int64 array per head: from a [H, k] tensor or array, a `Selection` (per-head
    lengths), or a list of per-head index sets."""
    if hasattr(layer, "rows") and hasattr(layer, "lengths"):  # kvbench.methods.base.Selection
        layer = layer.rows()
    if isinstance(layer, (list, tuple)):
        return [np.asarray(h.numpy() if isinstance(h, torch.Tensor) else h, dtype=np.int64) for h in layer]
    array = np.asarray(layer.numpy() if isinstance(layer, torch.Tensor) else layer, dtype=np.int64)
    return list(array.reshape(-1, array.shape[-1]))


def jaccard(a: Any, b: Any) -> float:
    """|A ∩ B| / |A ∪ B| of two index sets (duplicates ignored); 1 for two empty sets."""
    a, b = np.unique(np.asarray(a)), np.unique(np.asarray(b))
    common = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - common
    return common / union if union else 1.0


def layer_overlap(kept: Sequence[torch.Tensor]) -> float | None:
    """Mean over adjacent layer pairs of the per-KV-head Jaccard similarity of kept index sets, averaged over
    heads. None with fewer than two layers."""
    if len(kept) < 2:
        return None
    pairs = []
    for below, above in zip(kept[:-1], kept[1:]):
        below, above = _heads(below), _heads(above)
        if len(below) != len(above):
            raise ValueError(f"adjacent layers keep for {len(below)} and {len(above)} heads")
        pairs.append(sum(jaccard(x, y) for x, y in zip(below, above)) / len(below))
    return sum(pairs) / len(pairs)


def row_fields(task: TaskSpec, sample: Sample, prompt: Prompt, kept: Sequence[torch.Tensor] | None,
               kept_per_layer: Sequence[int], n_compressed: int) -> dict[str, Any]:
    """The result-row fields (see results/README.md). `kept` is Generation.kept_indices (None for FullKV),
    `n_compressed` the prompt tokens each layer held before compression."""
    positions = evidence_positions(task, sample, prompt)
    nothing_evicted = kept is None or all(k >= n_compressed for k in kept_per_layer)
    fields: dict[str, Any] = {
        "evidence_tokens": None if positions is None else len(positions),
        "evidence_retention": None,
        "evidence_retention_mean": None,
        "evidence_retention_min": None,
        "layer_overlap": None if nothing_evicted or kept is None else _round(layer_overlap(kept)),
    }
    if positions:
        if kept is None:
            per_layer = [1.0] * len(kept_per_layer)  # FullKV holds every token
        else:
            per_layer = retention_per_layer(kept, positions)
        fields["evidence_retention"] = [_round(v) for v in per_layer]
        fields["evidence_retention_mean"] = _round(sum(per_layer) / len(per_layer))
        fields["evidence_retention_min"] = _round(min(per_layer))
    return fields


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
