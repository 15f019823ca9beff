"""The one multiple-choice item schema every stage shares, and its validation errors."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

DEFAULT_LABELS = tuple("ABCDEFGHIJ")


@dataclass(frozen=True)
class MCQItem:
    """One multiple-choice question.

    ``choices`` has any length >= 2; ``gold`` indexes into it.  ``labels`` are the symbols the
    source used (e.g. ARC's "1".."4"); prompts choose their own symbols, so labels are metadata.
    ``meta`` carries free-form provenance (source file, line) and perturbation bookkeeping.
    """

    id: str
    subject: str
    question: str
    choices: tuple[str, ...]
    gold: int
    labels: tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # Normalise lists to tuples so items are hashable-ish and immutable.
        object.__setattr__(self, "choices", tuple(self.choices))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(self.labels))

    @property
    def n_choices(self) -> int:
        return len(self.choices)

    def problems(self) -> list[str]:
        """Every reason this item is invalid (empty when valid)."""
        out = []
        if not str(self.id).strip():
            out.append("empty id")
        if not self.question or not self.question.strip():
            out.append("empty question")
        if len(self.choices) < 2:
            out.append(f"needs at least 2 choices, got {len(self.choices)}")
        for i, c in enumerate(self.choices):
            if c is None or not str(c).strip():
                out.append(f"choice {i} is missing or empty")
        if not isinstance(self.gold, int) or not (0 <= self.gold < max(len(self.choices), 1)):
            out.append(f"gold {self.gold!r} out of range for {len(self.choices)} choices")
        if self.labels is not None and len(self.labels) != len(self.choices):
            out.append(f"{len(self.labels)} labels for {len(self.choices)} choices")
        return out

    def replace(self, **kw: Any) -> "MCQItem":
        d = {f: getattr(self, f) for f in ("id", "subject", "question", "choices", "gold", "labels", "meta")}
        d.update(kw)
        return MCQItem(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["choices"] = list(self.choices)
        d["labels"] = list(self.labels) if self.labels is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MCQItem":
        return cls(
            id=str(d["id"]),
            subject=str(d.get("subject") or ""),
            question=d["question"],
            choices=tuple(d["choices"]),
            gold=int(d["gold"]),
            labels=tuple(d["labels"]) if d.get("labels") is not None else None,
            meta=dict(d.get("meta") or {}),
        )


ARROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("subject", pa.string()),
        ("question", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("gold", pa.int32()),
        ("labels", pa.list_(pa.string())),
        ("source", pa.string()),
    ]
)


def items_to_arrow(items: list[MCQItem]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "id": it.id,
                "subject": it.subject,
                "question": it.question,
                "choices": list(it.choices),
                "gold": it.gold,
                "labels": list(it.labels) if it.labels is not None else None,
                "source": str(it.meta.get("source", "")),
            }
            for it in items
        ],
        schema=ARROW_SCHEMA,
    )


def items_from_arrow(table: pa.Table) -> list[MCQItem]:
    out = []
    for r in table.to_pylist():
        out.append(
            MCQItem(
                id=r["id"], subject=r["subject"], question=r["question"], choices=tuple(r["choices"]),
                gold=int(r["gold"]), labels=tuple(r["labels"]) if r.get("labels") else None,
                meta={"source": r.get("source") or ""},
            )
        )
    return out


@dataclass(frozen=True)
class RowError:
    """One bad input row: where (file, line) and what is wrong."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class DataValidationError(ValueError):
    """Raised when input rows are malformed; carries every bad row, not only the first."""

    def __init__(self, errors: list[RowError]):
        self.errors = list(errors)
        shown = "\n".join(str(e) for e in self.errors[:50])
        more = f"\n... and {len(self.errors) - 50} more" if len(self.errors) > 50 else ""
        super().__init__(f"{len(self.errors)} invalid row(s):\n{shown}{more}")
