"""LongBench prompts exactly as the official pred.py builds them: fill the template, truncate the middle
(before any chat template), wrap in the chat template except for few-shot and code tasks, tokenize without
a double BOS; plus the stop tokens and the number of new tokens."""

from __future__ import annotations

from dataclasses import dataclass
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

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


def fill(template: str, sample: Sample) -> str:
    """str.format only substitutes the template's own fields; braces inside context/input stay literal."""
    return template.format(context=sample.context, input=sample.input)


def middle_truncate(text: str, tokenizer: Any, max_length: int) -> tuple[str, int, bool]:
    """Keep the first and last int(max_length/2) tokens (tokenized as the tokenizer does by default, special
    tokens included), each half decoded with special tokens skipped, joined as strings."""
    ids = tokenizer(text, truncation=False)["input_ids"]
    if len(ids) <= max_length:
        return text, len(ids), False
    half = int(max_length / 2)
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail, len(ids), True


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


def question_suffix(task: TaskSpec, sample: Sample) -> str:
    """The text after {context} in the filled template: the question and the answer cue."""
    if "{context}" not in task.prompt:
        return ""
    return task.prompt.split("{context}", 1)[1].format(input=sample.input)


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
    text = fill(task.prompt, sample)
    if max_length is not None:
        text, n_original, truncated = middle_truncate(text, tokenizer, max_length)
    else:
        n_original, truncated = len(tokenizer(text, truncation=False)["input_ids"]), False
    templated = task.chat and chat_policy == "template"
    if templated:
        text = apply_chat(text, tokenizer)
    ids, offsets = encode_final(text, tokenizer, templated)
    if max_length is None and max_positions is not None and len(ids) + task.max_new_tokens > max_positions:
        raise InputError(
            f"sample {sample.id} of {task.name}: prompt of {len(ids)} tokens + {task.max_new_tokens} new tokens "
            f"exceeds the model's {max_positions} positions and the model has no truncation length (--max-length)"
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
    )
