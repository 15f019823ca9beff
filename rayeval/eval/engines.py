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


class FakeEngine:
    """A fast, deterministic test double.  Scores come from a hash of (prompt, option), plus an
    optional additive ``bias`` per symbol position (to imitate selection bias), so the same
    request always gets the same numbers.  Never a stand-in for the real path in the product."""

    name = "fake"

    def __init__(self, bias: Sequence[float] = (), seed: int = 0):
        self.bias = list(bias)
        self.seed = seed
        self.calls = 0

    def _h(self, *parts: str) -> float:
        import hashlib

        h = hashlib.blake2b("\x1f".join((str(self.seed),) + parts).encode(), digest_size=8).digest()
        return -(int.from_bytes(h, "little") / 2**64) * 5.0  # in (-5, 0]

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        self.calls += 1
        out = []
        for r in requests:
            if r.symbols is not None:
                lp = [self._h(r.prompt, s) + (self.bias[i] if i < len(self.bias) else 0.0)
                      for i, s in enumerate(r.symbols)]
                out.append(ScoreResult(symbol_logprobs=lp))
            else:
                conts = r.continuations or ()
                ntok = [max(1, len(c.split())) for c in conts]
                out.append(ScoreResult(continuation_logprobs=[self._h(r.prompt, c) * n for c, n in zip(conts, ntok)],
                                       continuation_tokens=ntok))
        return out
