"""Per-(layer, head) tables that some methods read, computed offline by kvbench on the loaded model and stored
as files, each with its sha256 in the config fingerprint and the run manifest (methods-2 §2.19, §2.21):

- `retrieval_reasoning`: HeadKV's head-importance scores (kvbench.headscores), in HeadKV's own JSON layout
  ({"layer-head": [one value per accepted test, ...]}, layer-major, on one line), so a file from the HeadKV
  repository (per query head, Llama-3-8B / Mistral-7B) can be used as it is; importance = the mean of a list.
- `duo_proxy`: DuoAttention head patterns (kvbench.duo_patterns), in DuoAttention's layout
  (`full_attention_heads.tsv`: one row per layer, one tab-separated value per KV head, higher = more of a
  retrieval head), so the official patterns of the six models it ships can be used as they are.

Next to each file kvbench writes `<file>.meta.json` (model identity, procedure and its settings); the table's
own format stays the reference's. A method names its file with a parameter (`scores` / `pattern`); "auto"
is the file `kvbench headscores` wrote for the run's model, keyed by the model's weights identity."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvbench.errors import InputError
from kvbench.models import cache_root, file_sha256, safe_name

KINDS = {"retrieval_reasoning": "retrieval_reasoning_heads.json", "duo_proxy": "full_attention_heads.tsv"}
PRODUCER = {"retrieval_reasoning": "headkv", "duo_proxy": "duo_attention"}  # `kvbench headscores --method`


@dataclass(frozen=True)
class HeadTable:
    kind: str
    path: Path
    sha256: str
    scores: torch.Tensor  # [L, H] float64: one value per (layer, head)
    meta: dict[str, Any] = field(default_factory=dict)


def default_path(kind: str, identity: str) -> Path:
    """Where `kvbench headscores` stores a model's table: keyed by the weights identity, not the alias."""
    return cache_root() / "headscores" / safe_name(identity) / KINDS[kind]


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def read(path: Path, kind: str) -> HeadTable:
    if not path.is_file():
        raise InputError(f"head table {path} not found")
    text = path.read_text(encoding="utf-8")
    scores = _parse_json_scores(text, path) if kind == "retrieval_reasoning" else _parse_tsv(text, path)
    meta = json.loads(meta_path(path).read_text(encoding="utf-8")) if meta_path(path).is_file() else {}
    return HeadTable(kind, path, file_sha256(path), scores, meta)


def write(path: Path, kind: str, scores: Any, meta: dict[str, Any]) -> None:
    """`scores`: for retrieval_reasoning a {"layer-head": [values]} dict, for duo_proxy an [L, H] tensor."""
    from kvbench.results.store import write_atomic

    if kind == "retrieval_reasoning":
        text = json.dumps(scores) + "\n"
    else:
        text = "\n".join("\t".join(repr(float(v)) for v in row) for row in scores.tolist()) + "\n"
    write_atomic(path, text)
    write_atomic(meta_path(path), json.dumps(meta, indent=2) + "\n")


def _parse_json_scores(text: str, path: Path) -> torch.Tensor:
    """HeadKV layout -> [L, H] mean scores. Keys are "layer-head"; their order in the file is ignored (the
    official code reshapes in file order, which is layer-major in every shipped file)."""
    try:
        table = json.loads(text.splitlines()[0] if text.strip() else "")
    except (json.JSONDecodeError, IndexError):
        raise InputError(f"{path}: not a HeadKV head-score file (one JSON object per line)") from None
    cells: dict[tuple[int, int], float] = {}
    for key, values in table.items():
        try:
            layer, head = (int(p) for p in key.split("-"))
        except ValueError:
            raise InputError(f"{path}: key '{key}' is not 'layer-head'") from None
        if not values:
            raise InputError(f"{path}: head {key} has no accepted test; the detection accepted none "
                             "(rerun kvbench headscores with more tests or a lower --min-f1)")
        cells[(layer, head)] = sum(float(v) for v in values) / len(values)
    layers = 1 + max(layer for layer, _ in cells)
    heads = 1 + max(head for _, head in cells)
    if len(cells) != layers * heads:
        raise InputError(f"{path}: {len(cells)} heads listed, not a full {layers} x {heads} grid")
    out = torch.zeros(layers, heads, dtype=torch.float64)
    for (layer, head), value in cells.items():
        out[layer, head] = value
    return out


def _parse_tsv(text: str, path: Path) -> torch.Tensor:
    try:
        rows = [[float(v) for v in line.split("\t")] for line in text.splitlines() if line.strip()]
    except ValueError:
        raise InputError(f"{path}: not a DuoAttention pattern (tab-separated numbers, one row per layer)") from None
    if not rows or len({len(r) for r in rows}) != 1:
        raise InputError(f"{path}: rows of a DuoAttention pattern must all have one value per KV head")
    return torch.tensor(rows, dtype=torch.float64)


def resolve(kind: str, given: str, identity: str, model_name: str, method: str) -> HeadTable:
    """The table a method names: a path, or "auto" = the file kvbench headscores wrote for this model."""
    if given != "auto":
        return read(Path(given).expanduser(), kind)
    path = default_path(kind, identity)
    if not path.is_file():
        raise InputError(f"{method} needs {kind.replace('_', ' ')} head scores for {model_name}: run "
                         f"`kvbench headscores --model {model_name} --method {PRODUCER[kind]}` first, "
                         f"or pass a file with --method-arg")
    return read(path, kind)


def check_shape(table: HeadTable, layers: int, heads: int, method: str) -> None:
    if tuple(table.scores.shape) != (layers, heads):
        raise InputError(f"{method}: {table.path} has {table.scores.shape[0]} x {table.scores.shape[1]} heads; "
                         f"the model has {layers} layers x {heads} heads")


class HeadTableUser:
    """Mixin for methods that read a head table: `table_kind` names the kind, `table_field` the dataclass field
    holding its path or "auto". An explicit path is read when the method is built; "auto" when the runner binds
    the model (`bind_model`). The table's sha256 is the method's artifact (its config fingerprint)."""

    table_kind: str = ""
    table_field: str = ""

    def _load_given_table(self) -> None:
        given = getattr(self, self.table_field)
        self._table = None if given == "auto" else read(Path(given).expanduser(), self.table_kind)

    def bind_model(self, identity: str, model_name: str) -> None:
        if getattr(self, "_table", None) is None:
            self._table = resolve(self.table_kind, getattr(self, self.table_field), identity, model_name,
                                  self.name)  # type: ignore[attr-defined]

    @property
    def table(self) -> HeadTable:
        if getattr(self, "_table", None) is None:
            raise InputError(f"{self.name}: {self.table_field}=auto names the table of the run's model; pass "  # type: ignore[attr-defined]
                             "a file, or run it through kvbench run, which binds the model")
        return self._table

    def artifacts(self) -> dict[str, str]:
        table = getattr(self, "_table", None)
        return {self.table_kind: table.sha256} if table is not None else {}
