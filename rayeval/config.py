"""Where things live, and YAML <-> dataclass helpers.  Configs are data, not code branches."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # packaged configs: eval_small, tune_small, ...
T = TypeVar("T")


def resolve_config(path: str | Path) -> Path:
    """A YAML path, or the name of a packaged config (``eval_small``, ``pipeline_small``,
    ``tune_small``, ``judge_mt_bench`` ...): the one lookup every config loader uses."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / str(path), CONFIG_DIR / f"{path}.yaml"):
        if cand.is_file():
            return cand
    names = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"{path}: No such file or directory, nor a packaged config of that name "
                            f"(packaged: {', '.join(names)})")


def data_root() -> Path:
    """The shared benchmark data: $RAYEVAL_DATA, else ../shared/data beside the repo."""
    env = os.environ.get("RAYEVAL_DATA")
    if env:
        return Path(env).expanduser().resolve()
    for base in (Path.cwd(), REPO_ROOT):
        cand = (base / ".." / "shared" / "data").resolve()
        if cand.is_dir():
            return cand
    return (REPO_ROOT / ".." / "shared" / "data").resolve()


def cache_dir() -> Path:
    """Prepared models, embeddings and other caches: $RAYEVAL_CACHE, else ~/.cache/rayeval."""
    p = Path(os.environ.get("RAYEVAL_CACHE", Path.home() / ".cache" / "rayeval")).expanduser()
    p.mkdir(parents=True, exist_ok=True)
    return p


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: top level must be a mapping, got {type(doc).__name__}")
    return doc


def from_dict(cls: type[T], d: dict[str, Any], where: str = "") -> T:
    """Build a dataclass from a dict, rejecting unknown keys with a message that says where."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    return cls(**d)
