"""The row schema: fingerprints stay byte-identical to the ones stored results carry, every field is documented
in results/README.md, and a row holds exactly the schema's fields."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from kvbench import evidence
from kvbench.data import Sample, TaskSpec
from kvbench.engine import Generation, Plan
from kvbench.methods.base import Budget, Selection
from kvbench.prompts import Prompt
from kvbench.results import schema

README = Path(__file__).resolve().parents[1] / "results" / "README.md"

# Expected digests computed with the code at main df4291b and 0c9ff07 (before this module existed:
# runner.protocol_fields, runner.config_fields and store.digest composed inline in runner.run) on exactly these
# inputs; see the report of the `results` branch. Stored results carry such digests: they must never move.
PROTOCOL = dict(model_identity="gguf-sha256:0123456789abcdef", max_length=8000, chat="template", dtype="float32",
                prompt_rules="longbench-pred-v1.1", metrics="longbench-v1-official-1", engine="engine-v1")
TASK = TaskSpec(name="hotpotqa", base="hotpotqa", short="HotpotQA", prompt="Answer: {context}\n\nQ: {input}\nA:",
                max_new_tokens=32, metric="qa_f1", language="en", category="Multi-Doc QA", chat=True,
                first_line=False, stop_at_newline=False)
DATA = "file-sha256:00112233aabbccdd"
SNAPKV_PARAMS = {"window": 32, "kernel": 7, "pooling": "max", "gqa_reduce": "mean"}


def test_fingerprints_are_those_of_the_code_that_wrote_stored_results():
    protocol = schema.protocol_fp(schema.protocol_fields(**PROTOCOL))
    assert protocol == "f1d7ca3bded0"
    task = schema.task_fp(TASK.fingerprint_fields(), DATA, protocol)
    assert task == "a06d86dd0176"
    assert schema.config_fp(schema.config_fields("snapkv", SNAPKV_PARAMS, "r0.1", "full"), task) == "07be8bb6430a"
    assert schema.config_fp(schema.config_fields("fullkv", {}, "full", "context"), task) == "21f09a29dbe9"
    assert schema.config_fp(schema.config_fields("snapkv", SNAPKV_PARAMS, "b128", "full"), task) == "b06d94413b91"
    # The engine's decode modes and chunked prefill, and method code versions (main 0c9ff07, runner.protocol_fields
    # and runner.config_fields with these arguments): only a non-default value enters the digest.
    assert schema.protocol_fp(schema.protocol_fields(**PROTOCOL, decode="sequential", prefill_chunk=0)) == protocol
    assert schema.protocol_fp(schema.protocol_fields(**PROTOCOL, decode="batched")) == "1cc7fe27c9d7"
    assert schema.protocol_fp(schema.protocol_fields(**PROTOCOL, decode="batched", prefill_chunk=512)) == "16f2d76b90e3"
    assert schema.protocol_fp(schema.protocol_fields(**PROTOCOL, prefill_chunk=512)) == "b4f57189036f"
    assert schema.config_fp(schema.config_fields("snapkv", SNAPKV_PARAMS, "r0.1", "full", 2), task) == "4aa4776b692e"
    # Query-head granularity and head-table artifacts (main 395d4ae, runner.config_fields on Plans of stub methods
    # with these params, then store.digest): a kv_head plan without artifacts keeps the digest above.
    heads = {"retrieval_reasoning": "ab" * 32}
    assert schema.config_fp(schema.config_fields("snapkv", SNAPKV_PARAMS, "r0.1", "full", granularity="kv_head",
                                                 artifacts={}), task) == "07be8bb6430a"
    assert schema.config_fp(schema.config_fields("snapkv", SNAPKV_PARAMS, "r0.1", "full", granularity="query_head"),
                            task) == "e9ca9e548edd"
    assert schema.config_fp(schema.config_fields("headkv", SNAPKV_PARAMS, "r0.1", "full", artifacts=heads),
                            task) == "1e3cb2c0b24b"
    assert schema.config_fp(schema.config_fields("headkv", SNAPKV_PARAMS, "r0.1", "full", 2, granularity="query_head",
                                                 artifacts=heads), task) == "d618463b577f"


def test_fingerprints_see_every_input():
    base = schema.protocol_fp(schema.protocol_fields(**PROTOCOL))
    for key, value in [("model_identity", "x"), ("max_length", None), ("chat", "none"), ("dtype", "bfloat16"),
                       ("prompt_rules", "v2"), ("metrics", "v2"), ("engine", "engine-v2")]:
        assert schema.protocol_fp(schema.protocol_fields(**{**PROTOCOL, key: value})) != base, key
    task = schema.task_fp(TASK.fingerprint_fields(), DATA, base)
    assert schema.task_fp(TASK.fingerprint_fields(), DATA, "other") != task
    assert schema.task_fp(TASK.fingerprint_fields(), "file-sha256:ff", base) != task
    assert schema.task_fp({**TASK.fingerprint_fields(), "max_new_tokens": 33}, DATA, base) != task
    config = schema.config_fields("snapkv", SNAPKV_PARAMS, "r0.1", "full")
    assert schema.config_fp(config, "other") != schema.config_fp(config, task)
    assert schema.config_fp({**config, "params": {**SNAPKV_PARAMS, "window": 16}}, task) != schema.config_fp(config, task)


def _readme_fields() -> set[str]:
    """The backticked names in the README's bullet list of row fields ('One line per sample' and 'Evidence')."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("- **One line per sample**"):text.index("- **Appends are flushed")]
    return set(re.findall(r"`([a-z_][a-z0-9_]*)`", section))


def test_readme_documents_every_field_and_no_other():
    documented = _readme_fields()
    fields = set(schema.FIELD_NAMES)
    assert fields - documented == set(), "fields missing from results/README.md"
    # budget labels, scopes, decode modes, a --metric value
    other_words = {"full", "context", "r0", "b128", "batched", "sequential", "retention_min", "kv_head", "query_head",
                   "physical", "simulated", "select", "think", "kivi2", "kivi4"}  # and method names
    assert documented - fields <= other_words, "README names fields the schema lacks"


class _Method:
    name = "snapkv"

    def params(self):
        return dict(SNAPKV_PARAMS)


def test_build_row_has_the_schema_fields_in_order():
    sample = Sample(id="s1", task="hotpotqa", input="q", context="c", answers=("yes",), length=123,
                    all_classes=None, language="en")
    prompt = Prompt(ids=tuple(range(10)), question_start=8, n_original_tokens=12, truncated=True, max_new_tokens=4,
                    stop_ids=frozenset())
    gen = Generation(plan=Plan("snapkv_x", _Method(), Budget(ratio=0.5)), token_ids=[5, 6, 7], text="yes",
                     kept_per_layer=[5, 4], cache_bytes=100, cache_bytes_allocated=150, full_cache_bytes=200,
                     decode_seconds=0.123456, max_cache_tokens=8, final_cache_tokens=[8, 7], decode="batched",
                     kept_entries=9, storage="simulated", stages=[("select", 180), ("kivi4", 100)],
                     kept_indices=[Selection.uniform(torch.tensor([[0, 1, 2, 3, 9]])),
                                   Selection.uniform(torch.tensor([[0, 1, 2, 9]]))])
    fields = evidence.row_fields(TASK, sample, prompt, gen.kept_indices, gen.kept_per_layer, 10)
    assert set(fields) == {f.name for f in schema.FIELDS if f.name.startswith(("evidence_", "layer_"))}
    row = schema.build_row(schema.RowInputs(
        task=TASK, sample=sample, gen=gen, prompt=prompt, model="smollm2-135m", scope="full", score=1.0,
        evidence=fields, prefilled=10, prefill_seconds=1.234567, peak_memory_bytes=None, device="Some CPU", run_id="run1",
        fps=schema.Fingerprints("p", "t", "c")))
    assert list(row) == list(schema.FIELD_NAMES)
    assert row["method"] == "snapkv_x" and row["method_base"] == "snapkv" and row["budget"] == "r0.5"
    assert row["generated_token_ids"] == [5, 6, 7] and row["generated_tokens"] == 3
    assert row["kept_tokens_mean"] == 4.5 and row["prefill_seconds"] == 1.2346 and row["decode_seconds"] == 0.1235
    assert row["device"] == "Some CPU" and row["decode"] == "batched" and row["cache_bytes_allocated"] == 150
    assert (row["protocol_fp"], row["task_fp"], row["config_fp"]) == ("p", "t", "c")
    # 9 kept entries of 2 layers x 1 head x 10 prefilled tokens
    assert row["granularity"] == "kv_head" and row["token_keep_ratio"] == 0.45 and row["byte_ratio"] == 0.5
    assert row["storage"] == "simulated" and row["stages"] == [{"stage": "select", "bytes": 180},
                                                               {"stage": "kivi4", "bytes": 100}]
