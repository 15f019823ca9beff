"""Where things live, and YAML <-> dataclass helpers.  Configs are data, not code branches."""

from __future__ import annotations

import dataclasses
import functools
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


def write_record(path: Path, record: Any) -> bool:
    """Write a cache record (JSON) atomically: concurrent writers each replace the whole file.
    Returns False where the cache cannot be written (read-only): the caller recomputes next time."""
    import json

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
        return True
    except OSError:
        return False


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


class ConfigProblems(ValueError):
    """Every problem of one config mapping: ``items`` as (field path, what), ``lines`` as
    ``where: field.path: what``; ``unknown`` the locations of the unknown keys (so a checker can
    drop them and go on)."""

    def __init__(self, where: str, items: list[tuple[str, str]], unknown: list[tuple] | None = None):
        self.items = items
        self.lines = [f"{where}: {p}: {m}" if p else f"{where}: {m}" for p, m in items]
        self.unknown = unknown or []
        super().__init__("\n".join(self.lines))


_TYPE_NAMES = {"int": "int", "float": "float", "string": "str", "bool": "bool", "list": "list", "tuple": "list",
               "dict": "mapping", "dataclass": "mapping", "set": "list"}


def _forbid_extra(cls: type, seen: set | None = None) -> None:
    """Every dataclass reachable from ``cls`` through its fields' types rejects unknown keys."""
    import typing

    from pydantic import ConfigDict

    seen = set() if seen is None else seen
    if cls in seen or not dataclasses.is_dataclass(cls):
        return
    seen.add(cls)
    if "__pydantic_config__" not in cls.__dict__:
        cls.__pydantic_config__ = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    stack = list(typing.get_type_hints(cls).values())
    while stack:
        tp = stack.pop()
        if dataclasses.is_dataclass(tp):
            _forbid_extra(tp, seen)
        stack += list(typing.get_args(tp))


@functools.lru_cache(maxsize=None)
def _adapter(cls: type):
    from pydantic import TypeAdapter

    _forbid_extra(cls)
    return TypeAdapter(cls)


def _fields_at(cls: type, loc: tuple) -> list[str]:
    """The field names of the dataclass at ``loc`` inside ``cls`` (for 'expected some of')."""
    import typing

    tp: Any = cls
    for part in loc:
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(str(part), Any)
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        while not dataclasses.is_dataclass(tp) and args:   # Optional[X], list[X], dict[str, X]
            tp = args[-1]
            args = [a for a in typing.get_args(tp) if a is not type(None)]
        if isinstance(part, int) and not dataclasses.is_dataclass(tp):
            return []
    return sorted(f.name for f in dataclasses.fields(tp)) if dataclasses.is_dataclass(tp) else []


def field_path(loc: tuple) -> str:
    """``("routers", 0, "num_samples")`` -> ``routers[0].num_samples`` (the style of every config message)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _none_sections(cls: type, d: Any) -> Any:
    """``section:`` left empty in YAML (None) means the section's defaults, at every level."""
    import typing

    if not (dataclasses.is_dataclass(cls) and isinstance(d, dict)):
        return d
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in d.items():
        tp = hints.get(k)
        if v is None and dataclasses.is_dataclass(tp):
            continue
        out[k] = _none_sections(tp, v) if dataclasses.is_dataclass(tp) else v
    return out


def from_dict(cls: type[T], d: dict[str, Any], where: str = "") -> T:
    """Validate a mapping into a config dataclass with pydantic (v2, lax mode): unknown keys at
    every level, missing required fields and values of the wrong type are all reported at once
    as :class:`ConfigProblems`, one line each naming the field path, e.g.
    ``tune.yaml: routers[0].num_samples: expected int, got 'two'``.  Nested sections are
    dataclasses too and come from nested mappings."""
    from pydantic import ValidationError

    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    where = where or cls.__name__
    if not isinstance(d, dict):
        raise ConfigProblems(where, [("", f"expected a mapping, got {d!r}")])
    try:
        return _adapter(cls).validate_python(_none_sections(cls, d))
    except ValidationError as e:
        raise _problems(cls, e, where) from None


@functools.lru_cache(maxsize=None)
def _type_adapter(tp: Any):
    from pydantic import TypeAdapter

    return TypeAdapter(tp)


def type_problem(value: Any, tp: Any) -> str | None:
    """None when ``value`` validates as the annotation ``tp`` (pydantic, lax mode, as configs
    are), else ``expected int, got 'ten'``; a type pydantic cannot check is not checked."""
    from pydantic import ValidationError

    try:
        _type_adapter(tp).validate_python(value)
    except ValidationError as e:
        return _message(e.errors(include_url=False)[0])
    except Exception:  # noqa: BLE001 - no schema for this annotation
        return None
    return None


def _message(err: dict) -> str:
    kind = err["type"].split("_")[0]
    if err["type"] in ("missing", "missing_argument"):
        return "required"
    if kind in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[kind]}, got {err.get('input')!r}"
    if err["type"] in ("value_error", "assertion_error") and "error" in err.get("ctx", {}):
        return str(err["ctx"]["error"])   # a __post_init__ check's own message
    return err["msg"]


def _problems(cls: type, e, where: str) -> ConfigProblems:
    items, unknown, extra = [], [], {}
    for err in e.errors(include_url=False):
        loc = tuple(err["loc"])
        if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            extra.setdefault(loc[:-1], []).append(str(loc[-1]))
            unknown.append(loc)
            continue
        items.append((field_path(loc), _message(err)))
    for parent, keys in reversed(list(extra.items())):
        items.insert(0, (field_path(parent), f"unknown key(s) {sorted(keys)}; expected some of {_fields_at(cls, parent)}"))
    return ConfigProblems(where, items, unknown)
