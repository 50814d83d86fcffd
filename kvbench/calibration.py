"""`kvbench headscores`: compute a head table on the loaded model and store it where `kvbench run` finds it
(kvbench.headtables): HeadKV's retrieval-reasoning scores (kvbench.headscores) or DuoAttention's proxy
pattern (kvbench.duo_patterns). Idempotent: an existing table is kept unless --force.

Text: the contexts of local LongBench files (`data_dir`, `tasks`), in file order; without data, the
English filler of kvbench's synthetic tasks (offline, in a clean clone). The meta file records which."""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbench import __version__, headtables, models, resources
from kvbench.errors import InputError

METHODS = {"headkv": "retrieval_reasoning", "duo_attention": "duo_proxy"}


@dataclass
class CalibrationOptions:
    model: str = "smollm2-135m"
    method: str = "headkv"  # headkv | duo_attention
    data_dir: Path | None = None
    tasks: str = "multi_news"
    out: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    force: bool = False
    trust_remote_code: bool = False
    lengths: tuple[int, ...] | None = None  # headkv: context lengths (default: the reference grid)
    depths: tuple[int, ...] | None = None  # headkv: needle depths in percent
    min_f1: float = 50.0  # headkv: a test counts when its answer's qa F1 is above this
    texts: int = 16  # duo_attention: texts averaged
    text_tokens: int = 2048  # duo_attention: tokens per text (cut)


def local_texts(data_dir: Path | None, tasks: str) -> tuple[list[str], str]:
    """(texts, where they come from) for the haystack or the proxy's texts."""
    from kvbench.data import LocalDir, select_tasks

    if data_dir is None:
        filler = resources.load_yaml(resources.tasks_path("synthetic.yaml"))["tasks"]["passkey_en"]["filler"]
        return [" ".join(filler)], "synthetic passkey_en filler"
    if not data_dir.is_dir():
        raise InputError(f"--data-dir {data_dir} is not a directory")
    source = LocalDir(data_dir)
    texts: list[str] = []
    names = []
    for task in select_tasks(tasks):
        if task.synthetic:
            raise InputError(f"--tasks: '{task.name}' is synthetic; give LongBench tasks with natural text")
        if not source.available(task):
            raise InputError(f"no {task.name}.jsonl in {data_dir}")
        texts += [sample.context for sample in source.samples(task)]
        names.append(f"{task.name}:{source.identity(task)}")
    if not texts:
        raise InputError(f"--tasks {tasks}: no contexts in {data_dir}")
    return texts, ", ".join(names)


def run(opts: CalibrationOptions, log: Callable[[str], None] = print) -> Path:
    if opts.method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got '{opts.method}'")
    if opts.texts < 1 or opts.text_tokens < 2:
        raise InputError("--texts must be >= 1 and --text-tokens >= 2")
    kind = METHODS[opts.method]
    spec = models.resolve_model(opts.model)
    identity = models.model_identity(spec)
    out = opts.out or headtables.default_path(kind, identity)
    if out.exists() and not opts.force:
        log(f"{out} exists (sha256 {models.file_sha256(out)[:16]}); --force recomputes it")
        return out
    texts, origin = local_texts(opts.data_dir, opts.tasks)
    pre = models.preflight(spec, opts.trust_remote_code)
    device = models.resolve_device(opts.device)
    dtype = str(models.resolve_dtype(spec.dtype if opts.dtype == "auto" else opts.dtype, device)).replace("torch.", "")
    log(f"loading {spec.name} ...")
    loaded = models.load_model(spec, opts.device, dtype, opts.trust_remote_code, pre)
    meta: dict[str, Any] = {
        "kind": kind, "model": spec.name, "model_identity": identity, "dtype": dtype, "device": str(loaded.device),
        "text": origin, "text_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
        "versions": {"kvbench": __version__, "python": platform.python_version()},
    }
    if kind == "retrieval_reasoning":
        from kvbench import headscores

        grid = headscores.Grid.default(getattr(pre.config, "max_position_embeddings", None) or 10000)
        grid = headscores.Grid(opts.lengths or grid.lengths, opts.depths or grid.depths, opts.min_f1)
        return headscores.detect(loaded.model, loaded.tokenizer, loaded.stop_ids, texts, grid, out, meta, log)
    from kvbench import duo_patterns

    ids = [loaded.tokenizer.encode(t, add_special_tokens=True)[: opts.text_tokens] for t in texts[: opts.texts]]
    pattern = duo_patterns.proxy_pattern(loaded.model, ids)
    headtables.write(out, kind, pattern, {**meta, "procedure": duo_patterns.PROCEDURE, "texts": len(ids),
                                          "text_tokens": opts.text_tokens, "q_len": 500})
    log(f"wrote {out}: {pattern.shape[0]} layers x {pattern.shape[1]} KV heads from {len(ids)} texts")
    return out
