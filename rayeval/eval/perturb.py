"""Answer-choice perturbations: pure functions ``(item, rng) -> item``.

A perturbation reorders an item's options and/or picks the symbols its prompt will show, and
records what it did in ``item.meta`` so later stages can track the gold answer and undo or
combine orders (CircularEval, PriDe):

  meta["perm"]           new position i shows the ORIGINAL option perm[i] (cumulative)
  meta["orig_gold"]      the gold index before any perturbation
  meta["symbols"]        the symbol shown at each position (absent: the prompt template's default)
  meta["pinned"]         positions that order perturbations leave alone ("all of the above", ...)
  meta["refs_symbols"]   True when an option names other options by letter ("both A and B"):
                         then every position is pinned (order perturbations flag a conflict)
  meta["applied"]        one record per perturbation: {"name", **params, "perm"/"symbols"/...}
  meta["conflicts"]      why a perturbation could not do its job without moving a pinned option

Perturbations are named in configs and built from a spec dict: ``{"name": "fix_gold",
"position": 1, "method": "swap"}``.  ``apply(item, specs, seed)`` derives an independent rng per
(seed, item id, perturbation name, index), so results never depend on order or sharding.  A spec
may carry ``"seed": j`` (a replicate): the random perturbations (``RANDOM``) then draw
independently of replicate 0, which is the spec without it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from rayeval.data.schema import MCQItem

# ----------------------------------------------------------------------------- symbol sets

SYMBOL_SETS: dict[str, tuple[str, ...]] = {
    # the paper's three sets (first four), extended so 5-option ARC items still get a symbol each
    "letters": tuple("ABCDEFGHIJ"),
    "common": ("$", "&", "#", "@", "%", "*"),   # paper: $ & # @
    "rare": ("œ", "§", "З", "ü", "Ð", "¶"),      # paper: œ § З(Cyrillic Ze) ü
    "numbers": tuple("1234567890"),
    "lower": tuple("abcdefghij"),
}


def symbols_for(spec: str | Sequence[str], n: int) -> tuple[str, ...]:
    """The first n symbols of a named set, or of an explicit list."""
    syms = SYMBOL_SETS.get(spec) if isinstance(spec, str) else tuple(str(s) for s in spec)
    if syms is None:
        raise ValueError(f"unknown symbol set {spec!r}; known: {sorted(SYMBOL_SETS)} or a list")
    if len(syms) < n:
        raise ValueError(f"symbol set {spec!r} has {len(syms)} symbols, item needs {n}")
    if len(set(syms[:n])) != n:
        raise ValueError(f"symbol set {spec!r} repeats a symbol")
    return tuple(syms[:n])


# ----------------------------------------------------------------------------- special options

_L = r"\(?[a-j]\)?"
SPECIAL_OPTION = re.compile(
    r"^\s*(?:"
    r"(?:all|none|both|neither|either) of (?:the |these |those )?(?:above|these|those|them|options|choices|answers)\b"
    r"|(?:all|none) (?:the )?above\b"
    r"|(?:all|none|both) of the (?:options|choices|answers|statements)\b.*\b(?:correct|true|false|given|listed)"
    r"|all (?:choices|options|answers) are (?:correct|true|false)"
    rf"|both {_L} and {_L}\W*$"
    rf"|neither {_L} nor {_L}\W*$"
    rf"|{_L}(?:,\s*{_L})*,? and {_L}\W*$"
    r")",
    re.IGNORECASE,
)
REFS_SYMBOLS = re.compile(rf"^\s*(?:both |neither )?{_L}(?:,\s*{_L})*,? (?:and|nor) {_L}\W*$", re.IGNORECASE)


def special_positions(choices: Sequence[str]) -> tuple[int, ...]:
    """Positions of "all/none of the above"-style options (about 4.6% of MMLU test items)."""
    return tuple(i for i, c in enumerate(choices) if SPECIAL_OPTION.search(str(c)))


def init_meta(item: MCQItem) -> MCQItem:
    """Add the bookkeeping keys once; idempotent."""
    if "perm" in item.meta:
        return item
    meta = dict(item.meta)
    meta["perm"] = list(range(item.n_choices))
    meta["orig_gold"] = item.gold
    meta["refs_symbols"] = any(REFS_SYMBOLS.search(str(c)) for c in item.choices)
    # "Both A and B" names other options by position: moving anything would break it, so pin all.
    meta["pinned"] = list(range(item.n_choices)) if meta["refs_symbols"] else list(special_positions(item.choices))
    meta["applied"] = []
    meta["conflicts"] = []
    return item.replace(meta=meta)


# ----------------------------------------------------------------------------- core helpers

def permute(item: MCQItem, perm: Sequence[int], record: dict[str, Any]) -> MCQItem:
    """Reorder options so new position i shows current option perm[i]; track gold and meta."""
    item = init_meta(item)
    perm = [int(p) for p in perm]
    n = item.n_choices
    if sorted(perm) != list(range(n)):
        raise ValueError(f"{record.get('name')}: {perm} is not a permutation of {n} options")
    meta = dict(item.meta)
    meta["perm"] = [meta["perm"][p] for p in perm]
    meta["pinned"] = sorted(perm.index(p) for p in meta["pinned"])
    meta["applied"] = meta["applied"] + [dict(record, perm=perm)]
    return item.replace(choices=tuple(item.choices[p] for p in perm), gold=perm.index(item.gold), meta=meta)


def _note(item: MCQItem, record: dict[str, Any], conflict: str | None = None) -> MCQItem:
    item = init_meta(item)
    meta = dict(item.meta)
    meta["applied"] = meta["applied"] + [record]
    if conflict:
        meta["conflicts"] = meta["conflicts"] + [f"{record['name']}: {conflict}"]
    return item.replace(meta=meta)


def _free(item: MCQItem, keep_special: bool) -> list[int]:
    """Positions an order perturbation may move."""
    pinned = set(item.meta.get("pinned", ())) if keep_special else set()
    return [i for i in range(item.n_choices) if i not in pinned]


def _embed(n: int, free: list[int], sub: Sequence[int]) -> list[int]:
    """A permutation of the free positions (sub indexes into free) as a full permutation."""
    perm = list(range(n))
    for i, j in zip(free, sub):
        perm[i] = free[j]
    return perm


def random_derangement(m: int, rng: np.random.Generator) -> list[int]:
    """A uniformly random permutation of range(m) with no fixed point (m >= 2), by rejection."""
    if m < 2:
        raise ValueError("a derangement needs at least 2 elements")
    while True:
        p = rng.permutation(m).tolist()
        if all(p[i] != i for i in range(m)):
            return p


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Perturbation:
    """A named, parameterised ``(item, rng) -> item``; call it like a function."""

    name: str
    params: dict[str, Any]
    fn: Callable[[MCQItem, np.random.Generator], MCQItem] = field(repr=False, compare=False)
    replicate: int = 0   # the spec's "seed": which independent draw of a random perturbation

    def __call__(self, item: MCQItem, rng: np.random.Generator) -> MCQItem:
        return self.fn(init_meta(item), rng)

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": self.name, **self.params, **({"seed": self.replicate} if self.replicate else {})}


REGISTRY: dict[str, Callable[..., Callable[[MCQItem, np.random.Generator], MCQItem]]] = {}


def register(name: str):
    """Register a factory ``(**params) -> (item, rng) -> item`` under ``name``."""

    def deco(factory):
        REGISTRY[name] = factory
        return factory

    return deco


def build(spec: str | dict[str, Any] | Perturbation) -> Perturbation:
    """A Perturbation from a name or a ``{"name": ..., **params}`` dict (errors name the problem)."""
    if isinstance(spec, Perturbation):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"perturbation spec must be a name or a mapping with 'name', got {spec!r}")
    name = spec["name"]
    params = {k: v for k, v in spec.items() if k not in ("name", "seed")}
    if name not in REGISTRY:
        raise ValueError(f"unknown perturbation {name!r}; known: {sorted(REGISTRY)}")
    replicate = spec.get("seed", 0)
    if isinstance(replicate, bool) or not isinstance(replicate, int) or replicate < 0:
        raise ValueError(f"perturbation {name!r}: seed must be an integer >= 0, got {replicate!r}")
    try:
        fn = REGISTRY[name](**params)
    except TypeError as e:
        raise ValueError(f"perturbation {name!r}: bad parameters {params}: {e}") from e
    return Perturbation(name, params, fn, replicate)


def compose(perturbations: Sequence[str | dict | Perturbation]) -> Perturbation:
    """One perturbation that applies several in order, sharing the given rng."""
    ps = [build(p) for p in perturbations]

    def fn(item: MCQItem, rng: np.random.Generator) -> MCQItem:
        for p in ps:
            item = p(item, rng)
        return item

    return Perturbation("compose", {"steps": [p.spec for p in ps]}, fn)


# Perturbations that draw from their rng: the ones a setting can repeat under several seeds.
RANDOM = frozenset({"shuffle", "derange", "shuffle_symbols"})


def item_rng(seed: int, item_id: str, name: str, index: int = 0, replicate: int = 0) -> np.random.Generator:
    """An rng that depends only on (seed, item id, perturbation name, its index in the list) and,
    when not 0, the replicate."""
    key = f"{seed}\x1f{item_id}\x1f{name}\x1f{index}" + (f"\x1f{replicate}" if replicate else "")
    h = hashlib.blake2b(key.encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(h, "little"))


def apply(item: MCQItem, specs: Sequence[str | dict | Perturbation], seed: int) -> MCQItem:
    """Apply a list of perturbations to one item, each with its own derived rng."""
    item = init_meta(item)
    for i, spec in enumerate(specs):
        p = build(spec)
        item = p(item, item_rng(seed, item.id, p.name, i, p.replicate))
    return item


def spec_key(spec: str | dict) -> str:
    """A stable string for a spec (for logs and hashing)."""
    return json.dumps(spec if isinstance(spec, dict) else {"name": spec}, sort_keys=True, ensure_ascii=False)


# ----------------------------------------------------------------------------- order perturbations

@register("identity")
def _identity():
    return lambda item, rng: _note(item, {"name": "identity"})


@register("swap")
def _swap(i: int = 0, j: int = 1, keep_special: bool = True):
    """Swap two fixed positions (negative indexes count from the end)."""

    def fn(item, rng):
        n = item.n_choices
        a, b = i % n, j % n
        rec = {"name": "swap", "i": i, "j": j}
        free = _free(item, keep_special)
        if a in free and b in free:
            perm = list(range(n))
            perm[a], perm[b] = perm[b], perm[a]
            return permute(item, perm, rec)
        return _note(item, rec, f"position {a} or {b} is pinned")

    return fn


@register("shuffle")
def _shuffle(keep_special: bool = True):
    """Uniformly random order of the option texts (pinned options stay)."""

    def fn(item, rng):
        free = _free(item, keep_special)
        if len(free) < 2:
            return _note(item, {"name": "shuffle"}, f"only {len(free)} movable option(s)")
        sub = rng.permutation(len(free)).tolist()
        return permute(item, _embed(item.n_choices, free, sub), {"name": "shuffle"})

    return fn


@register("derange")
def _derange(keep_special: bool = True):
    """Random order in which no (free) option keeps its place."""

    def fn(item, rng):
        free = _free(item, keep_special)
        rec = {"name": "derange"}
        if len(free) < 2:
            return _note(item, rec, f"only {len(free)} movable option(s)")
        return permute(item, _embed(item.n_choices, free, random_derangement(len(free), rng)), rec)

    return fn


def _rotation(n: int, free: list[int], r: int) -> list[int]:
    """Rotate free positions by r: the option at free[j] moves to free[(j + r) % m]."""
    m = len(free)
    return _embed(n, free, [(k - r) % m for k in range(m)])


@register("rotate")
def _rotate(r: int = 1, keep_special: bool = True):
    """Cyclic rotation by r: option at position j moves to (j + r) mod n (CircularEval, PriDe)."""

    def fn(item, rng):
        free = _free(item, keep_special)
        if len(free) < 2:
            return _note(item, {"name": "rotate", "r": r}, f"only {len(free)} movable option(s)")
        return permute(item, _rotation(item.n_choices, free, r), {"name": "rotate", "r": r})

    return fn


@register("fix_gold")
def _fix_gold(position: int = 0, method: str = "swap", keep_special: bool = True):
    """Move the gold option to ``position``: swap it with the option there (the paper) or rotate."""
    if method not in ("swap", "rotate"):
        raise TypeError(f"method must be 'swap' or 'rotate', got {method!r}")

    def fn(item, rng):
        n = item.n_choices
        rec = {"name": "fix_gold", "position": position, "method": method}
        if not -n <= position < n:
            return _note(item, rec, f"position {position} does not exist with {n} options")
        k = position % n
        free = _free(item, keep_special)
        if item.gold == k:
            return permute(item, list(range(n)), rec)
        if item.gold not in free or k not in free:
            why = "gold option is pinned" if item.gold not in free else f"position {k} is pinned"
            return _note(item, rec, why)
        if method == "swap":
            perm = list(range(n))
            perm[k], perm[item.gold] = item.gold, k
        else:
            perm = _rotation(n, free, free.index(k) - free.index(item.gold))
        return permute(item, perm, rec)

    return fn


# ----------------------------------------------------------------------------- symbol perturbations

@register("symbols")
def _symbols(set: str | list = "letters"):  # noqa: A002 - "set" reads best in configs
    """Show these symbols: a named set (letters, common, rare, ...) or an explicit list."""
    if not isinstance(set, (str, list, tuple)):
        raise TypeError(f"set must be a name or a list, got {set!r}")

    def fn(item, rng):
        syms = symbols_for(set, item.n_choices)
        item = _note(item, {"name": "symbols", "set": set, "symbols": list(syms)})
        return item.replace(meta={**item.meta, "symbols": list(syms)})

    return fn


@register("shuffle_symbols")
def _shuffle_symbols(set: str | list | None = None):  # noqa: A002
    """Randomly assign the current (or given) symbols to positions; option texts stay."""

    def fn(item, rng):
        n = item.n_choices
        base = symbols_for(set, n) if set is not None else tuple(item.meta.get("symbols") or SYMBOL_SETS["letters"][:n])
        order = rng.permutation(n).tolist()
        syms = [base[o] for o in order]
        item = _note(item, {"name": "shuffle_symbols", "set": set, "symbols": syms, "symbol_perm": order})
        return item.replace(meta={**item.meta, "symbols": syms})

    return fn


@register("symbol_order")
def _symbol_order(order: list[int] | None = None, set: str | list | None = None):  # noqa: A002
    """A fixed reassignment of symbols to positions (position i shows base symbol order[i])."""

    def fn(item, rng):
        n = item.n_choices
        base = symbols_for(set, n) if set is not None else tuple(item.meta.get("symbols") or SYMBOL_SETS["letters"][:n])
        o = list(order) if order is not None else list(reversed(range(n)))
        if sorted(o[:n]) != list(range(n)):
            return _note(item, {"name": "symbol_order", "order": o}, f"order {o} is not a permutation of {n}")
        syms = [base[i] for i in o[:n]]
        item = _note(item, {"name": "symbol_order", "order": o[:n], "symbols": syms})
        return item.replace(meta={**item.meta, "symbols": syms})

    return fn


def gold_text(item: MCQItem) -> str:
    return item.choices[item.gold]
