"""Sample sources: LongBench from the hub (pinned revision), a local directory of official jsonl files, the
embedded LongBench sample shipped inside kvbench, and built-in synthetic long-context tasks generated
deterministically offline.

Task definitions (prompt, metric, chat rule, category, groups) are package data: kvbench/tasks/longbench.yaml
and kvbench/tasks/synthetic.yaml, the one source `kvbench run` and `kvbench score` both read."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbench import resources
from kvbench.errors import InputError
from kvbench.registry import unknown

HUB_REPO = "THUDM/LongBench"
HUB_FILE = "data.zip"
# The dataset repo revision to fetch. A commit hash pins it (--hub-revision); whatever was fetched, every
# row's data identity records the resolved commit and the sha256 of the task file it read, so a moving
# branch can never silently change the data behind a fingerprint.
HUB_REVISION = "main"
REQUIRED_FIELDS = ("input", "context", "answers", "length", "all_classes", "_id")
SAMPLE_DIR = "longbench-sample"  # the embedded sample, inside kvbench/tasks/ (its README says what it holds)


@dataclass(frozen=True)
class TaskSpec:
    name: str  # e.g. "hotpotqa", "hotpotqa_e", "passkey_en"
    base: str  # the v1 task whose settings it uses
    short: str
    prompt: str
    max_new_tokens: int
    metric: str
    language: str
    category: str
    chat: bool
    first_line: bool
    stop_at_newline: bool
    longbench_e: bool = False
    synthetic: bool = False

    def fingerprint_fields(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "max_new_tokens": self.max_new_tokens,
            "metric": self.metric,
            "chat": self.chat,
            "first_line": self.first_line,
            "stop_at_newline": self.stop_at_newline,
        }


@dataclass(frozen=True)
class Sample:
    id: str
    task: str
    input: str
    context: str
    answers: tuple[str, ...]
    length: int
    all_classes: tuple[str, ...] | None
    language: str
    extra: tuple[tuple[str, Any], ...] = ()  # e.g. the evidence span of synthetic tasks

    def meta(self, key: str, default: Any = None) -> Any:
        return dict(self.extra).get(key, default)


def _task_from_entry(name: str, entry: dict[str, Any], synthetic: bool) -> TaskSpec:
    try:
        return TaskSpec(
            name=name,
            base=name,
            short=str(entry.get("short", name)),
            prompt=entry["prompt"],
            max_new_tokens=int(entry["max_new_tokens"]),
            metric=entry["metric"],
            language=entry["language"],
            category=entry["category"],
            chat=bool(entry["chat"]),
            first_line=bool(entry.get("first_line", False)),
            stop_at_newline=bool(entry.get("stop_at_newline", False)),
            synthetic=synthetic,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"task '{name}': missing or bad field {exc}") from None


def load_task_specs() -> dict[str, TaskSpec]:
    """All tasks: the 21 v1 tasks, their LongBench-E variants, and the synthetic tasks."""
    specs: dict[str, TaskSpec] = {}
    longbench = resources.load_yaml(resources.tasks_path("longbench.yaml"))
    for name, entry in longbench["tasks"].items():
        specs[name] = _task_from_entry(name, entry, synthetic=False)
    for name in longbench.get("longbench_e", []):
        base = specs[name]
        specs[f"{name}_e"] = TaskSpec(**{**base.__dict__, "name": f"{name}_e", "short": f"{base.short}-E", "longbench_e": True})
    synthetic = resources.load_yaml(resources.tasks_path("synthetic.yaml"))
    for name, entry in synthetic["tasks"].items():
        specs[name] = _task_from_entry(name, entry, synthetic=True)
    return specs


def category_titles() -> dict[str, str]:
    """LongBench category key -> title, in LongBench's table order (tasks/longbench.yaml `categories`)."""
    return dict(resources.load_yaml(resources.tasks_path("longbench.yaml"))["categories"])


def task_groups(specs: dict[str, TaskSpec]) -> dict[str, list[TaskSpec]]:
    """Group name -> tasks: all (21 v1 tasks), en, zh, e (LongBench-E), synthetic, and the named groups of
    tasks/longbench.yaml (`quick`, the default of `kvbench run`)."""
    v1 = [s for s in specs.values() if not s.synthetic and not s.longbench_e]
    groups = {
        "all": v1,
        "en": [s for s in v1 if s.language == "en"],
        "zh": [s for s in v1 if s.language == "zh"],
        "e": [s for s in specs.values() if s.longbench_e],
        "synthetic": [s for s in specs.values() if s.synthetic],
    }
    named = resources.load_yaml(resources.tasks_path("longbench.yaml")).get("groups") or {}
    for name, members in named.items():
        groups[name] = [specs[m] for m in members]
    return groups


def select_tasks(names: str | Iterable[str], specs: dict[str, TaskSpec] | None = None) -> list[TaskSpec]:
    """Task names and group names (task_groups), in order, without duplicates. A string is a comma list."""
    specs = specs or load_task_specs()
    groups = task_groups(specs)
    parts = names.split(",") if isinstance(names, str) else list(names)
    chosen: list[TaskSpec] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if part in groups:
            picked = groups[part]
        elif part in specs:
            picked = [specs[part]]
        else:
            raise unknown("task", part, list(specs) + list(groups))
        chosen.extend(s for s in picked if s not in chosen)
    if not chosen:
        raise InputError("{tasks} selects no task", options=("tasks",))
    return chosen


def parse_row(raw: dict[str, Any], task: str, where: str) -> Sample:
    missing = [f for f in REQUIRED_FIELDS if f not in raw]
    if missing:
        raise InputError(f"{where}: missing field '{missing[0]}'")
    answers = raw["answers"]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise InputError(f"{where}: 'answers' must be a list of strings")
    classes = raw["all_classes"]
    if classes is not None and not isinstance(classes, list):
        raise InputError(f"{where}: 'all_classes' must be a list or null")
    try:
        length = int(raw["length"])
    except (TypeError, ValueError):
        raise InputError(f"{where}: 'length' must be an integer") from None
    return Sample(
        id=str(raw["_id"]),
        task=task,
        input=str(raw["input"]),
        context=str(raw["context"]),
        answers=tuple(answers),
        length=length,
        all_classes=tuple(str(c) for c in classes) if classes is not None else None,
        language=str(raw.get("language", "")),
    )


def read_jsonl(path: Path, task: str, limit: int | None = None) -> Iterator[Sample]:
    """Official LongBench jsonl, in file order. A broken line (bad JSON, bad UTF-8) is an error naming file
    and line; so is a file without any sample. Lines are decoded one by one: with a limit, only what is read
    must be valid."""
    with open(path, "rb") as handle:
        count = offset = 0
        for number, data in enumerate(handle, 1):
            if limit is not None and count >= limit:
                return
            where = f"{path}:{number}"
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as exc:  # the wording of `kvbench score`, plus the line
                raise InputError(f"{where}: not valid UTF-8 ({exc.reason} at byte {offset + exc.start})") from None
            offset += len(data)
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: broken JSON line ({exc.msg})") from None
            if not isinstance(raw, dict):
                raise InputError(f"{where}: expected a JSON object")
            yield parse_row(raw, task, where)
            count += 1
    if count == 0 and limit != 0:
        raise InputError(f"{path}: no samples in the file (it is empty)")


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class DataSource:
    """Where samples come from. `identity(task)` names the exact data for fingerprints."""

    def available(self, task: TaskSpec) -> bool:
        raise NotImplementedError

    def samples(self, task: TaskSpec, limit: int | None = None) -> Iterator[Sample]:
        raise NotImplementedError

    def identity(self, task: TaskSpec) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        """Where the samples come from, in words, for the line a run prints before it starts."""
        return type(self).__name__


class LocalDir(DataSource):
    def __init__(self, root: Path):
        if not root.exists():
            raise InputError(f"data directory not found: {root}")
        if not root.is_dir():
            raise InputError(f"{{data_dir}} is not a directory: {root}", options=("data_dir",))
        if not any(root.glob("*.jsonl")):
            raise InputError(f"data directory {root} holds no .jsonl files")
        self.root = root

    def path(self, task: TaskSpec) -> Path:
        return self.root / f"{task.name}.jsonl"

    def available(self, task: TaskSpec) -> bool:
        return self.path(task).is_file()

    def samples(self, task: TaskSpec, limit: int | None = None) -> Iterator[Sample]:
        if not self.available(task):
            raise InputError(f"no data for task '{task.name}': {self.path(task)} does not exist")
        return read_jsonl(self.path(task), task.name, limit)

    def identity(self, task: TaskSpec) -> str:
        return f"file-sha256:{_file_digest(self.path(task))}"

    def describe(self) -> str:
        return f"the files in {self.root}"


class Embedded(LocalDir):
    """The LongBench sample shipped inside kvbench (kvbench/tasks/longbench-sample/, its README says which
    records and from where): 3 short real records for each v1 task, shortest first. Its identity is the file's
    sha256, as for any folder of jsonl files: the same bytes are the same data wherever they are read from."""

    def __init__(self) -> None:
        super().__init__(resources.tasks_path(SAMPLE_DIR))


class HubUnavailable(InputError):
    """LongBench's data.zip can be neither found in the local caches nor downloaded (`reason` says why)."""

    def __init__(self, reason: str):
        super().__init__(
            f"{reason}; offline? pass {{data_dir}} with the official jsonl files, {{data}} sample for kvbench's "
            "embedded sample, or {tasks} synthetic", options=("data_dir", "data", "tasks"),
        )
        self.reason = reason


class Hub(LocalDir):
    """THUDM/LongBench's data.zip at a pinned revision, downloaded once through huggingface_hub and unpacked
    into kvbench's cache. `download` is injectable so tests can hand it a local zip."""

    def __init__(self, cache: Path, revision: str = HUB_REVISION, download: Callable[..., str] | None = None):
        self.revision = revision
        target = cache / "longbench" / revision
        if not (target / ".complete").is_file():
            archive = Path(self._download(download))
            self._unpack(archive, target)
            # hf_hub_download returns .../snapshots/<commit>/data.zip: remember the commit actually fetched.
            parent = archive.parent.name
            resolved = parent if re.fullmatch(r"[0-9a-f]{40}", parent) else revision
            (target / ".complete").write_text(resolved + "\n")
        self.resolved = (target / ".complete").read_text().strip()
        super().__init__(target)

    def _download(self, download: Callable[..., str] | None) -> str:
        where = f"{HUB_REPO}/{HUB_FILE}@{self.revision[:12]}"
        if download is None:
            from huggingface_hub import hf_hub_download

            download = hf_hub_download
            try:  # the Hugging Face cache first: no network needed once it holds the file
                return download(repo_id=HUB_REPO, filename=HUB_FILE, repo_type="dataset", revision=self.revision,
                                local_files_only=True)
            except Exception:
                pass
            # Offline, huggingface_hub retries for about 45 s before it gives up: ask the network once first.
            reason = _hub_unreachable()
            if reason:
                raise HubUnavailable(f"cannot fetch {where} ({reason})")
        try:
            return download(repo_id=HUB_REPO, filename=HUB_FILE, repo_type="dataset", revision=self.revision)
        except Exception as exc:  # network errors come in many types; all mean the same to the user
            raise HubUnavailable(f"cannot fetch {where} ({type(exc).__name__})") from None

    @staticmethod
    def _unpack(archive: Path, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        try:
            with zipfile.ZipFile(archive) as zf:
                for member in zf.infolist():
                    name = Path(member.filename).name
                    if member.is_dir() or not name.endswith(".jsonl") or name.startswith("."):
                        continue
                    # Flatten (the archive nests data/<task>.jsonl) and never write outside target.
                    tmp = target / f".{name}.part"
                    tmp.write_bytes(zf.read(member))
                    tmp.replace(target / name)
        except zipfile.BadZipFile:
            raise InputError(f"{archive}: not a zip archive") from None

    def identity(self, task: TaskSpec) -> str:
        return f"hub:{HUB_REPO}@{self.resolved[:12]}:{_file_digest(self.path(task))}"

    def describe(self) -> str:
        return f"{HUB_REPO} {HUB_FILE} at {self.resolved[:12]} (cached in {self.root})"


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be reached now (offline mode, no route, no name), or None."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # through a proxy a direct connection proves nothing: let huggingface_hub try
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as exc:
        return f"{url.hostname} unreachable: {exc.strerror or type(exc).__name__}"
    return None


class Synthetic(DataSource):
    """Passkey and multi-needle retrieval in English and Chinese, generated from a seed at a chosen length
    (words for English, characters for Chinese: LongBench's own `length` units)."""

    def __init__(self, length: int = 2000, seed: int = 0, count: int = 20):
        if length < 50:
            raise InputError(f"{{synthetic_length}} must be at least 50, got {length}", options=("synthetic_length",))
        self.length, self.seed, self.count = length, seed, count
        self.config = resources.load_yaml(resources.tasks_path("synthetic.yaml"))

    def available(self, task: TaskSpec) -> bool:
        return task.synthetic

    def identity(self, task: TaskSpec) -> str:
        return f"synthetic:v1:len={self.length}:seed={self.seed}"

    def describe(self) -> str:
        return (f"kvbench's built-in synthetic generator (offline; contexts of {self.length} words in English, "
                f"characters in Chinese; --synthetic-length)")

    def samples(self, task: TaskSpec, limit: int | None = None) -> Iterator[Sample]:
        entry = self.config["tasks"][task.name]
        n = self.count if limit is None else min(limit, self.count)
        for index in range(n):
            yield make_synthetic(task, entry, index, self.length, self.seed)


def _filler(units: int, language: str, sentences: list[str]) -> list[str]:
    """Filler as a list of sentences whose total length is about `units` words (en) or characters (zh)."""
    out, size, i = [], 0, 0
    while size < units:
        sentence = sentences[i % len(sentences)]
        out.append(sentence)
        size += len(sentence.split()) if language == "en" else len(sentence)
        i += 1
    return out


def make_synthetic(task: TaskSpec, entry: dict[str, Any], index: int, length: int, seed: int) -> Sample:
    rng = random.Random(f"{task.name}:{seed}:{length}:{index}")
    language = task.language
    filler = _filler(length, language, entry["filler"])
    n_needles = int(entry.get("needles", 1))
    keys = rng.sample(entry["keys"], n_needles) if n_needles > 1 else [None]
    values = [str(rng.randint(10000, 99999)) for _ in range(n_needles)]
    needles = [entry["needle"].format(key=k, value=v) for k, v in zip(keys, values)]
    slots = sorted(rng.sample(range(1, len(filler)), n_needles))
    for offset, (slot, needle) in enumerate(zip(slots, needles)):
        filler.insert(slot + offset, needle)
    joiner = " " if language == "en" else ""
    context = joiner.join(filler)
    sep = ", " if language == "en" else "、"
    question = entry["question"].format(key=keys[0], keys=sep.join(k for k in keys if k))
    answer = ", ".join(values) if n_needles > 1 else values[0]
    spans = []
    for needle in needles:
        start = context.index(needle)
        spans.append((start, start + len(needle)))
    units = len(context.split()) if language == "en" else len(context)
    digest = hashlib.sha1(f"{task.name}|{seed}|{length}|{index}".encode()).hexdigest()[:40]
    return Sample(
        id=f"syn-{digest}",
        task=task.name,
        input=question,
        context=context,
        answers=(answer,),
        length=units,
        all_classes=None,
        language=language,
        extra=(("evidence_char_spans", tuple(spans)),),
    )


def open_source(
    data: str, data_dir: Path | None, tasks: list[TaskSpec], cache: Path, synthetic_length: int = 2000,
    hub_revision: str = HUB_REVISION, log: Callable[[str], None] = print,
) -> dict[str, DataSource]:
    """One source per task. Synthetic tasks always come from the generator; LongBench tasks from `data_dir`
    when given, else by `data`: hub, sample (the embedded sample), or auto = the hub (kvbench's cache of it
    first, so no network once fetched), falling back to the embedded sample with a one-line notice."""
    synthetic = Synthetic(synthetic_length) if any(t.synthetic for t in tasks) else None
    real = [t for t in tasks if not t.synthetic]
    source: DataSource | None = None
    if data == "hub" and data_dir is not None:
        raise InputError("give --data hub or --data-dir DIR, not both")
    if real:
        if data_dir is not None:
            source = LocalDir(data_dir)
        elif data == "hub":
            source = Hub(cache, hub_revision)
        elif data == "sample":
            source = Embedded()
        else:
            try:
                source = Hub(cache, hub_revision)
            except HubUnavailable as exc:
                log(f"{exc.reason}: using kvbench's embedded LongBench sample instead (3 short real records per task; "
                    "a smoke test, not comparable with full LongBench scores)")
                source = Embedded()
    return {t.name: (synthetic if t.synthetic else source) for t in tasks}  # type: ignore[misc]
