"""Paper recipes (kvbench.studies.recipes): the recipe files, their expansion into run options, the published
numbers against the shared transcription of ChunkKV's Table 17, the side-by-side table, and `kvbench run
--recipe` / `kvbench table --recipe` end to end on a tiny random model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvbench import methods, runner, scoring
from kvbench.data import load_task_specs
from kvbench.errors import InputError
from kvbench.models import load_aliases
from kvbench.results import store
from kvbench.studies import recipes
from kvbench.studies.recipes import Overrides

from conftest import SHARED_LONGBENCH, write_task_data
from test_reliability import cli, run_main

TABLE17_DOC = SHARED_LONGBENCH.parent / "docs" / "papers" / "chunkkv-table17.md"
TABLE17_TASKS = ["multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"]


# ---- the recipe files ------------------------------------------------------------------------------------------
def test_recipes_load_and_every_published_number_has_a_source():
    names = recipes.names()
    assert {"chunkkv-table17", "kvcache-factory-gqa128", "kvcache-factory-gqa128-kvhead"} <= set(names)
    aliases, specs = load_aliases(), load_task_specs()
    for name in names:
        recipe = recipes.load(name)
        assert recipe.model in aliases and all(t in specs for t in recipe.tasks)
        assert recipe.assumptions and all(a.why.strip() for a in recipe.assumptions)
        for row in recipe.rows:
            methods.build(row.method)  # every row names a method or preset kvbench has
            assert set(row.scores) == set(recipe.tasks)
            assert row.source.strip(), (name, row.paper)


def test_table17_expands_to_exactly_its_rows_with_the_documented_variants():
    recipe = recipes.load("chunkkv-table17")
    assert [(r.paper, r.method) for r in recipe.rows] == [
        ("FullKV", "fullkv"), ("StreamingLLM", "streamingllm_prefill"), ("H2O", "h2o_factory_2024"),
        ("SnapKV", "snapkv"), ("PyramidKV", "pyramidkv"), ("ChunkKV", "chunkkv_paper"),
    ]
    plan = recipe.expand(Overrides())
    assert (plan.model, plan.tasks, plan.ratios, plan.budget) == ("qwen2-7b", ",".join(TABLE17_TASKS), [0.1], None)
    assert (plan.scope, plan.max_length, plan.data, plan.limit, plan.data_dir) == ("full", 31500, "hub", None, None)
    assert plan.granularity == "query_head" and plan.stamp == {"name": "chunkkv-table17", "granularity": "query_head",
                                                                     "overrides": {}}
    opts = runner.recipe_options("chunkkv-table17", Overrides(), runner.RunOptions())
    assert opts.granularity == "query_head"
    plans = runner.build_plans(opts)
    # KVCache-Factory's query-head selection where a method's query heads can differ; positional StreamingLLM
    # and ChunkKV's layer-shared chunks keep one set per KV head (the same output), FullKV compresses nothing
    assert [(p.label, p.budget.label, p.granularity) for p in plans] == [
        ("fullkv", "full", "kv_head"), ("streamingllm_prefill", "r0.1", "kv_head"),
        ("h2o_factory_2024", "r0.1", "query_head"), ("snapkv", "r0.1", "query_head"),
        ("pyramidkv", "r0.1", "query_head"), ("chunkkv_paper", "r0.1", "kv_head"),
    ]
    by = {p.label: p.method for p in plans}
    assert (by["streamingllm_prefill"].mode, by["streamingllm_prefill"].position_mode) == ("prefill", "original")
    assert (by["h2o_factory_2024"].causal, by["h2o_factory_2024"].window_size) == (False, 8)
    assert (by["snapkv"].window_size, by["snapkv"].kernel_size, by["snapkv"].pooling) == (8, 7, "max")
    assert by["pyramidkv"].beta == 20
    ck = by["chunkkv_paper"]
    assert (ck.pooling, ck.chunk_size, ck.chunk_agg, ck.window_size, ck.reuse_layers) == ("none", 10, "sum", 8, 1)
    assert all(p.method.gqa_reduce == "mean" for p in plans)  # KVCache-Factory's kv_head default


def test_table17_printed_averages_need_no_shared_copy():
    """Each printed Avg is the mean of its row's five scores to rounding, except PyramidKV's (the H2O row's
    36.55; its scores average 36.656): the one row the side-by-side table must flag."""
    recipe = recipes.load("chunkkv-table17")
    flagged = [r.paper for r in recipe.rows if r.avg_mismatch]
    assert flagged == ["PyramidKV"]
    pyramid = next(r for r in recipe.rows if r.paper == "PyramidKV")
    assert round(sum(pyramid.scores.values()) / 5, 3) == 36.656
    assert pyramid.avg == next(r.avg for r in recipe.rows if r.paper == "H2O")


def test_table17_numbers_equal_the_shared_transcription():
    if not TABLE17_DOC.is_file():
        pytest.skip(f"{TABLE17_DOC} not found (no ../shared)")
    short = {spec.short: name for name, spec in load_task_specs().items()}
    lines = [line for line in TABLE17_DOC.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    columns = [short.get(h, h) for h in header[1:]]
    assert columns[:-1] == TABLE17_TASKS and columns[-1] == "Avg"
    doc = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        label = re.sub(r" \(10%\)$", "", cells[0])
        if label == "Avg len (tokens)":
            continue
        doc[label] = dict(zip(columns, (float(c) for c in cells[1:])))
    recipe = recipes.load("chunkkv-table17")
    assert [r.paper for r in recipe.rows] == list(doc)
    for row in recipe.rows:
        assert {**row.scores, "Avg": row.avg} == doc[row.paper], row.paper


# ---- overrides ---------------------------------------------------------------------------------------------
def test_overrides_are_applied_and_recorded():
    recipe = recipes.load("chunkkv-table17")
    plan = recipe.expand(Overrides(model="qwen2.5-coder-0.5b", tasks="lsht,dureader", limit=1, data_dir=Path("d")))
    assert (plan.model, plan.tasks, plan.limit, plan.data_dir) == ("qwen2.5-coder-0.5b", "lsht,dureader", 1, Path("d"))
    assert plan.max_length is None  # an overriding model keeps its own truncation rule
    assert plan.stamp["overrides"] == {"model": "qwen2.5-coder-0.5b", "tasks": ["lsht", "dureader"], "limit": 1,
                                       "data_dir": "d"}
    same = recipe.expand(Overrides(model="Qwen2-7B", tasks=",".join(TABLE17_TASKS)))
    assert same.stamp["overrides"] == {} and same.max_length == 31500  # naming the recipe's own is no override
    with pytest.raises(InputError, match="--tasks must name tasks of recipe chunkkv-table17"):
        recipe.expand(Overrides(tasks="multifieldqa_en"))
    with pytest.raises(InputError, match="unknown recipe 'chunkkv-table71'.*did you mean 'chunkkv-table17'"):
        recipes.load("chunkkv-table71")


@pytest.mark.parametrize("bad,message", [
    ({"ratio": 0.1, "budget": 128}, "exactly one of 'ratio' and 'budget'"),
    ({"granularity": "layer"}, "granularity must be one of"),
    ({"rows": [{"paper": "X", "method": "snapkv", "scores": {"lsht": 1.0}}]}, "a 'source' line are required"),
    ({"rows": [{"paper": "X", "method": "snapkv", "scores": {"lsht": 1.0, "vcsum": 2.0}, "source": "s"}]},
     "scores must cover exactly"),
    ({"extra": 1}, "unknown keys"),
])
def test_malformed_recipes_are_refused_with_the_field(bad, message):
    good = {"paper": "p", "table": "t", "model": "qwen2-7b", "tasks": ["lsht"], "ratio": 0.1, "scope": "full",
            "granularity": "kv_head", "rows": [{"paper": "X", "method": "snapkv", "scores": {"lsht": 1.0},
                                                 "source": "s"}]}
    data = {**good, **bad}
    with pytest.raises(InputError, match=message):
        recipes.parse("x", data, "x.yaml")


# ---- side by side --------------------------------------------------------------------------------------------
# the granularity each Table 17 row runs at (test_table17_expands_to_exactly_its_rows_with_the_documented_variants)
TABLE17_GRANULARITY = {"fullkv": "kv_head", "streamingllm_prefill": "kv_head", "h2o_factory_2024": "query_head",
                       "snapkv": "query_head", "pyramidkv": "query_head", "chunkkv_paper": "kv_head"}


def fake_rows(model: str, per_method: dict[str, list[float]], recipe_stamp: dict | None = None,
              granularity: str | None = None) -> list[dict]:
    """Stored-row look-alikes: for each method, one row per task and sample score (two samples per task), at
    the granularity Table 17 runs it at unless `granularity` says otherwise."""
    rows = []
    for method, values in per_method.items():
        budget = "full" if method == "fullkv" else "r0.1"
        grain = granularity or TABLE17_GRANULARITY.get(method, "kv_head")
        for task in TABLE17_TASKS:
            for i, value in enumerate(values):
                row = {"_id": f"{task}-{i}", "task": task, "model": model, "method": method, "method_base": method,
                       "budget": budget, "score": value, "length": 100 + i, "protocol_fp": "p0", "scope": "full",
                       "granularity": grain, "task_fp": f"t-{task}", "config_fp": f"c-{method}-{task}-{grain}"}
                if recipe_stamp is not None:
                    row["recipe"] = recipe_stamp
                rows.append(row)
    return rows


def test_side_by_side_cells_averages_and_the_flagged_row():
    recipe = recipes.load("chunkkv-table17")
    stamp = recipe.expand(Overrides(model="tiny", limit=2)).stamp
    rows = fake_rows("tiny", {"fullkv": [0.5, 1.0], "snapkv": [0.25, 0.5], "pyramidkv": [0.0, 0.2],
                              "chunkkv_paper": [0.0, 0.0]}, stamp)
    rows += fake_rows("tiny", {"chunkkv": [1.0, 1.0]})  # not a method of the recipe: left out
    rows += fake_rows("tiny", {"snapkv": [1.0, 1.0]}, granularity="kv_head")  # not the recipe's granularity: left out
    result = recipes.side_by_side(recipe, rows)
    assert result.model == "tiny"
    full, slm, pyramid = result.comparisons[0], result.comparisons[1], result.comparisons[4]
    assert full.ours["multifieldqa_zh"] == scoring.task_score([0.5, 1.0]) == 75.0
    assert full.ours["Avg"] == 75.0 and full.n == {t: 2 for t in TABLE17_TASKS}
    assert slm.ours == {**{t: None for t in TABLE17_TASKS}, "Avg": None}  # not run: dashes
    header, body = recipes.grid(result)
    assert header == ["Method", "kvbench", "MF-zh", "DuReader", "VCSum", "LSHT", "PR-zh", "Avg"]
    assert body[0][2] == f"39.17 / 75.00 / {75.0 - 39.17:+.2f}" and body[0][-1] == f"38.60 / 75.00 / {75 - 38.60:+.2f}"
    assert body[1][2] == "38.05 / - / -"
    assert body[4][-1] == f"36.55* / 10.00 / {10.0 - 36.55:+.2f}" and pyramid.ours["Avg"] == 10.0
    text = recipes.render(result, "md")
    assert "* PyramidKV: the paper prints Avg 36.55 but its task scores average 36.66 (36.55 is the H2O row" in text
    assert "Overridden from the recipe: limit=2, model=tiny." in text
    assert "the recipe's model is qwen2-7b" in text
    # what the rows ran at: chunkkv_paper's stamped rows are kv_head; streamingllm_prefill has none to speak of
    assert "Granularity: query_head; chunkkv_paper keeps one set per KV head" in text
    latex = recipes.render(result, "latex")
    assert latex.count(r" \\") == 7 and r"\begin{tabular}{llrrrrrr}" in latex  # header + the paper's six rows
    lines = recipes.render(result, "csv").splitlines()
    assert len(lines) == 1 + 6 * 6 and lines[1].startswith("chunkkv-table17,FullKV,fullkv,tiny,multifieldqa_zh,39.17,75.00,+35.83,2,")


def test_unstamped_rows_are_matched_by_the_granularity_their_method_runs_at():
    """Rows of runs without --recipe do not say which granularity the recipe would give their method; the method
    does: at query_head, StreamingLLM's kv_head rows are the recipe's (positional: the same output), SnapKV's are not."""
    recipe = recipes.load("chunkkv-table17")
    rows = fake_rows("tiny", {"fullkv": [1.0, 1.0], "streamingllm_prefill": [0.5, 0.5]}, granularity="kv_head")
    rows += fake_rows("tiny", {"snapkv": [0.25, 0.25]}, granularity="kv_head")
    result = recipes.side_by_side(recipe, rows)
    by_method = {c.row.method: c.ours["Avg"] for c in result.comparisons}
    assert by_method["streamingllm_prefill"] == 50.0 and by_method["snapkv"] is None
    assert "Granularity: query_head; streamingllm_prefill keeps one set per KV head" in recipes.render(result, "md")


@pytest.mark.parametrize("stamp", [{"name": "chunkkv-table17", "deviations": ["granularity: kv_head"], "overrides": {}},
                                   {"name": "chunkkv-table17", "granularity": "kv_head", "overrides": {}}],
                         ids=["first-stamps", "another-granularity"])
def test_stamps_of_the_recipe_as_it_was_do_not_set_the_granularity(stamp):
    """The first `run --recipe` ran every row at kv_head (its stamps carry `deviations`), and a stamp naming
    another granularity than the recipe's today is from an edited recipe: SnapKV's kv_head rows under either
    are not the query_head recipe's, whatever the stamp says; StreamingLLM's are (its method runs at kv_head)."""
    recipe = recipes.load("chunkkv-table17")
    rows = fake_rows("tiny", {"fullkv": [1.0, 1.0], "snapkv": [0.5, 0.5], "streamingllm_prefill": [0.25, 0.25]},
                     stamp, granularity="kv_head")
    result = recipes.side_by_side(recipe, rows)
    by_method = {c.row.method: c.ours["Avg"] for c in result.comparisons}
    assert by_method["snapkv"] is None and by_method["streamingllm_prefill"] == 25.0
    assert "Granularity: query_head; streamingllm_prefill keeps one set per KV head" in recipes.render(result, "md")


def test_side_by_side_needs_rows_and_one_model():
    recipe = recipes.load("chunkkv-table17")
    with pytest.raises(InputError, match="run `kvbench run --recipe chunkkv-table17`"):
        recipes.side_by_side(recipe, [])
    rows = fake_rows("a", {"fullkv": [1.0]}) + fake_rows("b", {"fullkv": [1.0]})
    with pytest.raises(InputError, match="several models"):
        recipes.side_by_side(recipe, rows)
    assert recipes.side_by_side(recipe, rows, model="b").model == "b"


# ---- the command line, end to end on a tiny random model -------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--method", "snapkv"], "--method cannot be combined with --recipe"),
    (["--ratio", "0.2"], "--ratio cannot be combined with --recipe"),
    (["--scope", "context"], "--scope cannot be combined with --recipe"),
    (["--granularity", "kv_head"], "--granularity cannot be combined with --recipe"),
    (["--tasks", "multi_news"], "--tasks must name tasks of recipe"),
])
def test_run_recipe_refuses_what_it_fixes(tmp_path, capsys, args, message):
    code, out, err = cli(["run", "--recipe", "chunkkv-table17", *args, "--results", str(tmp_path / "r")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_recipes_command_lists_and_shows_sources(capsys):
    code, out, _ = cli(["recipes"], capsys)
    assert code == 0 and "chunkkv-table17: Table 17" in out and "kvcache-factory-gqa128-kvhead:" in out
    code, out, _ = cli(["recipes", "chunkkv-table17"], capsys)
    assert code == 0 and out.count("source: arXiv 2502.00299 appendix Table 17") == 6 and "truncation:" in out


def test_methods_command_shows_the_recipe_presets_sources(capsys):
    code, out, _ = cli(["methods"], capsys)
    assert code == 0
    table = methods.presets()
    for name in ("streamingllm_prefill", "h2o_factory_2024", "chunkkv_paper", "scissorhands_authors"):
        block = out[out.index(f"\n{name} "):]
        assert block.splitlines()[2].strip() == f"source: {table[name].source}", name
        assert "source=" not in block.splitlines()[1]  # a source line, not a hyper-parameter


def test_run_then_table_with_the_recipe(tmp_path, capsys, tiny_model_dir):
    data = write_task_data(tmp_path / "data", task="multifieldqa_zh", n=3)
    results = tmp_path / "results"
    args = ["run", "--recipe", "chunkkv-table17", "--model", str(tiny_model_dir), "--tasks", "multifieldqa_zh",
            "--limit", "2", "--data-dir", str(data), "--results", str(results), "--device", "cpu"]
    assert run_main(args) == 0
    rows = store.load_all_rows(results)
    assert sorted({r["method"] for r in rows}) == sorted(recipes.load("chunkkv-table17").methods)
    assert len(rows) == 6 * 2
    assert {(r["method"], r["granularity"]) for r in rows} == set(TABLE17_GRANULARITY.items())
    assert rows[0]["recipe"]["overrides"] == {"model": str(tiny_model_dir), "tasks": ["multifieldqa_zh"], "limit": 2,
                                              "data_dir": str(data)}
    # The stamp is no part of the fingerprints: the same configuration without --recipe finds every row done.
    plain = ["run", "--model", str(tiny_model_dir), "--method", "fullkv,snapkv,chunkkv_paper", "--ratio", "0.1",
             "--granularity", "query_head",
             "--tasks", "multifieldqa_zh", "--limit", "2", "--data-dir", str(data), "--results", str(results),
             "--device", "cpu"]
    code, _, err = cli(plain, capsys)
    assert code == 0 and "nothing to run" in err and len(store.load_all_rows(results)) == 12
    code, out, err = cli(["table", "--recipe", "chunkkv-table17", "--results", str(results), "--format", "latex"],
                         capsys)
    assert code == 0, err
    for label in ("FullKV", "StreamingLLM", "H2O", "SnapKV", "PyramidKV", "ChunkKV"):
        assert f"\n{label} & " in out
    assert "39.17 / " in out and "45.92 / " in out
    code, _, err = cli(["table", "--recipe", "chunkkv-table17", "--results", str(results), "--format", "pdf"], capsys)
    assert code == 2 and "--format must be md, latex or csv" in err
