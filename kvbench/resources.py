"""Where kvbench's data files live (configs/, tasks/) and how they are read (safe YAML only)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from kvbench.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


def config_path(name: str) -> Path:
    return ROOT / "configs" / name


def tasks_path(name: str) -> Path:
    return ROOT / "tasks" / name


def recipe_dir() -> Path:
    """Paper recipes (kvbench.studies.recipes): package data from the start, so installed copies have them."""
    return Path(__file__).resolve().parent / "configs" / "recipes"


def recipe_path(name: str) -> Path:
    return recipe_dir() / f"{name}.yaml"


def load_yaml(path: Path) -> Any:
    return _load_yaml_cached(str(path), path.stat().st_mtime_ns if path.exists() else 0)


@lru_cache(maxsize=32)
def _load_yaml_cached(path: str, _mtime: int) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise InputError(f"{path}{where}: malformed YAML ({problem})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level")
    return data
