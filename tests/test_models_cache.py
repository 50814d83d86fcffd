"""The converted-model cache is keyed by the GGUF's content: a second install of the same file (another
virtualenv, so another path and mtime) must reuse the conversion instead of redoing it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from kvbench import models


def test_same_bytes_elsewhere_reuse_the_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    first = tmp_path / "a" / "m.gguf"
    first.parent.mkdir()
    first.write_bytes(b"GGUF fake weights")
    target = models.converted_dir(first)
    target.mkdir(parents=True)
    stat = first.stat()
    sha = hashlib.sha256(first.read_bytes()).hexdigest()
    (target / "kvbench-source.json").write_text(
        json.dumps({"gguf": str(first), "sha256": sha, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))
    second = tmp_path / "b" / "m.gguf"
    second.parent.mkdir()
    shutil.copyfile(first, second)
    os.utime(second, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    # A real conversion would need transformers and a real GGUF; reaching it would raise on these fake bytes.
    assert models.ensure_converted(second) == (target, sha)
    # the stamp now names the second install, so asking again (a run asks twice) reads no weights
    monkeypatch.setattr(models, "file_sha256", lambda path: (_ for _ in ()).throw(AssertionError("hashed again")))
    assert models.ensure_converted(second) == (target, sha)
    assert json.loads((target / "kvbench-source.json").read_text())["gguf"] == str(second)
