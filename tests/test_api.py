"""The Python API (kvbench.evaluate / load_results / table): rows returned, nothing written with results=None,
keywords derived from runner.RunOptions, errors that name arguments (the CLI's name flags), loaded
(model, tokenizer) pairs, and the public names."""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RUN_TASK, make_tiny_llama, make_tiny_tokenizer

import kvbench
from kvbench.results import schema
from kvbench import api, cli, runner
from kvbench.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def evaluate(model, data, **kwargs):
    kwargs = {"tasks": RUN_TASK, "data_dir": data, "limit": 2, "device": "cpu", "log": None, **kwargs}
    return kvbench.evaluate(str(model) if isinstance(model, Path) else model, kwargs.pop("methods", ["fullkv"]),
                            **kwargs)


def test_results_none_returns_scored_rows_and_writes_nothing(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = evaluate(tiny_model_dir, tiny_data_dir, methods=["fullkv", "snapkv"], ratios=[0.5], results=None)
    assert [(r["_id"], r["method"]) for r in rows] == [
        (f"{RUN_TASK}-000", "fullkv"), (f"{RUN_TASK}-000", "snapkv"),
        (f"{RUN_TASK}-001", "fullkv"), (f"{RUN_TASK}-001", "snapkv")]
    assert all(0.0 <= r["score"] <= 1.0 and r["prediction"] is not None for r in rows)
    assert list(tmp_path.iterdir()) == []


def test_rows_written_then_returned_again_without_recomputing(tiny_model_dir, tiny_data_dir, tmp_path):
    results = tmp_path / "results"
    first = evaluate(tiny_model_dir, tiny_data_dir, results=results)
    lines: list[str] = []
    again = evaluate(tiny_model_dir, tiny_data_dir, results=str(results), log=lines.append)
    assert again == first and len(first) == 2
    assert any("nothing to run" in line for line in lines)


def test_load_results_is_a_dataframe_with_the_documented_schema(tiny_model_dir, tiny_data_dir, tmp_path):
    pytest.importorskip("pandas")
    results = tmp_path / "results"
    rows = evaluate(tiny_model_dir, tiny_data_dir, methods=["fullkv", "snapkv"], ratios=[0.5], results=results)
    frame = kvbench.load_results(results)
    # results/README.md documents exactly schema.FIELDS (tests/test_schema.py holds the two equal)
    documented = set(schema.FIELD_NAMES)
    assert {"_id", "score", "config_fp", "evidence_retention_min", "layer_overlap"} <= documented
    assert documented <= set(frame.columns), sorted(documented - set(frame.columns))
    assert len(frame) == len(rows) == 4
    assert sorted(frame["score"]) == sorted(r["score"] for r in rows)


def test_load_results_without_pandas_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'kvbench[pandas]'")):
        kvbench.load_results(tmp_path)


def test_table_is_what_the_cli_prints(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    evaluate(tiny_model_dir, tiny_data_dir, methods=["fullkv", "snapkv"], ratios=[0.5], results=results)
    text = kvbench.table(results)
    assert "| Full | FullKV |" in text and "| 50% | SnapKV |" in text
    monkeypatch.setattr(sys, "argv", ["kvbench", "table", "--results", str(results)])
    cli.main()
    assert capsys.readouterr().out == text


# ---- errors: arguments in the API, flags in the CLI -----------------------------------------------------------
ERRORS = [  # (API keywords, CLI flags, API message, CLI message)
    ({"ratios": [0]}, ["--ratio", "0"], "ratios= must be in (0, 1]", "--ratio must be in (0, 1]"),
    ({"limit": -1}, ["--limit", "-1"], "limit= must be >= 0", "--limit must be >= 0"),
    ({"ratios": 0.5, "budgets": 8}, ["--ratio", "0.5", "--budget", "8"], "give ratios= or budgets=, not both",
     "give --ratio or --budget, not both"),
    ({"method_args": {"windw_size": 8}}, ["--method-arg", "windw_size=8"],
     "method_args= windw_size: no selected method", "--method-arg windw_size: no selected method"),
    ({"scope": "partial"}, ["--scope", "partial"], "scope= must be one of", "--scope must be one of"),
    ({"decode": "fast"}, ["--decode", "fast"], "decode= must be one of", "--decode must be one of"),
    ({"prefill_chunk": -1}, ["--prefill-chunk", "-1"], "prefill_chunk= must be a number", "--prefill-chunk must be"),
    ({"data": "local"}, ["--data", "local"], "data= local needs data_dir=", "--data local needs --data-dir"),
    ({"tasks": []}, ["--tasks", ""], "tasks= selects no task", "--tasks selects no task"),
    ({"methods": []}, ["--method", ""], "methods= is empty", "--method is empty"),
    ({"max_length": 0}, ["--max-length", "0"], "max_length= must be positive", "--max-length must be positive"),
    ({"dtype": "fp8"}, ["--dtype", "fp8"], "dtype= must be auto", "--dtype must be auto"),
    ({"synthetic_length": 5, "tasks": "synthetic"}, ["--synthetic-length", "5", "--tasks", "synthetic"],
     "synthetic_length= must be at least 50", "--synthetic-length must be at least 50"),
]


@pytest.mark.parametrize("kwargs, flags, api_text, cli_text", ERRORS, ids=[e[3].split()[0] for e in ERRORS])
def test_errors_name_arguments_in_python_and_flags_in_the_cli(kwargs, flags, api_text, cli_text, tiny_model_dir,
                                                              tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    methods = kwargs.pop("methods", ["fullkv", "snapkv"])
    with pytest.raises(InputError) as info:
        kvbench.evaluate(str(tiny_model_dir), methods, **{"results": None, **kwargs})
    assert api_text in str(info.value) and "--" not in str(info.value)
    method = ",".join(methods) if methods else ""
    monkeypatch.setattr(sys, "argv", ["kvbench", "run", "--model", str(tiny_model_dir), "--method", method, *flags])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("kvbench: error: ") and cli_text in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, text", [
    ({"ratios": "0.2"}, "ratios= must be a float or a non-empty list of them, got '0.2'"),
    ({"budgets": [1.5]}, "budgets= must be a int or a non-empty list of them"),
    ({"limit": "3"}, "limit= must be int or None, got '3'"),
    ({"wait": 1}, "wait= must be bool, got 1"),
    ({"shard": (2, 2)}, "shard= must be a pair (i, n) with 0 <= i < n"),
    ({"tasks": 3}, "tasks= must be a name or a list of names"),
])
def test_wrong_types_name_the_argument(kwargs, text):
    with pytest.raises(InputError, match=re.escape(text)):
        kvbench.evaluate("smollm2-135m", "fullkv", **kwargs)


def test_unknown_keyword_suggests_the_argument():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'ratio' \(did you mean 'ratios'\?\)"):
        kvbench.evaluate("smollm2-135m", "fullkv", ratio=0.2)


# ---- keywords derived from RunOptions ------------------------------------------------------------------------
def test_every_run_option_is_a_keyword_and_new_ones_flow_through(monkeypatch):
    @dataclasses.dataclass
    class Extended(runner.RunOptions):  # what a change adding options to the run looks like
        future_mode: str = "a"
        future_size: int | None = None

    monkeypatch.setattr(runner, "RunOptions", Extended)
    opts = api.run_options("smollm2-135m", ["fullkv"], future_mode="b", future_size=512, presets="p.yaml",
                           data_dir="d", results=None, seed=3, decode="sequential")
    assert (opts.future_mode, opts.future_size, opts.seed, opts.decode) == ("b", 512, 3, "sequential")
    assert (opts.presets, opts.data_dir, opts.results) == (Path("p.yaml"), Path("d"), None)
    with pytest.raises(InputError, match=re.escape("future_size= must be int or None, got 'big'")):
        api.run_options("smollm2-135m", ["fullkv"], future_size="big")
    everything = {f.name: getattr(Extended(), f.name) for f in dataclasses.fields(Extended)
                  if f.name not in ("model", "methods")}
    assert dataclasses.asdict(api.run_options("smollm2-135m", ["fullkv"], **everything)) == \
        dataclasses.asdict(Extended())


def test_named_keyword_defaults_are_the_run_defaults():
    defaults = runner.RunOptions()
    for name, parameter in inspect.signature(kvbench.evaluate).parameters.items():
        if parameter.kind is parameter.KEYWORD_ONLY and name not in ("log", "progress"):
            converted = getattr(api.run_options("x", "fullkv", **{name: parameter.default}), name)
            assert converted == getattr(defaults, name), name


# ---- a model loaded by the caller ---------------------------------------------------------------------------
def test_loaded_model_and_tokenizer_pair(tiny_data_dir):
    model, tokenizer = make_tiny_llama(), make_tiny_tokenizer()
    model.set_attn_implementation("sdpa")
    model.train()
    rows = evaluate((model, tokenizer), tiny_data_dir, methods=["fullkv", "snapkv"], ratios=[0.5], max_length=350,
                    results=None)
    assert len(rows) == 4 and {r["model"] for r in rows} == {"LlamaForCausalLM"}
    whole = {r["_id"]: r["prompt_tokens"] for r in evaluate((model, tokenizer), tiny_data_dir, results=None)}
    assert all(r["prompt_tokens"] < whole[r["_id"]] for r in rows)  # max_length= truncated them
    assert model.config._attn_implementation == "sdpa" and model.training  # the caller's settings are back
    again = evaluate((model, tokenizer), tiny_data_dir, max_length=350, results=None)
    assert again[0]["protocol_fp"] == rows[0]["protocol_fp"]
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0  # a model changed in memory is another model
    changed = evaluate((model, tokenizer), tiny_data_dir, max_length=350, results=None)
    assert changed[0]["protocol_fp"] != rows[0]["protocol_fp"]


def test_a_pair_that_is_not_a_model_is_refused():
    with pytest.raises(InputError, match="model= must be a transformers model"):
        kvbench.evaluate(("not a model", make_tiny_tokenizer()), "fullkv")


# ---- public names -----------------------------------------------------------------------------------------------
def test_public_names():
    assert set(kvbench.__all__) == {"__version__", "evaluate", "load_results", "table", "Method", "register_method",
                                    "Budget", "SelectContext", "Selection", "KvbenchError", "InputError"}
    for name in kvbench.__all__:
        assert getattr(kvbench, name) is not None
    from kvbench.methods.base import Method

    assert kvbench.Method is Method


def test_import_kvbench_stays_light():
    """The CLI imports kvbench for every command: the API's heavy modules load only when used."""
    out = subprocess.run([sys.executable, "-c", "import kvbench, sys; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
