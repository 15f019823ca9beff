"""Engines: take a batch of scoring requests, return numbers.  Nothing else talks to a model.

A request is a prompt plus either
  * ``symbols``: return the next-token log-probability of each symbol (one request per prompt), or
  * ``continuations``: return the summed log-likelihood of each continuation after the prompt,
    with its token count.
Scoring methods (symbol / hybrid / cloze) only build requests and reduce these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class ScoreRequest:
    prompt: str
    symbols: tuple[str, ...] | None = None
    continuations: tuple[str, ...] | None = None


@dataclass
class ScoreResult:
    # symbol requests: log P(symbol | prompt) per symbol (first token of " " + symbol)
    symbol_logprobs: list[float] | None = None
    # continuation requests: summed log P(continuation | prompt) and its token count, per continuation
    continuation_logprobs: list[float] | None = None
    continuation_tokens: list[int] | None = None
    extra: dict = field(default_factory=dict)


class Engine(Protocol):
    name: str

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]: ...
