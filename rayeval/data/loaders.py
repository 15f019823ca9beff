"""Loaders: MMLU CSV folders, ARC JSONL, generic JSONL/CSV/parquet with a column mapping,
and Hugging Face hub datasets.  All produce ``MCQItem``s and validate every row.

Validation is strict and kind: every bad row is reported as ``file:line: what is wrong``.
By default any bad row raises ``DataValidationError`` (listing all of them); with
``skip_invalid=True`` the good rows load and the rejects come back (and can be written to a file),
so nothing is lost silently.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from rayeval.data.schema import DEFAULT_LABELS, DataValidationError, MCQItem, RowError

LETTERS = "ABCDEFGHIJ"


@dataclass
class LoadResult:
    items: list[MCQItem]
    rejects: list[RowError] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def write_rejects(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for r in self.rejects:
                f.write(json.dumps({"file": r.file, "line": r.line, "error": r.message}) + "\n")
        return path


# ---------------------------------------------------------------------------------------------
# Row sources: each yields (line_number, record_or_error) so errors always know where they are.
# ---------------------------------------------------------------------------------------------

def _bad_encoding(values: Iterable[Any]) -> bool:
    for v in values:
        if isinstance(v, str) and any("\udc80" <= ch <= "\udcff" for ch in v):
            return True
    return False


def _csv_rows(path: Path, header: bool) -> Iterator[tuple[int, list[str] | dict | str]]:
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    reader = csv.reader(io.StringIO(text, newline=""))
    names: list[str] | None = None
    prev_end = 0
    for row in reader:
        start = prev_end + 1
        prev_end = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if _bad_encoding(row):
            yield start, "bad encoding: the row is not valid UTF-8"
            continue
        if header and names is None:
            names = row
            continue
        yield start, (dict(zip(names, row)) | ({"__extra__": row[len(names):]} if len(row) > len(names) else {})
                      if names is not None else row)


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict | str]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, f"bad encoding: not valid UTF-8 at byte {e.start}"
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, f"invalid JSON: {e.msg} (column {e.colno})"
                continue
            if not isinstance(rec, dict):
                yield n, f"expected a JSON object, got {type(rec).__name__}"
                continue
            yield n, rec


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    for n, rec in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield n, rec


def _table_rows(path: Path) -> Iterator[tuple[int, dict | str]]:
    suf = path.suffix.lower()
    if suf in (".jsonl", ".json"):
        return jsonl_rows(path)
    if suf == ".csv":
        return _csv_rows(path, header=True)
    if suf == ".parquet":
        return _parquet_rows(path)
    raise ValueError(f"{path}: unsupported file type {suf!r} (use .jsonl, .csv or .parquet)")


# ---------------------------------------------------------------------------------------------
# Format parsers: record -> MCQItem or an error message.
# ---------------------------------------------------------------------------------------------

def _gold_index(value: Any, labels: list[str] | None, n: int) -> int:
    """Gold as an index, from an int, a digit string, a letter, or one of the item's labels."""
    if isinstance(value, bool):
        raise ValueError(f"gold {value!r} is not an index or label")
    if isinstance(value, int):
        return value
    s = str(value).strip()
    if labels and s in labels:
        return labels.index(s)
    if len(s) == 1 and s.upper() in LETTERS:
        return LETTERS.index(s.upper())
    if s.lstrip("-").isdigit():
        return int(s)
    raise ValueError(f"gold {value!r} is neither an index, a letter, nor one of the labels {labels}")


def _finish(item: MCQItem, file: str, line: int, seen: set[str]) -> MCQItem | RowError:
    probs = item.problems()
    if item.id in seen:
        probs.append(f"duplicate id {item.id!r}")
    if probs:
        return RowError(file, line, "; ".join(probs))
    seen.add(item.id)
    return item


def _mmlu_file(path: Path, subject: str, split: str, seen: set[str]) -> Iterator[MCQItem | RowError]:
    for line, rec in _csv_rows(path, header=False):
        if isinstance(rec, str):
            yield RowError(str(path), line, rec)
            continue
        if len(rec) != 6:
            yield RowError(str(path), line, f"expected 6 fields (question,A,B,C,D,answer), got {len(rec)}"
                           + ("; a choice is missing" if len(rec) < 6 else ""))
            continue
        q, *choices, ans = rec
        try:
            gold = _gold_index(ans, list("ABCD"), 4)
        except ValueError as e:
            yield RowError(str(path), line, str(e))
            continue
        item = MCQItem(id=f"mmlu/{subject}/{split}/{line}", subject=subject, question=q, choices=tuple(choices),
                       gold=gold, labels=tuple("ABCD"), meta={"source": f"{path}:{line}", "split": split})
        yield _finish(item, str(path), line, seen)


def _arc_record(rec: dict, path: str, line: int, seen: set[str], split: str) -> MCQItem | RowError:
    try:
        q = rec["question"]
        stem = q["stem"] if isinstance(q, dict) else q
        ch = q["choices"] if isinstance(q, dict) else rec["choices"]
        labels = [str(c["label"]) for c in ch]
        texts = [c.get("text") for c in ch]
        gold = _gold_index(rec["answerKey"], labels, len(texts))
    except KeyError as e:
        return RowError(path, line, f"missing field {e}")
    except (TypeError, ValueError) as e:
        return RowError(path, line, str(e))
    item = MCQItem(id=str(rec.get("id", "")), subject=str(rec.get("subject", "arc_challenge")), question=stem,
                   choices=tuple(t if isinstance(t, str) else "" for t in texts), gold=gold, labels=tuple(labels),
                   meta={"source": f"{path}:{line}", "split": split})
    return _finish(item, path, line, seen)


@dataclass
class ColumnMap:
    """How a generic table maps to the item schema.  ``choices`` is either one list-valued column
    or several columns; ``gold`` may hold an index, a letter or a label."""

    question: str = "question"
    choices: str | list[str] = "choices"
    gold: str = "gold"
    id: str | None = "id"
    subject: str | None = "subject"
    labels: str | None = None

    @classmethod
    def parse(cls, spec: dict | str | None) -> "ColumnMap":
        if spec is None:
            return cls()
        if isinstance(spec, str):  # "question=q,choices=a|b|c|d,gold=label"
            d: dict[str, Any] = {}
            for part in spec.split(","):
                k, _, v = part.partition("=")
                d[k.strip()] = v.strip().split("|") if "|" in v else v.strip()
            spec = d
        unknown = set(spec) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"column mapping: unknown key(s) {sorted(unknown)}")
        return cls(**spec)


def _generic_record(rec: dict, cmap: ColumnMap, path: str, line: int, seen: set[str], subject_default: str,
                    split: str) -> MCQItem | RowError:
    if _bad_encoding(rec.values()):
        return RowError(path, line, "bad encoding: the row is not valid UTF-8")
    try:
        if isinstance(cmap.choices, list):
            choices = [rec.get(c) for c in cmap.choices]
        else:
            raw = rec[cmap.choices]
            if isinstance(raw, str):
                try:
                    raw = json.loads(raw)
                except json.JSONDecodeError:
                    return RowError(path, line, f"field {cmap.choices!r}: expected a list of choices, got a string")
            choices = list(raw) if raw is not None else []
        labels = list(rec[cmap.labels]) if cmap.labels and rec.get(cmap.labels) is not None else None
        gold = _gold_index(rec[cmap.gold], labels, len(choices))
        q = rec[cmap.question]
    except KeyError as e:
        return RowError(path, line, f"missing field {e}")
    except (TypeError, ValueError) as e:
        return RowError(path, line, str(e))
    rid = rec.get(cmap.id) if cmap.id else None
    item = MCQItem(id=str(rid) if rid not in (None, "") else f"{Path(path).stem}/{line}",
                   subject=str(rec.get(cmap.subject) or subject_default) if cmap.subject else subject_default,
                   question=q if isinstance(q, str) else "",
                   choices=tuple("" if c is None else str(c) for c in choices), gold=gold,
                   labels=tuple(labels) if labels else None, meta={"source": f"{path}:{line}", "split": split})
    return _finish(item, path, line, seen)


# ---------------------------------------------------------------------------------------------
# Front door
# ---------------------------------------------------------------------------------------------

def detect_format(path: Path) -> str:
    if path.is_dir():
        if any(path.glob("*_test.csv")) or any(path.glob("*_dev.csv")) or any(path.glob("*/*_test.csv")):
            return "mmlu"
        if any(path.glob("*.jsonl")):
            return "arc"
        raise ValueError(f"{path}: cannot tell the format of this folder (no MMLU *_test.csv, no *.jsonl)")
    if path.suffix.lower() == ".jsonl":
        with open(path, "rb") as f:
            first = f.readline()
        try:
            rec = json.loads(first)
            if isinstance(rec, dict) and isinstance(rec.get("question"), dict) and "answerKey" in rec:
                return "arc"
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return "generic"


def _mmlu_index(path: Path) -> list[tuple[Path, str, str]]:
    """(file, subject, split) of every CSV of an MMLU folder (flat, or one sub-folder per split)."""
    out = []
    folders = [path] if any(path.glob("*.csv")) else sorted(p for p in path.iterdir() if p.is_dir())
    for folder in folders:
        for f in sorted(folder.glob("*.csv")):
            stem = f.stem
            subj, _, sp = stem.rpartition("_")
            if not subj:
                subj, sp = stem, folder.name
            out.append((f, subj, sp))
    return out


def mmlu_layout(path: str | Path) -> tuple[list[str], list[str]] | None:
    """(subjects, splits) of an MMLU folder from its file names alone; None when ``path`` is not
    an MMLU folder on this machine."""
    path = Path(path).expanduser()
    try:
        if not path.is_dir() or detect_format(path) != "mmlu":
            return None
    except ValueError:  # a folder of no known format: the loader says so
        return None
    index = _mmlu_index(path)
    return sorted({s for _, s, _ in index}), sorted({sp for _, _, sp in index})


def check_subjects(path: str | Path, subjects: Iterable[str] | None) -> None:
    """A requested subject the MMLU folder lacks is an error listing the valid ones (a filter
    would drop it silently).  Nothing to check for other formats or a missing folder."""
    layout = mmlu_layout(path) if subjects else None
    if layout is None:
        return
    bad = [s for s in subjects if s not in layout[0]]
    if bad:
        raise ValueError(f"unknown subject(s) {bad}; known: {layout[0]}")


def _mmlu_files(path: Path, split: str | None, subjects: list[str] | None) -> list[tuple[Path, str, str]]:
    try:
        check_subjects(path, subjects)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    out = [(f, subj, sp) for f, subj, sp in _mmlu_index(path)
           if (not split or sp == split) and (not subjects or subj in subjects)]
    if not out:
        raise FileNotFoundError(f"{path}: no MMLU CSV files for split={split!r} subjects={subjects}")
    return out


def load_items(path: str | Path, fmt: str = "auto", split: str | None = None, subjects: list[str] | None = None,
               columns: dict | str | None = None, limit: int | None = None, skip_invalid: bool = False,
               subject: str | None = None) -> LoadResult:
    """Load MCQ items from a path (or ``hf://org/name[:config]`` hub id).

    ``fmt``: auto | mmlu | arc | generic | hub.  ``split`` filters MMLU (dev/test/val) and picks
    the ARC/hub split; ``subjects`` filters subjects; ``limit`` caps items per subject (MMLU) or
    per file.  Raises ``DataValidationError`` listing every bad row unless ``skip_invalid``.
    """
    spath = str(path)
    if fmt == "hub" or spath.startswith("hf://"):
        return _load_hub(spath.removeprefix("hf://"), split or "test", columns, limit, skip_invalid)
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    fmt = detect_format(path) if fmt == "auto" else fmt
    seen: set[str] = set()
    results: list[MCQItem | RowError] = []
    files: list[str] = []
    if fmt == "mmlu":
        for f, subj, sp in _mmlu_files(path, split, subjects):
            files.append(str(f))
            got = list(_mmlu_file(f, subj, sp, seen))
            results.extend(got[:limit] if limit else got)
    elif fmt == "arc":
        fs = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        if path.is_dir() and split:
            fs = [f for f in fs if f.stem == split]
        for f in fs:
            files.append(str(f))
            got = [(_arc_record(rec, str(f), n, seen, f.stem) if isinstance(rec, dict) else RowError(str(f), n, rec))
                   for n, rec in jsonl_rows(f)]
            results.extend(got[:limit] if limit else got)
    elif fmt == "generic":
        cmap = ColumnMap.parse(columns)
        files.append(str(path))
        got = []
        for n, rec in _table_rows(path):
            got.append(RowError(str(path), n, rec) if isinstance(rec, str)
                       else _generic_record(rec, cmap, str(path), n, seen, subject or path.stem, split or ""))
        results.extend(got[:limit] if limit else got)
    else:
        raise ValueError(f"unknown format {fmt!r}; use auto, mmlu, arc, generic or hub")
    return _collect(results, files, subjects, skip_invalid)


def _collect(results, files, subjects, skip_invalid) -> LoadResult:
    items = [r for r in results if isinstance(r, MCQItem) and (not subjects or r.subject in subjects)]
    rejects = [r for r in results if isinstance(r, RowError)]
    if rejects and not skip_invalid:
        raise DataValidationError(rejects)
    return LoadResult(items, rejects, files)


def _load_hub(name: str, split: str, columns, limit, skip_invalid) -> LoadResult:
    """A Hugging Face hub dataset (needs `datasets` and a network).  ``name`` may be
    ``org/name:config``.  Columns default to the common ``question/choices/answer`` layout."""
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError("loading from the hub needs `pip install datasets` and a network") from e
    repo, _, config = name.partition(":")
    ds = datasets.load_dataset(repo, config or None, split=split)
    cmap = ColumnMap.parse(columns or {"question": "question", "choices": "choices", "gold": "answer",
                                       "id": None, "subject": "subject"})
    seen: set[str] = set()
    where = f"hf://{name}[{split}]"
    results = [_generic_record(rec, cmap, where, n, seen, repo.split("/")[-1], split)
               for n, rec in enumerate(ds, start=1)]
    return _collect(results[:limit] if limit else results, [where], None, skip_invalid)


def to_ray_dataset(items: list[MCQItem]):
    import ray.data

    from rayeval.data.schema import items_to_arrow

    return ray.data.from_arrow(items_to_arrow(items))


def summarize(items: list[MCQItem]) -> dict[str, Any]:
    return {
        "items": len(items),
        "by_split": dict(sorted(Counter(str(i.meta.get("split", "")) for i in items).items())),
        "subjects": len({i.subject for i in items}),
        "by_subject": dict(sorted(Counter(i.subject for i in items).items())),
        "by_gold_position": dict(sorted(Counter(DEFAULT_LABELS[i.gold] for i in items).items())),
        "by_n_choices": dict(sorted(Counter(i.n_choices for i in items).items())),
    }
