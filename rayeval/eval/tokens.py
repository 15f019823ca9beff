"""Token jobs and the prefix trie: the units of work every real engine computes.

A scoring request (``ScoreRequest``: a prompt plus symbols or continuations) becomes one or more
**token jobs** -- a token sequence and what to read from it:

  * next-token job (``cands`` non-empty): log P(c | ids) for each candidate token c, read at the
    last position (symbol scoring: one job per prompt);
  * continuation job (``cands`` empty): sum of log P(ids[p] | ids[:p]) for p in [start, len(ids))
    (hybrid and cloze scoring, and symbols that are not single tokens: one job per option).

Jobs are plain data with a content key, so identical jobs collapse to one (:func:`unique`), a
score cache can be keyed by them, and a :class:`PrefixTrie` over their sequences tells an engine
which tokens are shared: a few-shot block shared by a subject's questions, the prompt shared by its
four hybrid continuations, the symbol prompt that is a prefix of the same item's hybrid context.
Computing each trie node once is the least work any exact evaluator can do on these sequences.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

# Bump when the meaning of a job's value changes: cached values of the old meaning stop matching.
JOB_FORMAT = 1


@dataclass(frozen=True)
class TokenJob:
    ids: tuple[int, ...]
    start: int                      # continuation: first scored position; next-token: len(ids)
    cands: tuple[int, ...] = ()     # next-token candidates (empty: a continuation job)

    @property
    def next_token(self) -> bool:
        return bool(self.cands)

    @property
    def key(self) -> bytes:
        """Content address of the job (16 bytes): same ids, start and candidates, same key."""
        h = hashlib.blake2b(digest_size=16)
        h.update(struct.pack("<iii", JOB_FORMAT, self.start, len(self.cands)))
        h.update(struct.pack(f"<{len(self.cands)}i", *self.cands))
        h.update(struct.pack(f"<{len(self.ids)}i", *self.ids))
        return h.digest()

    def queries(self) -> list[tuple[int, int]]:
        """(position whose next-token distribution is read, token read there)."""
        if self.cands:
            return [(len(self.ids) - 1, c) for c in self.cands]
        return [(p - 1, self.ids[p]) for p in range(self.start, len(self.ids))]


def next_token_job(ids: Sequence[int], cands: Sequence[int]) -> TokenJob:
    if not ids:
        raise ValueError("next-token job: empty prompt")
    return TokenJob(tuple(ids), len(ids), tuple(cands))


def continuation_job(context: Sequence[int], continuation: Sequence[int]) -> TokenJob:
    if not context:
        raise ValueError("continuation job: empty context (the first token has no prediction)")
    if not continuation:
        raise ValueError("continuation job: empty continuation")
    return TokenJob(tuple(context) + tuple(continuation), len(context))


def unique(jobs: Sequence[TokenJob]) -> tuple[list[TokenJob], list[int]]:
    """Distinct jobs (first-seen order) and, for every input job, its index among them."""
    index: dict[TokenJob, int] = {}
    out: list[TokenJob] = []
    where = []
    for j in jobs:
        k = index.get(j)
        if k is None:
            k = index[j] = len(out)
            out.append(j)
        where.append(k)
    return out, where


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixTrie:
    """A compressed trie (radix tree) over token sequences.

    Node 0 is the root (empty).  Every other node owns the tokens ``[lo, hi)`` of the sequences
    below it (``tokens(node)``); ``end[k]`` is the node where sequence k ends.  ``size`` (the
    number of tokens in all nodes) is the minimum number of token positions a causal model must
    compute to process every sequence exactly once."""

    def __init__(self, seqs: Sequence[Sequence[int]]):
        self.seqs = [tuple(s) for s in seqs]
        parent, lo, hi, rep = [-1], [0], [0], [-1]
        end = [0] * len(self.seqs)
        stack = [0]
        prev: tuple[int, ...] | None = None
        prev_k = -1
        for k in sorted(range(len(self.seqs)), key=self.seqs.__getitem__):
            s = self.seqs[k]
            if s == prev:
                end[k] = end[prev_k]
                continue
            l = _lcp(prev, s) if prev is not None else 0
            while len(stack) > 1 and lo[stack[-1]] >= l:
                stack.pop()
            top = stack[-1]
            if hi[top] > l:  # split: a new upper node [lo, l), the old node keeps [l, hi)
                mid = len(parent)
                parent.append(parent[top]); lo.append(lo[top]); hi.append(l); rep.append(rep[top])
                parent[top] = mid
                lo[top] = l
                stack[-1] = top = mid
            if len(s) > l:
                leaf = len(parent)
                parent.append(top); lo.append(l); hi.append(len(s)); rep.append(k)
                stack.append(leaf)
                end[k] = leaf
            else:
                end[k] = top
            prev, prev_k = s, k
        self.parent, self.lo, self.hi, self.rep, self.end = parent, lo, hi, rep, end
        self.children: list[list[int]] = [[] for _ in parent]
        for n in range(1, len(parent)):
            self.children[parent[n]].append(n)
        depth = [0] * len(parent)
        todo = [0]
        while todo:  # parents before children
            n = todo.pop()
            for c in self.children[n]:
                depth[c] = depth[n] + 1
                todo.append(c)
        self.depth = depth

    @classmethod
    def flat(cls, seqs: Sequence[Sequence[int]]) -> "PrefixTrie":
        """One node per sequence, nothing shared: what an engine without prefix reuse computes."""
        t = cls([])
        t.seqs = [tuple(s) for s in seqs]
        n = len(t.seqs)
        t.parent, t.lo, t.rep = [-1] + [0] * n, [0] * (n + 1), [-1] + list(range(n))
        t.hi = [0] + [len(s) for s in t.seqs]
        t.end = list(range(1, n + 1))
        t.children = [list(range(1, n + 1))] + [[] for _ in range(n)]
        t.depth = [0] + [1] * n
        return t

    @property
    def size(self) -> int:
        return sum(h - l for h, l in zip(self.hi, self.lo))

    @property
    def nodes(self) -> int:
        return len(self.parent) - 1

    def tokens(self, node: int) -> tuple[int, ...]:
        return self.seqs[self.rep[node]][self.lo[node]: self.hi[node]] if node else ()

    def path(self, node: int) -> list[int]:
        """Non-root nodes from the top down to ``node``."""
        out = []
        while node > 0:
            out.append(node)
            node = self.parent[node]
        return out[::-1]

    def locate(self, k: int, pos: int) -> tuple[int, int]:
        """(node, offset in that node) of position ``pos`` of sequence k."""
        n = self.end[k]
        while self.lo[n] > pos:
            n = self.parent[n]
        return n, pos - self.lo[n]

    def levels(self) -> list[list[int]]:
        """Non-root nodes grouped by depth, shallowest first (a node's ancestors come earlier)."""
        out: list[list[int]] = [[] for _ in range(max(self.depth, default=0))]
        for n in range(1, len(self.parent)):
            out[self.depth[n] - 1].append(n)
        return out


def trie_size(seqs: Iterable[Sequence[int]]) -> int:
    """Tokens in the prefix trie of these sequences (duplicates count once)."""
    return PrefixTrie(list(seqs)).size
