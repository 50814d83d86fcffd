"""Methods from outside kvbench (docs/plugins.md): the documented example by `module:Class` from the CLI and as
an instance from Python, through an entry point and the decorator; `--presets` files, checked like kvbench's
own; a method's code in its fingerprint, and the built-in methods' fingerprints as they were before."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RUN_TASK, run_kvbench

import kvbench
from kvbench import methods, runner
from kvbench.engine import Plan
from kvbench.errors import InputError
from kvbench.methods.base import Budget
from kvbench.methods.plugins import source_version
from kvbench.results.store import digest, load_all_rows

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PRESETS = ROOT / "configs" / "presets.example.yaml"


def doc_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "plugins.md").read_text(), re.S)
    return next(block for block in blocks if "class StridedKV" in block)


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """docs/plugins.md's example saved as mypress.py in a folder on sys.path (as PYTHONPATH=. would put it)."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "mypress.py").write_text(doc_example())
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("mypress", None)


def run_args(model: Path, data: Path, results: Path, method: str, *extra: str) -> list[str]:
    return ["run", "--model", str(model), "--method", method, "--ratio", "0.3", "--tasks", RUN_TASK, "--data-dir",
            str(data), "--limit", "2", "--results", str(results), "--device", "cpu", *extra]


def expected_kept(row: dict) -> int:
    return Budget(ratio=0.3).kept(row["prefilled_tokens"])


def test_doc_example_by_module_reference_from_the_cli(plugin_dir, tiny_model_dir, tiny_data_dir, tmp_path,
                                                      monkeypatch, capsys):
    results = tmp_path / "results"
    code, _, err = run_kvbench(run_args(tiny_model_dir, tiny_data_dir, results, "fullkv,mypress:StridedKV"), capsys)
    assert code == 0, err
    rows = load_all_rows(results)
    assert sorted({r["method"] for r in rows}) == ["fullkv", "mypress:StridedKV"]
    strided = [r for r in rows if r["method"] == "mypress:StridedKV"]
    assert len(strided) == 2
    for row in strided:
        assert row["method_base"] == "mypress:StridedKV"
        assert row["params"]["recent"] == 16
        assert row["kept_tokens"] == [expected_kept(row)] * len(row["kept_tokens"])  # select honoured the budget


def test_method_arg_sets_a_plugin_field(plugin_dir, tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    code, _, err = run_kvbench(run_args(tiny_model_dir, tiny_data_dir, results, "mypress:StridedKV", "--method-arg",
                                        "recent=4"), capsys)
    assert code == 0, err
    assert {r["params"]["recent"] for r in load_all_rows(results)} == {4}


def test_doc_example_as_instances_from_python(plugin_dir, tiny_model_dir, tiny_data_dir):
    from mypress import StridedKV

    rows = kvbench.evaluate(str(tiny_model_dir), ["fullkv", StridedKV(), StridedKV(recent=4)], ratios=[0.3],
                            tasks=RUN_TASK, data_dir=tiny_data_dir, limit=1, device="cpu", results=None, log=None)
    labels = [r["method"] for r in rows]
    assert labels[:2] == ["fullkv", "mypress:StridedKV"]
    assert re.fullmatch(r"mypress:StridedKV-[0-9a-f]{6}", labels[2])  # a configured instance gets its own label
    assert [r["params"]["recent"] for r in rows[1:]] == [16, 4]
    assert all(r["kept_tokens"][0] == expected_kept(r) for r in rows[1:])


def write_dist(site: Path, name: str, entry_points: str) -> None:
    """What `pip install` leaves for a package declaring entry points: a dist-info folder on sys.path."""
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


def test_entry_point_of_an_installed_package(plugin_dir, tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch,
                                             capsys):
    site = tmp_path / "site"
    write_dist(site, "strided_plugin", "[kvbench.methods]\nstrided = mypress:StridedKV\n")
    monkeypatch.syspath_prepend(str(site))
    results = tmp_path / "results"
    code, _, err = run_kvbench(run_args(tiny_model_dir, tiny_data_dir, results, "strided"), capsys)
    assert code == 0, err
    rows = load_all_rows(results)
    assert {r["method"] for r in rows} == {"strided"} and len(rows) == 2
    code, out, _ = run_kvbench(["methods"], capsys)
    assert code == 0 and re.search(r"^strided\s+plugin mypress:StridedKV \(entry point of strided_plugin\)", out, re.M)


def test_broken_entry_point_is_one_line(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    write_dist(site, "broken_plugin", "[kvbench.methods]\nbroken = no_such_module_xyz:Thing\n")
    monkeypatch.syspath_prepend(str(site))
    code, _, err = run_kvbench(["run", "--method", "broken", "--results", str(tmp_path / "r")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "entry point 'broken' (no_such_module_xyz:Thing) of broken_plugin: cannot load it" in err


@pytest.mark.parametrize("reference, message", [
    ("no_such_module_xyz:Press", "cannot import no_such_module_xyz"),
    ("mypress:Nope", "mypress has no 'Nope'"),
    ("mypress:torch", "is not a subclass of kvbench.Method"),
    ("mypress:", "package.module:Class"),
])
def test_bad_references_name_the_problem(plugin_dir, reference, message):
    with pytest.raises(InputError, match=re.escape(message)):
        methods.build(reference)


# ---- the decorator, and subclasses that only override select -----------------------------------------------
@dataclasses.dataclass
class KeepLast(kvbench.Method):
    """Keeps the most recent `kept` tokens: uses only today's SelectContext fields."""

    def select(self, ctx):
        return torch.arange(ctx.n_tokens - ctx.kept, ctx.n_tokens, device=ctx.keys.device).expand(ctx.n_kv_heads, -1)


class KeepFirst(kvbench.Method):  # no @dataclass at all: inherits Method's fields, overrides select only
    def select(self, ctx):
        return torch.arange(ctx.kept, device=ctx.keys.device).expand(ctx.n_kv_heads, -1)


@pytest.fixture
def registered():
    yield
    for name in ("keep_last", "keep_last_alias"):
        if name in methods.METHODS:
            methods.METHODS.unregister(name)


def test_register_method_decorator(registered, tiny_model_dir, tiny_data_dir):
    kvbench.register_method("keep_last")(KeepLast)
    assert kvbench.register_method("keep_last")(KeepLast) is KeepLast  # again (a re-run cell): replaces itself
    with pytest.raises(ValueError, match="already registered"):
        kvbench.register_method("keep_last")(type("Other", (KeepLast,), {}))
    rows = kvbench.evaluate(str(tiny_model_dir), ["keep_last", KeepFirst()], ratios=0.3, tasks=[RUN_TASK],
                            data_dir=tiny_data_dir, limit=1, device="cpu", results=None, log=None)
    assert [r["method"] for r in rows] == ["keep_last", f"{__name__}:KeepFirst"]
    assert all(r["kept_tokens"][0] == expected_kept(r) for r in rows)


def test_a_field_outside_the_dataclass_is_refused():
    class Loose(kvbench.Method):
        window: int = 8  # annotated, but Loose is no dataclass: --method-arg and the fingerprint would miss it

        def select(self, ctx):
            return torch.arange(ctx.kept).expand(ctx.n_kv_heads, -1)

    with pytest.raises(InputError, match="declares window but is not a @dataclass"):
        methods.build(Loose())


# ---- code versions in fingerprints -------------------------------------------------------------------------
def config_fp(method) -> str:
    return digest(runner.config_fields(Plan("x", method, Budget(ratio=0.1)), "full"))


def test_changed_plugin_source_changes_the_fingerprint(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    source = doc_example()
    (tmp_path / "versioned_press.py").write_text(source)
    try:
        module = importlib.import_module("versioned_press")
        first = runner.config_fields(Plan("x", module.StridedKV(), Budget(ratio=0.1)), "full")
        assert re.fullmatch(r"src:[0-9a-f]{12}", first["code"]) and "version" not in first
        (tmp_path / "versioned_press.py").write_text(source.replace("recent = min(", "recent = min(  "))
        module = importlib.reload(module)
        second = runner.config_fields(Plan("x", module.StridedKV(), Budget(ratio=0.1)), "full")
        assert second["code"] != first["code"] and digest(second) != digest(first)
        (tmp_path / "versioned_press.py").write_text(source.replace("version = 1", "version = 2"))
        module = importlib.reload(module)
        assert runner.config_fields(Plan("x", module.StridedKV(), Budget(ratio=0.1)), "full")["version"] == 2
    finally:
        sys.modules.pop("versioned_press", None)


def test_a_subclass_of_a_builtin_carries_its_own_source_hash():
    from kvbench.methods.snapkv import SnapKV

    sub = dataclasses.dataclass(type("MySnap", (SnapKV,), {"__module__": __name__}))
    assert source_version(SnapKV) == ""
    assert re.fullmatch(r"src:[0-9a-f]{12}", source_version(sub))
    assert config_fp(sub()) != config_fp(SnapKV())


# Config fingerprints (digest of runner.config_fields at --ratio 0.1, --scope full) of the built-in methods
# and presets, computed with the code of main at 5a4a5a7, before plugins existed (the slow test below
# recomputes them from that commit). Stored rows carry these; plugin support must not change them. (H2O and
# H2O-prefill are at version 2 there, 4 now: VERSION_MOVED; every other method's digest is also that of df4291b,
# before versions.)
MAIN_COMMIT = "5a4a5a7"
BUILTIN_CONFIG_FP = {
    "chunkkv": "f849ab4aded0", "chunkkv_kvpress": "0ad7dfb8b0a5", "chunkkv_reuse": "02ad77f6d119",
    "fullkv": "557ff028aa8a", "h2o": "9a1f623b329a", "h2o_prefill": "33ea7dcb0b80", "knorm": "954d707faa5a",
    "knorm_factory": "e3d5ffe67b2a", "pyramidkv": "a13b012ae0ca", "random": "18e13f134fc6",
    "scissorhands": "ec76be0bc3d6", "sink_recent": "21170eee1230", "sliding": "91ec51c1c463",
    "snapkv": "377e953c3763", "snapkv_kvpress": "cd34a3b63d02", "snapkv_official": "5d7fa94b04a9",
    "streamingllm": "5462f37e4396", "streamingllm_prefill": "b736ec0c8c0f", "tova": "9fd8a8918201",
}
# The same names at every budget kind and scope: digest of {name/budget/scope: config fp}.
BUILTIN_CONFIG_FP_ALL = "5c79af3be13d"
# Methods whose code version moved since MAIN_COMMIT, on purpose, with their digest now: H2O and H2O-prefill at
# version 4 (causal column sums in cache-sized tiles, in base 2; float32 rounding). Every other digest must hold.
VERSION_MOVED = {"h2o": "1ace472bd505", "h2o_prefill": "16df476fa48f"}

DIGESTS_SCRIPT = """
import json, sys
from kvbench import methods, runner
from kvbench.engine import Plan
from kvbench.methods.base import Budget
from kvbench.results.store import digest
out = {}
for name in json.loads(sys.argv[1]):
    method = methods.build(name).method
    for budget in (Budget(ratio=0.1), Budget(tokens=64), Budget(ratio=1.0)):
        for scope in ("full", "context"):
            out[f"{name}/{budget.label}/{scope}"] = digest(runner.config_fields(Plan(name, method, budget), scope))
print(json.dumps(out))
"""


def config_fps_now() -> dict[str, str]:
    return json.loads(subprocess.run([sys.executable, "-c", DIGESTS_SCRIPT, json.dumps(sorted(BUILTIN_CONFIG_FP))],
                                     capture_output=True, text=True, check=True, cwd=ROOT).stdout)


def test_builtin_config_fingerprints_did_not_change():
    now = {name: config_fp(methods.build(name).method) for name in BUILTIN_CONFIG_FP}
    assert now == {**BUILTIN_CONFIG_FP, **VERSION_MOVED}
    assert all("code" not in runner.config_fields(Plan(n, methods.build(n).method, Budget(ratio=0.1)), "full")
               for n in BUILTIN_CONFIG_FP)


@pytest.mark.slow
def test_builtin_config_fingerprints_match_main_before_plugins(tmp_path):
    """Recompute the pinned digests with the code of MAIN_COMMIT itself (skipped where git lacks that commit)."""
    if subprocess.run(["git", "cat-file", "-e", f"{MAIN_COMMIT}^{{commit}}"], cwd=ROOT).returncode != 0:
        pytest.skip(f"commit {MAIN_COMMIT} is not in this clone")
    archive = subprocess.run(["git", "archive", MAIN_COMMIT, "kvbench", "configs", "tasks"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive, check=True)
    old = json.loads(subprocess.run(
        [sys.executable, "-c", DIGESTS_SCRIPT, json.dumps(sorted(BUILTIN_CONFIG_FP))], cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True).stdout)
    assert {k.split("/")[0]: v for k, v in old.items() if k.endswith("/r0.1/full")} == BUILTIN_CONFIG_FP
    assert digest(old) == BUILTIN_CONFIG_FP_ALL
    now = config_fps_now()
    moved = {k for k in old if k.split("/")[0] in VERSION_MOVED}
    assert {k: v for k, v in now.items() if k not in moved} == {k: v for k, v in old.items() if k not in moved}
    assert all(now[k] != old[k] for k in moved)  # a version bump moves every budget and scope of the method


# ---- --presets FILE -------------------------------------------------------------------------------------------
def test_example_presets_file_works():
    choice = methods.build("snapkv_w16_avg", user_presets=EXAMPLE_PRESETS)
    assert (choice.label, choice.base) == ("snapkv_w16_avg", "snapkv")
    assert (choice.method.window_size, choice.method.kernel_size, choice.method.pooling) == (16, 5, "avg")
    assert methods.build("h2o_recent70", user_presets=EXAMPLE_PRESETS).method.heavy_fraction == 0.3
    with pytest.raises(InputError, match="unknown method 'snapkv_w16_avg'"):
        methods.build("snapkv_w16_avg")  # only with the file


def test_package_presets_pass_the_same_checks():
    table = methods.presets()
    assert {"snapkv_official", "chunkkv_kvpress", "knorm_factory"} <= set(table)
    assert table["knorm_factory"].params == {"skip_layers": (0, 1)}


@pytest.mark.parametrize("body, message", [
    ("presets:\n  mine: {method: snapkv, window_size: wide}\n", "preset 'mine', key 'window_size': expected an integer, got a string 'wide'"),
    ("presets:\n  mine: {method: snapkv, window_size: '32'}\n", "preset 'mine', key 'window_size': expected an integer, got a string '32'"),
    ("presets:\n  mine: {method: h2o, heavy_fraction: [1]}\n", "preset 'mine', key 'heavy_fraction': expected a number, got a list [1]"),
    ("presets:\n  mine: {method: snapkv, windw_size: 8}\n", "did you mean 'window_size'"),
    ("presets:\n  mine: {method: snapkvv}\n", "preset 'mine': 'method' must name a registered method, got 'snapkvv' (did you mean 'snapkv'?)"),
    ("presets:\n  mine: {window_size: 8}\n", "preset 'mine': 'method' must name a registered method, got None"),
    ("presets:\n  snapkv_official: {method: snapkv}\n", "has the name of a kvbench package preset (snapkv_official)"),
    ("presets:\n  snapkv: {method: snapkv}\n", "preset 'snapkv' has the name of a method (snapkv)"),
    ("presets: [a, b]\n", "'presets:' must map preset names to settings, got a list"),
    ("presets:\n  mine: {method: snapkv, window_size: 8\n", "malformed YAML"),
])
def test_bad_presets_file_names_file_preset_and_key(tmp_path, body, message):
    path = tmp_path / "mine.yaml"
    path.write_text(body)
    with pytest.raises(InputError) as info:
        methods.build("fullkv", user_presets=path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_bad_presets_file_stops_the_cli_before_the_model(tmp_path, monkeypatch, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("presets:\n  mine: {method: snapkv, pooling: 3}\n")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_kvbench(["run", "--model", "nosuch-model-dir/x", "--presets", str(path)], capsys)
    assert code == 2 and err == f"kvbench: error: {path}: preset 'mine', key 'pooling': expected a string, got an integer 3\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml"]


def test_wrapper_preset_in_a_presets_file(tmp_path):
    # Checking a wrapper preset builds its inner method, which may be a preset of the same user file: the
    # check must neither re-enter itself nor miss the user's presets.
    path = tmp_path / "mine.yaml"
    path.write_text("presets:\n  ada_snap: {method: adakv, inner: snapkv}\n"
                    "  snap_w16: {method: snapkv, window_size: 16}\n  ada_w16: {method: adakv, inner: snap_w16}\n")
    choice = methods.build("ada_snap", user_presets=path)
    assert (choice.label, choice.base, choice.method.inner_method.name) == ("ada_snap", "adakv", "snapkv")
    inner = methods.build("ada_w16", user_presets=path).method.inner_method
    assert (inner.name, inner.window_size) == ("snapkv", 16)
    assert methods.build("snap_w16+kivi4", user_presets=path).method.inner_method.window_size == 16
    with pytest.raises(InputError, match="unknown method 'snap_w16'"):
        methods.build("adakv", {"inner": "snap_w16"})  # the user's presets only with the file
