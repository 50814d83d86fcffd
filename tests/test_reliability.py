"""Reliability and scale-out of `kvbench run`, through the real CLI with a tiny local model folder
(conftest.save_tiny_model_dir) and a few short multifieldqa_en samples (conftest.write_task_data):

- bad input: a table of cases, each one line on stderr, exit code 2, no traceback, nothing written;
- locking: a second writer refuses naming the holder, --wait waits, a killed holder's lock is free at once;
- sharding: --shard 0/2 + 1/2, and `torchrun --nproc-per-node 2` (slow), give the rows of a single run;
- crash safety (slow): SIGKILL at random moments, mid-write included, then a rerun gives exactly the rows
  and scores of an uninterrupted run;
- the regression gate: `kvbench compare` exit codes, formats, sample intersection and refusals.

In-process runs use one torch thread and subprocesses OMP_NUM_THREADS=1, so every run does the same float
arithmetic and predictions can be compared exactly."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RUN_TASK, run_kvbench, run_kvbench as cli, save_tiny_model_dir, write_task_data

from kvbench.results import store

ROW_FIELDS = ("_id", "task", "model", "method", "budget", "scope", "prediction", "score", "kept_tokens",
              "generated_tokens", "prompt_tokens", "protocol_fp", "task_fp", "config_fp")
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                  "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_args(model: Path | str, data: Path, results: Path, *extra: str, ratio: str | None = "0.5") -> list[str]:
    return ["run", "--model", str(model), "--method", "fullkv,snapkv", *(["--ratio", ratio] if ratio else []),
            "--tasks", RUN_TASK, "--data-dir", str(data), "--results", str(results), "--device", "cpu", *extra]


def run_main(args: list[str]) -> int:
    """`kvbench ARGS` in this process (conftest.run_kvbench): its exit code."""
    return run_kvbench(args)[0]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, **SUBPROCESS_ENV, **extra}


def kvbench_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvbench", *args]


def comparable(root: Path) -> list[tuple]:
    """Every merged row of a results tree, without run ids and timings, sorted."""
    return sorted(tuple(json.dumps(row.get(k), sort_keys=True) for k in ROW_FIELDS) for row in store.load_all_rows(root))


def result_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.jsonl") if "manifests" not in p.parts)


def assert_no_duplicates(root: Path, torn_ok: bool = False) -> None:
    for path in result_files(root):
        ids = [row["_id"] for row in store.read_rows(path)]
        assert len(ids) == len(set(ids)), f"duplicate rows in {path}"
        assert torn_ok or path.read_bytes().endswith(b"\n"), f"torn tail left in {path}"


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    """One uninterrupted single-process run (fullkv + snapkv at 50%, 8 samples = 16 rows), in this process."""
    results = tmp_path_factory.mktemp("reference")
    assert run_main(run_args(tiny_model_dir, tiny_data_dir, results)) == 0
    assert len(store.load_all_rows(results)) == 16
    return results


# ---------------------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> dict[str, Path]:
    """Inputs for the bad-input table, made once."""
    root = tmp_path_factory.mktemp("bad")
    paths = {"model": tiny_model_dir, "data": tiny_data_dir}
    paths["gpt2"] = save_tiny_model_dir(root / "gpt2-no-rope", rope=False)
    paths["notok"] = save_tiny_model_dir(root / "llama-no-tokenizer", tokenizer=False)
    paths["short"] = save_tiny_model_dir(root / "llama-128-positions", max_positions=128)
    (root / "no-config").mkdir()
    paths["noconfig"] = root / "no-config"
    remote = root / "remote-code"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({
        "model_type": "kvbench_custom", "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                     "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
    marker = root / "REMOTE_CODE_RAN"
    for name in ("configuration_x.py", "modeling_x.py"):
        (remote / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    paths["remote"], paths["marker"] = remote, marker

    lines = (tiny_data_dir / f"{RUN_TASK}.jsonl").read_text().splitlines()
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / f"{RUN_TASK}.jsonl").write_text("\n".join([lines[0], lines[1], lines[2][:40], *lines[3:]]) + "\n")
    paths["corrupt"] = corrupt
    missing = root / "missing-field"
    missing.mkdir()
    row = json.loads(lines[1])
    del row["answers"]
    (missing / f"{RUN_TASK}.jsonl").write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")
    paths["missing"] = missing
    (root / "empty-data").mkdir()
    paths["empty"] = root / "empty-data"
    paths["other_task"] = write_task_data(root / "other-task", task="hotpotqa", n=2)
    paths["file"] = root / "a-file"
    paths["file"].write_text("not a directory\n")

    config = root / "configs"
    config.mkdir()
    (config / "models.yaml").write_text("smollm2-135m:\n  max_length: 7500\n   chat: [template\n")
    (config / "methods.yaml").write_text(f"presets: !!python/object/apply:os.system ['touch {marker}']\n")
    paths["configs"] = config

    # Two result sets under different protocol fingerprints, and one tree holding both.
    rows_a = fake_rows({RUN_TASK: [1.0, 0.0]}, protocol="proto-a")
    rows_b = fake_rows({RUN_TASK: [1.0, 0.0]}, protocol="proto-b")
    paths["set_a"], paths["set_b"] = write_rows(root / "set-a", rows_a), write_rows(root / "set-b", rows_b)
    mixed = write_rows(root / "mixed", rows_a)
    write_rows(mixed, [{**r, "config_fp": "other"} for r in rows_b], name="other")
    paths["mixed"] = mixed
    return paths


def _with_configs(monkeypatch, bad, name: str) -> None:
    """Point kvbench at a configs/ folder whose `name` is broken (the package's own files stay untouched)."""
    from kvbench import resources

    original = resources.config_path
    monkeypatch.setattr(resources, "config_path", lambda n: bad["configs"] / n if n == name else original(n))


# (case id, argv builder, expected part of the message, extra set-up)
BAD_INPUT = [
    ("unknown-model", lambda p, r: run_args("smolm2-135m", p["data"], r), "did you mean 'smollm2-135m'", None),
    ("unknown-method", lambda p, r: run_args(p["model"], p["data"], r, "--method", "snapkvv"), "did you mean 'snapkv'", None),
    ("unknown-preset", lambda p, r: run_args(p["model"], p["data"], r, "--method", "snapkv_oficial"),
     "did you mean 'snapkv_official'", None),
    ("unknown-task", lambda p, r: run_args(p["model"], p["data"], r, "--tasks", "multifieldqa_eng"),
     "did you mean 'multifieldqa_en'", None),
    ("ratio-zero", lambda p, r: run_args(p["model"], p["data"], r, "--ratio", "0"), "--ratio must be in (0, 1]", None),
    ("ratio-negative", lambda p, r: run_args(p["model"], p["data"], r, "--ratio=-0.5"), "--ratio must be in (0, 1]", None),
    ("ratio-above-one", lambda p, r: run_args(p["model"], p["data"], r, "--ratio", "1.5"), "--ratio must be in (0, 1]", None),
    ("ratio-not-a-number", lambda p, r: run_args(p["model"], p["data"], r, "--ratio", "half"), "must be a number", None),
    ("ratio-bad-in-list", lambda p, r: run_args(p["model"], p["data"], r, "--ratio", "0.5,2"), "--ratio must be in (0, 1]", None),
    ("ratio-and-budget", lambda p, r: run_args(p["model"], p["data"], r, "--budget", "64"), "not both", None),
    # fullkv alone ignores budgets, and still a bad one is refused
    ("budget-zero", lambda p, r: run_args(p["model"], p["data"], r, "--method", "fullkv", "--budget", "0", ratio=None),
     "--budget must be a positive", None),
    ("budget-negative", lambda p, r: run_args(p["model"], p["data"], r, "--budget=-3", ratio=None),
     "--budget must be a positive", None),
    ("budget-not-a-number", lambda p, r: run_args(p["model"], p["data"], r, "--budget", "ten", ratio=None),
     "Invalid value for '--budget'", None),
    ("limit-negative", lambda p, r: run_args(p["model"], p["data"], r, "--limit=-1"), "--limit must be >= 0", None),
    ("method-arg-unknown", lambda p, r: run_args(p["model"], p["data"], r, "--method-arg", "windw_size=8"),
     "no selected method has a parameter 'windw_size'", None),
    ("method-arg-not-key-value", lambda p, r: run_args(p["model"], p["data"], r, "--method-arg", "window_size"),
     "key=value", None),
    ("method-arg-bad-value", lambda p, r: run_args(p["model"], p["data"], r, "--method-arg", "window_size=wide"),
     "expects int", None),
    ("corrupt-jsonl", lambda p, r: run_args(p["model"], p["corrupt"], r), f"{RUN_TASK}.jsonl:3: broken JSON line", None),
    ("missing-field", lambda p, r: run_args(p["model"], p["missing"], r), f"{RUN_TASK}.jsonl:2: missing field 'answers'", None),
    ("data-dir-missing", lambda p, r: run_args(p["model"], p["data"] / "nope", r), "data directory not found", None),
    ("data-dir-empty", lambda p, r: run_args(p["model"], p["empty"], r), "holds no .jsonl files", None),
    ("data-dir-without-task", lambda p, r: run_args(p["model"], p["other_task"], r), f"no data for task '{RUN_TASK}'", None),
    ("malformed-models-yaml", lambda p, r: run_args(p["model"], p["data"], r), "models.yaml:3: malformed YAML", "models.yaml"),
    ("yaml-python-tag-not-run", lambda p, r: run_args(p["model"], p["data"], r), "methods.yaml:1: malformed YAML", "methods.yaml"),
    ("results-is-a-file", lambda p, r: run_args(p["model"], p["data"], p["file"]), "exists and is not a directory", None),
    ("shard-out-of-range", lambda p, r: run_args(p["model"], p["data"], r, "--shard", "2/2"), "--shard must be i/n", None),
    ("shard-malformed", lambda p, r: run_args(p["model"], p["data"], r, "--shard", "first-half"), "--shard must be i/n", None),
    ("shard-zero-count", lambda p, r: run_args(p["model"], p["data"], r, "--shard", "0/0"), "--shard must be i/n", None),
    ("shard-under-torchrun", lambda p, r: run_args(p["model"], p["data"], r, "--shard", "0/2"), "cannot be combined", "torchrun"),
    ("model-without-rope", lambda p, r: run_args(p["gpt2"], p["data"], r), "has no rotary position embedding", None),
    ("model-without-tokenizer", lambda p, r: run_args(p["notok"], p["data"], r), "has no usable tokenizer", None),
    ("model-dir-without-config", lambda p, r: run_args(p["noconfig"], p["data"], r), "has no config.json", None),
    ("remote-code-without-flag", lambda p, r: run_args(p["remote"], p["data"], r), "pass --trust-remote-code", None),
    ("prompt-longer-than-model", lambda p, r: run_args(p["short"], p["data"], r),
     "exceeds the model's 128 positions and the model has no truncation length", None),
    ("max-length-zero", lambda p, r: run_args(p["model"], p["data"], r, "--max-length", "0"), "--max-length must be positive", None),
    ("scope-unknown", lambda p, r: run_args(p["model"], p["data"], r, "--scope", "middle"), "--scope must be one of", None),
    ("device-unknown", lambda p, r: run_args(p["model"], p["data"], r, "--device", "tpu"), "--device must be", None),
    ("dtype-unknown", lambda p, r: run_args(p["model"], p["data"], r, "--dtype", "int3"), "--dtype must be", None),
    ("unknown-option", lambda p, r: run_args(p["model"], p["data"], r, "--ratios", "0.5"), "No such option", None),
    ("table-mixed-fingerprints", lambda p, r: ["table", "--results", str(p["mixed"])], "2 protocol fingerprints", None),
    ("table-missing-dir", lambda p, r: ["table", "--results", str(r)], "results directory not found", None),
    ("compare-different-fingerprints", lambda p, r: ["compare", str(p["set_a"]), str(p["set_b"])],
     "different protocol fingerprints", None),
    ("compare-mixed-set", lambda p, r: ["compare", str(p["mixed"]), str(p["set_a"])], "2 protocol fingerprints", None),
    ("compare-missing-dir", lambda p, r: ["compare", str(p["set_a"]), str(r)], "results directory not found", None),
    ("compare-bad-format", lambda p, r: ["compare", str(p["set_a"]), str(p["set_a"]), "--format", "html"],
     "--format must be text or md", None),
    ("compare-negative-threshold", lambda p, r: ["compare", str(p["set_a"]), str(p["set_a"]), "--fail-below=-1"],
     "--fail-below must be", None),
]


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input(case, bad, tmp_path, capsys, monkeypatch):
    name, build, expected, setup = case
    if setup == "torchrun":
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
    elif setup:
        _with_configs(monkeypatch, bad, setup)
    results = tmp_path / "results"
    inputs = bad["file"].parent
    before = tree(inputs)
    code, out, err = cli(build(bad, results), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (name, code, err)
    assert len(lines) == 1 and lines[0].startswith("kvbench: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err + out
    assert out == ""
    assert not results.exists(), f"{name} created {results}"
    assert tree(inputs) == before, f"{name} wrote under {inputs}"
    assert not bad["marker"].exists(), "code from a config or a model folder ran"


REAL_ENTRY_CASES = {
    "unknown-model": (lambda p: "smolm2-135m", "unknown model 'smolm2-135m' (did you mean 'smollm2-135m'?)"),
    "model-without-rope": (lambda p: p["gpt2"], "model 'gpt2-no-rope' (gpt2) has no rotary position embedding"),
    "model-without-tokenizer": (lambda p: p["notok"], "model 'llama-no-tokenizer' has no usable tokenizer"),
    "prompt-longer-than-model": (lambda p: p["short"], "exceeds the model's 128 positions"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REAL_ENTRY_CASES))
def test_bad_input_through_the_real_entry_point(case, bad, tmp_path):
    """`python -m kvbench` in a fresh process (where transformers' own warnings would show): one line, exit 2,
    no traceback, nothing written."""
    model, expected = REAL_ENTRY_CASES[case]
    done = subprocess.run(kvbench_cmd(*run_args(model(bad), bad["data"], tmp_path / "r")), capture_output=True,
                          text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvbench: error: ") and expected in lines[0], done.stderr
    assert done.stdout == ""
    assert not (tmp_path / "r").exists()


def test_result_paths_cannot_escape_the_results_dir(tmp_path):
    for model, task, method in [("../../etc", "../x", "a/../../b"), ("/abs/path", "..", ".."), ("org/name", "t", "m\\n")]:
        path = store.result_path(tmp_path, model, task, method, "r0.1", "full", "abc", store.Shard())
        assert path.resolve().is_relative_to(tmp_path.resolve()), path
        assert len(path.relative_to(tmp_path).parts) == 3 and ".." not in path.parts


# ---------------------------------------------------------------------------------------------------------
# Locking


def test_file_lock_refuses_waits_and_dies_with_its_process(tmp_path):
    target = tmp_path / "r.jsonl"
    holder = store.FileLock(target)
    holder.acquire()
    with pytest.raises(store.LockedError, match=f"process {os.getpid()} on {socket.gethostname()}.*use wait= to wait"):
        store.FileLock(target).acquire()
    with pytest.raises(store.LockedError):
        store.FileLock(target).check()  # the early check creates nothing and refuses the same way
    holder.release()
    assert not holder.pid_path.exists()

    # A holder killed with SIGKILL: the OS dropped its lock; its holder line is left but not believed.
    killed = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from kvbench.results.store import FileLock; lock = FileLock(Path(sys.argv[1])); "
                               "lock.acquire(); print('held', flush=True); time.sleep(60)", str(target)],
                              stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline().strip() == "held"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert holder.pid_path.read_text() == f"{killed.pid} {socket.gethostname()}"
    store.FileLock(target).check()  # a dead holder is no reason to refuse
    taker = store.FileLock(target)
    taker.acquire()
    assert holder.pid_path.read_text() == f"{os.getpid()} {socket.gethostname()}"
    taker.release()


def _wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _holds_lock(root: Path, pid: int) -> bool:
    for path in root.rglob("*.lock.pid"):
        try:
            if path.read_text().startswith(f"{pid} "):
                return True
        except FileNotFoundError:
            pass
    return False


def test_two_writers(tiny_model_dir, tiny_data_dir, reference, tmp_path, capsys):
    """A writes slowly; B refuses naming A; B --wait waits for A and finds nothing left; what a killed holder
    leaves (its lock file and holder line) does not stop the next run, which redoes the missing row."""
    results = tmp_path / "results"
    args = run_args(tiny_model_dir, tiny_data_dir, results)
    writer = subprocess.Popen(kvbench_cmd(*args), env=subprocess_env(KVBENCH_TEST_SLOW_WRITE="0.2"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _holds_lock(results, writer.pid), 120, writer, "the writer's lock")
        code, _, err = cli(args, capsys)
        assert code == 2
        assert err.count("\n") == 1 and f"is being written by process {writer.pid} on {socket.gethostname()}" in err
        assert "--wait" in err
        assert writer.poll() is None
        code, _, err = cli([*args, "--wait"], capsys)
        assert code == 0 and writer.wait(timeout=60) == 0, err
        assert "nothing to run" in err
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait()
    assert comparable(results) == comparable(reference)
    assert_no_duplicates(results)
    assert not list(results.rglob("*.lock.pid"))

    # A dead process's holder line, and its last row lost: the row redone, nothing duplicated.
    path = next(p for p in result_files(results) if p.name.startswith("fullkv"))
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.with_name(path.name + ".lock.pid").write_text(f"{dead.pid} {socket.gethostname()}")
    code, _, err = cli(args, capsys)
    assert code == 0, err
    assert "1 of 8 samples pending" in err
    assert comparable(results) == comparable(reference)
    assert_no_duplicates(results)
    assert not list(results.rglob("*.lock.pid"))


# ---------------------------------------------------------------------------------------------------------
# Torn lines and resume (in-process, no kill)


def test_torn_tail_is_ignored_and_redone(tiny_model_dir, tiny_data_dir, reference, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(reference, results)
    path = next(p for p in result_files(results) if p.name.startswith("snapkv"))
    data = path.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: last + (len(data) - last) // 2])  # the last row cut in the middle
    assert len(store.read_rows(path)) == 7
    code, _, err = cli(run_args(tiny_model_dir, tiny_data_dir, results), capsys)
    assert code == 0 and "1 of 8 samples pending" in err and "1 rows written" in err, err
    assert comparable(results) == comparable(reference)
    assert_no_duplicates(results)


def test_a_complete_line_without_newline_is_not_a_row(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"_id": "a"}\n{"_id": "b"}')
    assert [r["_id"] for r in store.read_rows(path)] == ["a"]
    file = store.ResultFile(path)
    assert file.open() == {"a"}
    file.append({"_id": "b"})
    file.close()
    assert path.read_text() == '{"_id": "a"}\n{"_id": "b"}\n'


# ---------------------------------------------------------------------------------------------------------
# Sharding


def test_shards_merge_to_the_single_run(tiny_model_dir, tiny_data_dir, reference, tmp_path, capsys):
    results = tmp_path / "results"
    for index in (0, 1):
        code, _, err = cli(run_args(tiny_model_dir, tiny_data_dir, results, "--shard", f"{index}/2"), capsys)
        assert code == 0, err
        assert "4 of 4 samples pending" in err
    names = sorted(p.name for p in result_files(results))
    assert len(names) == 4 and sum(".shard-0-of-2." in n for n in names) == 2 and sum(".shard-1-of-2." in n for n in names) == 2
    assert comparable(results) == comparable(reference)
    tables = [cli(["table", "--results", str(root)], capsys) for root in (reference, results)]
    assert tables[0][0] == tables[1][0] == 0
    assert tables[0][1] == tables[1][1]


def _torchrun() -> list[str] | None:
    exe = Path(sys.executable).with_name("torchrun")
    if exe.is_file():
        return [str(exe)]
    if shutil.which("torchrun"):
        return ["torchrun"]
    return None


@pytest.mark.slow
def test_torchrun_two_processes_match_the_single_run(tiny_model_dir, tiny_data_dir, reference, tmp_path, capsys):
    launcher = _torchrun()
    if launcher is None:
        pytest.skip("torchrun is not installed")
    results = tmp_path / "results"
    cmd = [*launcher, "--standalone", "--nproc-per-node", "2", "-m", "kvbench",
           *run_args(tiny_model_dir, tiny_data_dir, results)]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in result_files(results))
    assert len(names) == 4 and all(".shard-" in n and "-of-2." in n for n in names), names
    assert comparable(results) == comparable(reference)
    manifests = [json.loads(p.read_text()) for p in results.rglob("manifests/*.json")]
    assert sorted(m["shard"] for m in manifests) == ["0/2", "1/2"]
    assert all(m["status"] == "complete" for m in manifests)
    tables = [cli(["table", "--results", str(root)], capsys)[1] for root in (reference, results)]
    assert tables[0] == tables[1]


# ---------------------------------------------------------------------------------------------------------
# Crash safety


def _torn(root: Path) -> bool:
    for path in result_files(root):
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            return True
    return False


def _complete_rows(root: Path) -> int:
    return sum(len(store.read_rows(p)) for p in result_files(root))


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_and_duplicates_nothing(tiny_model_dir, tiny_data_dir, reference, tmp_path, capsys):
    """Six SIGKILLs (while starting up, between rows, and three in the middle of a write), each followed by a
    rerun of the same command; the final rerun completes. Rows and scores equal the uninterrupted run."""
    results = tmp_path / "results"
    cmd = kvbench_cmd(*run_args(tiny_model_dir, tiny_data_dir, results))
    env = subprocess_env(KVBENCH_TEST_SLOW_WRITE="0.5")
    rng = random.Random(20261123)
    plan = ["startup", "mid-write", "between-rows", "mid-write", "between-rows", "mid-write"]
    kills = mid_write = 0
    for moment in plan:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            before = _complete_rows(results)
            if moment == "startup":
                time.sleep(rng.uniform(0.5, 3.0))
            elif moment == "mid-write":
                _wait_for(lambda: _complete_rows(results) > before and _torn(results), 120, proc, "a write in progress")
                time.sleep(rng.uniform(0.0, 0.1))  # the rest of the line comes 0.5 s after its first half
            else:
                want = before + rng.randint(1, 2)
                _wait_for(lambda: _complete_rows(results) >= want, 120, proc, f"{want} rows")
                time.sleep(rng.uniform(0.0, 0.3))
            assert proc.poll() is None, "the run finished before it could be killed"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        kills += 1
        mid_write += _torn(results)  # it died with half a line on disk
        assert_no_duplicates(results, torn_ok=True)
    assert kills >= 5 and mid_write >= 2
    assert _complete_rows(results) < 16, "the kills came too late to test anything"
    assert list(results.rglob("*.lock.pid")), "a killed run leaves its holder line behind"

    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert comparable(results) == comparable(reference)
    assert_no_duplicates(results)
    assert not list(results.rglob("*.lock.pid"))
    tables = [cli(["table", "--results", str(root)], capsys)[1] for root in (reference, results)]
    assert tables[0] == tables[1]
    assert cli(["compare", str(reference), str(results), "--exact", "--no-timings"], capsys)[0] == 0


# ---------------------------------------------------------------------------------------------------------
# kvbench compare


def fake_rows(task_scores: dict[str, list[float]], method: str = "snapkv", budget: str = "r0.1",
              protocol: str = "proto") -> list[dict]:
    return [{"_id": f"{task}-{i}", "task": task, "model": "m", "method": method, "budget": budget, "score": score,
             "length": 1000, "protocol_fp": protocol, "task_fp": f"t-{task}", "config_fp": f"c-{task}-{method}-{budget}"}
            for task, scores in task_scores.items() for i, score in enumerate(scores)]


def write_rows(root: Path, rows: list[dict], name: str = "rows") -> Path:
    for row in rows:
        path = root / row["model"] / row["task"] / f"{row['method']}__{row['budget']}__{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
    return root


SCORES = {"multifieldqa_en": [1.0, 0.5, 0.0, 1.0], "hotpotqa": [0.0, 1.0, 1.0, 1.0]}


def test_compare_identical_sets_pass(tmp_path, capsys):
    base = write_rows(tmp_path / "base", fake_rows(SCORES) + fake_rows(SCORES, "fullkv", "full"))
    code, out, err = cli(["compare", str(base), str(base), "--fail-below", "0.5"], capsys)
    assert code == 0 and err == ""
    assert "intersection of sample ids" in out
    assert "Gate (--fail-below 0.5 --max-slowdown 1.2 --max-memory 1.05): passed." in out
    table = out.split("== exact")[0]
    assert table.count("+0.00") == 6  # 2 tasks x 2 methods, and 2 averages
    code, out, _ = cli(["compare", str(base), str(base), "--format", "md"], capsys)
    assert code == 0
    assert out.splitlines()[0] == "| Method | KV | Task | Base | New | Delta | Samples |"
    assert "| SnapKV | 10% | MF-en | 62.50 | 62.50 | +0.00 | 4 |" in out
    assert "| FullKV | Full | 2 | 68.75 | 68.75 | +0.00 |" in out


def test_compare_orders_methods_as_tables_do(tmp_path, capsys):
    preset = [{**r, "method_base": "snapkv"} for r in fake_rows(SCORES, "snapkv_official")]
    rows = fake_rows(SCORES, "scissorhands") + preset + fake_rows(SCORES) + fake_rows(SCORES, "h2o")
    base = write_rows(tmp_path / "base", rows)
    code, out, _ = cli(["compare", str(base), str(base), "--format", "md"], capsys)
    assert code == 0
    methods = [line.split(" | ")[0].lstrip("| ") for line in out.splitlines() if "| MF-en |" in line]
    # Table 17's order, a preset right after its base method, then the rest by name (report._method_order)
    assert methods == ["H2O", "SnapKV", "SnapKV (official)", "Scissorhands"], methods


def test_compare_fails_on_the_interval_not_on_the_point_drop(tmp_path, capsys):
    """tests/test_gate.py checks the gate in detail; here the CLI's contract on the old fixtures."""
    base = write_rows(tmp_path / "base", fake_rows(SCORES))
    lowered = {**SCORES, "hotpotqa": [0.0, 1.0, 1.0, 0.8]}  # 75.00 -> 70.00: one answer, not significant
    new = write_rows(tmp_path / "new", fake_rows(lowered))
    code, out, err = cli(["compare", str(base), str(new), "--fail-below", "2"], capsys)
    assert code == 0 and err == "" and "-5.00" in out and "WARN  snapkv r0.1 hotpotqa: -5.00 points" in out
    wrong = write_rows(tmp_path / "wrong", fake_rows({**SCORES, "hotpotqa": [0.0] * 4}))  # 75.00 -> 0.00
    code, out, err = cli(["compare", str(base), str(wrong), "--fail-below", "2"], capsys)
    assert code == 1
    assert err.startswith("kvbench: compare: scores snapkv r0.1 hotpotqa: -75.00 points, 95% CI [")
    assert cli(["compare", str(wrong), str(base), "--fail-below", "0"], capsys)[0] == 0  # a rise passes


def test_compare_uses_the_sample_intersection_and_flags_missing_cells(tmp_path, capsys):
    base = write_rows(tmp_path / "base", fake_rows(SCORES))
    # NEW lacks hotpotqa entirely and the last multifieldqa_en sample (scored 1.0 in BASE).
    new = write_rows(tmp_path / "new", fake_rows({"multifieldqa_en": SCORES["multifieldqa_en"][:3]}))
    code, out, err = cli(["compare", str(base), str(new), "--fail-below", "1"], capsys)
    assert code == 1
    assert "MF-en  50.00  50.00  +0.00  3 (of 4/3)" in out  # compared on the 3 common samples only
    assert "Only in BASE: snapkv r0.1 hotpotqa." in out
    assert "hotpotqa: in BASE but missing from NEW" in err


def test_compare_refuses_a_changed_configuration(tmp_path, capsys):
    base = write_rows(tmp_path / "base", fake_rows(SCORES))
    new = write_rows(tmp_path / "new", [{**r, "config_fp": "changed"} if r["task"] == "hotpotqa" else r
                                         for r in fake_rows(SCORES)])
    code, out, err = cli(["compare", str(base), str(new)], capsys)
    assert code == 2 and out == ""
    assert err.strip() == ("kvbench: error: snapkv at r0.1 on hotpotqa: configuration fingerprints differ between "
                           "BASE and NEW (hyper-parameters, scope, prompt or data changed); refusing to compare")


def test_compare_real_runs(reference, tmp_path, capsys):
    """A real result set against itself passes; with one task's scores lowered in NEW it fails."""
    code, out, _ = cli(["compare", str(reference), str(reference), "--fail-below", "0", "--exact"], capsys)
    assert code == 0 and out.split("== exact")[0].count("+0.00") == 4  # fullkv and snapkv, a task line and average
    base = tmp_path / "base"
    shutil.copytree(reference, base)
    for path in result_files(base):
        rows = store.read_rows(path)
        path.write_text("".join(json.dumps({**r, "score": 1.0}) + "\n" for r in rows))
    code, _, err = cli(["compare", str(base), str(reference), "--fail-below", "10"], capsys)
    assert code == 1 and "a significant drop of more than 10 points" in err
