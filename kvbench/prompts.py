"""LongBench prompts exactly as the official pred.py builds them: fill the template, truncate the middle
(before any chat template), wrap in the chat template except for few-shot and code tasks, tokenize without
a double BOS; plus the stop tokens and the number of new tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvbench.data import Sample, TaskSpec
from kvbench.errors import InputError

# Bump when any rule in this module changes: it is part of every protocol fingerprint.
PROMPT_RULES_VERSION = "longbench-pred-v1.1"


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    question_start: int  # first token of the part after {context} (for --scope context)
    n_original_tokens: int  # length of the filled prompt before middle truncation
    truncated: bool
    max_new_tokens: int
    stop_ids: frozenset[int]
    # The final text, its token offsets, and where it copies the filled template verbatim: (final_start,
    # filled_start, length) triples (the head and tail kept by middle truncation, inside the chat template).
    # kvbench.evidence maps evidence spans through them.
    text: str = field(default="", repr=False, compare=False)
    offsets: tuple[tuple[int, int], ...] = field(default=(), repr=False, compare=False)
    segments: tuple[tuple[int, int, int], ...] = field(default=(), repr=False, compare=False)

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


def fill(template: str, sample: Sample) -> str:
    """str.format only substitutes the template's own fields; braces inside context/input stay literal."""
    return template.format(context=sample.context, input=sample.input)


def middle_truncate(text: str, tokenizer: Any, max_length: int) -> tuple[str, int, bool]:
    """Keep the first and last int(max_length/2) tokens (tokenized as the tokenizer does by default, special
    tokens included), each half decoded with special tokens skipped, joined as strings."""
    head, tail, n_original, truncated = middle_truncate_parts(text, tokenizer, max_length)
    return head + tail, n_original, truncated


def middle_truncate_parts(text: str, tokenizer: Any, max_length: int) -> tuple[str, str, int, bool]:
    """middle_truncate's head and tail strings (head = text and tail = "" when nothing is cut)."""
    ids = tokenizer(text, truncation=False)["input_ids"]
    if len(ids) <= max_length:
        return text, "", len(ids), False
    half = int(max_length / 2)
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head, tail, len(ids), True


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def copied_segments(filled: str, head: str, tail: str, final: str) -> tuple[tuple[int, int, int], ...]:
    """Where `final` (head + tail, maybe inside a chat template) copies `filled` verbatim, as (final_start,
    filled_start, length). Decoding a cut half may differ from the original at its edges (a split multi-byte
    character); only the characters that match are mapped. Empty when head + tail cannot be found."""
    body = head + tail
    lo, hi = 0, len(body)  # the part of body that appears in final
    at = final.find(body)
    if at < 0:  # some chat templates trim the message
        stripped = body.strip()
        found = final.find(stripped) if stripped else -1
        if found < 0:
            return ()
        lo = len(body) - len(body.lstrip())
        hi = lo + len(stripped)
        at = found - lo
    n_head = _common_prefix(head, filled)
    n_tail = _common_prefix(tail[::-1], filled[n_head:][::-1]) if tail else 0
    segments = []
    for body_start, filled_start, length in ((0, 0, n_head), (len(body) - n_tail, len(filled) - n_tail, n_tail)):
        start, end = max(body_start, lo), min(body_start + length, hi)
        if end > start:
            segments.append((at + start, filled_start + start - body_start, end - start))
    return tuple(segments)


def apply_chat(text: str, tokenizer: Any) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the model's tokenizer has no chat template; use a model alias with `chat: none`")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def encode_final(text: str, tokenizer: Any, templated: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokenize the final prompt. A chat template that already starts with BOS must not get a second one."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (templated and bos and text.startswith(bos))
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def template_halves(task: TaskSpec) -> tuple[str, str] | None:
    """The template before and after {context}, still to be filled with the sample's input; None without one."""
    if "{context}" not in task.prompt:
        return None
    before, after = task.prompt.split("{context}", 1)
    return before, after


def question_suffix(task: TaskSpec, sample: Sample) -> str:
    """The text after {context} in the filled template: the question and the answer cue."""
    halves = template_halves(task)
    return "" if halves is None else halves[1].format(input=sample.input)


def check_max_length(task: TaskSpec, sample: Sample, tokenizer: Any, max_length: int) -> None:
    """Middle truncation keeps the last int(max_length/2) tokens of the filled template: a truncated prompt
    must still hold the whole question (the template after {context}), or every answer is to a cut question."""
    suffix = question_suffix(task, sample)
    if not suffix:
        return
    half = int(max_length / 2)
    n_question = len(tokenizer(suffix, add_special_tokens=False)["input_ids"])
    if n_question <= half:
        return
    if len(tokenizer(fill(task.prompt, sample), truncation=False)["input_ids"]) <= max_length:
        return  # not truncated at all
    raise InputError(
        f"--max-length {max_length} is too small for {task.name}: middle truncation keeps the last {half} tokens, "
        f"but the question of sample {sample.id} takes {n_question}; use --max-length {2 * n_question} or more"
    )


def find_question_start(text: str, offsets: list[tuple[int, int]], suffix: str) -> int:
    """First token that starts at or after the suffix's first character (a token straddling the boundary
    stays with the context). Without a findable suffix the whole prompt is context."""
    if not suffix:
        return len(offsets)
    at = text.rfind(suffix)
    if at < 0:
        return len(offsets)
    for index, (start, end) in enumerate(offsets):
        if end > start and start >= at:
            return index
    return len(offsets)


def newline_token(tokenizer: Any) -> int:
    """Official samsum rule: the last id of "\\n" encoded without special tokens."""
    return tokenizer.encode("\n", add_special_tokens=False)[-1]


def build_prompt(
    task: TaskSpec,
    sample: Sample,
    tokenizer: Any,
    max_length: int | None,
    chat_policy: str,
    model_stop_ids: frozenset[int],
    max_positions: int | None = None,
) -> Prompt:
    filled = fill(task.prompt, sample)
    if max_length is not None:
        head, tail, n_original, truncated = middle_truncate_parts(filled, tokenizer, max_length)
        text = head + tail
    else:
        head, tail, text = filled, "", filled
        n_original, truncated = len(tokenizer(text, truncation=False)["input_ids"]), False
    templated = task.chat and chat_policy == "template"
    if templated:
        text = apply_chat(text, tokenizer)
    ids, offsets = encode_final(text, tokenizer, templated)
    if max_length is None and max_positions is not None and len(ids) + task.max_new_tokens > max_positions:
        raise InputError(
            f"sample {sample.id} of {task.name}: prompt of {len(ids)} tokens + {task.max_new_tokens} new tokens "
            f"exceeds the model's {max_positions} positions and the model has no truncation length ({{max_length}})",
            options=("max_length",),
        )
    stops = set(model_stop_ids)
    if task.stop_at_newline:
        stops.add(newline_token(tokenizer))
    return Prompt(
        ids=tuple(ids),
        question_start=find_question_start(text, offsets, question_suffix(task, sample)),
        n_original_tokens=n_original,
        truncated=truncated,
        max_new_tokens=task.max_new_tokens,
        stop_ids=frozenset(stops),
        text=text,
        offsets=tuple(offsets),
        segments=copied_segments(filled, head, tail, text),
    )
