"""Routing data sources by name: the one parser and loader behind ``rayeval route``, Tune, the
Serve gateway's default routers, generation prompts and ``rayeval check``.

    routellm:<mmlu|gsm8k|mt_bench>        RouteLLM's evaluation outcomes (GPT-4 vs Mixtral)
    routerbench:<task>[:<split>]          RouterBench zero-shot outcomes (split: train)
    battles:<file.jsonl>                  pairwise battles (Chatbot-Arena style)
    eval:<rows.parquet | run dir>         gold labels from a rayeval evaluation
    <file.parquet>                        a saved Outcomes or Preferences table
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

KINDS = ("routellm", "routerbench", "battles", "eval")
USAGE = ("routellm:<bench>, routerbench:<task>[:split], battles:<jsonl>, eval:<parquet or run dir>, "
         "or an Outcomes/Preferences parquet")


@dataclass(frozen=True)
class Source:
    kind: str  # routellm | routerbench | battles | eval | file
    name: str  # benchmark, task, or path
    split: str = "train"

    @property
    def path(self) -> Path | None:
        """The file or folder behind it, for the kinds that name one."""
        return Path(self.name).expanduser() if self.kind in ("battles", "eval", "file") else None


def parse_source(spec: str, split: str = "train") -> Source:
    """``spec`` as a :class:`Source`; ``ValueError`` naming the forms it accepts otherwise."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"expected a data source ({USAGE}), got {spec!r}")
    kind, sep, rest = spec.partition(":")
    if sep and kind in KINDS:
        if not rest:
            raise ValueError(f"{spec!r}: {kind}: needs a name after the colon ({USAGE})")
        if kind == "routerbench":
            task, _, sp = rest.partition(":")
            return Source(kind, task, sp or split)
        return Source(kind, rest)
    if Path(spec).suffix == ".parquet":
        return Source("file", spec)
    raise ValueError(f"unknown source {spec!r}: {USAGE}")


def load_source(spec: str | Source, split: str = "train"):
    """The Outcomes or Preferences a source names."""
    from rayeval.prefs import outcomes as P

    s = spec if isinstance(spec, Source) else parse_source(spec, split)
    if s.kind == "routellm":
        return P.load_routellm(s.name)
    if s.kind == "routerbench":
        return P.load_routerbench(s.name, s.split)
    if s.kind == "battles":
        return P.load_battles_jsonl(s.name)
    if s.kind == "eval":
        return P.outcomes_from_eval(s.name)
    if not s.path.exists():
        raise FileNotFoundError(f"{s.name}: no such file")
    import pandas as pd

    cols = pd.read_parquet(s.path).columns
    return P.Outcomes.load(s.path) if any(c.startswith("score::") for c in cols) else P.Preferences.load(s.path)


def load_outcomes(spec: str | Source, what: str = "this step"):
    """:func:`load_source`, refusing Preferences: ``what`` needs per-query outcomes of the strong
    and weak model (APGR, calibration)."""
    from rayeval.prefs.outcomes import Outcomes

    d = load_source(spec)
    if not isinstance(d, Outcomes):
        raise ValueError(f"{spec}: {what} needs per-query outcomes of the strong and weak model (APGR), "
                         f"not {type(d).__name__}")
    return d
