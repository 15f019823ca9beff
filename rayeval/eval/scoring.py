"""Scoring methods, and the expand / reduce pair the pipeline loops over.

Three methods, one interface (``build_requests(prompt)`` and ``reduce(prompt, results)``):
  symbol  options shown; ONE request: next-token logprob of each symbol after "Answer:"
  hybrid  options shown; log-likelihood of each option text as the continuation
  cloze   options hidden; "Answer:" then each option text
Length normalisation (hybrid, cloze): score = logprob / length, length in tokens, characters or
bytes of the continuation; all three are kept in the output, ``normalize`` picks the one used for
the prediction ("none" = raw logprob).  No engine calls here.

The pipeline is a thin loop:

    works = expand(items, dev_items, config)               # or expand_item per batch
    for w in works:
        results = engine.score(w.requests)
        rows.append(reduce(w, results, model=engine.name))
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from rayeval.data.schema import MCQItem
from rayeval.eval import perturb
from rayeval.eval.engines import ScoreRequest, ScoreResult
from rayeval.eval.prompts import Prompt, build_prompt

NORMALIZATIONS = ("none", "tokens", "chars", "bytes")


def _argmax(xs: Sequence[float]) -> int:
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def _norm(raw: Sequence[float], lengths: Sequence[int]) -> list[float]:
    return [r / max(int(n), 1) for r, n in zip(raw, lengths)]


@dataclass(frozen=True)
class Scoring:
    """One scoring method.  ``name`` in {symbol, hybrid, cloze}; ``normalize`` for the prediction."""

    name: str = "symbol"
    normalize: str = "tokens"
    continuation_prefix: str = " "   # between the cue and the option text

    def __post_init__(self) -> None:
        if self.name not in ("symbol", "hybrid", "cloze"):
            raise ValueError(f"scoring: unknown method {self.name!r}; expected symbol, hybrid or cloze")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"scoring.normalize: {self.normalize!r} is not one of {NORMALIZATIONS}")

    @property
    def label(self) -> str:
        """Name for tables: 'symbol', 'hybrid', 'cloze' (+ '/chars' when not the default norm)."""
        return self.name if self.name == "symbol" or self.normalize == "tokens" else f"{self.name}/{self.normalize}"

    def continuations(self, prompt: Prompt) -> tuple[str, ...]:
        return tuple(self.continuation_prefix + o for o in prompt.options)

    def build_requests(self, prompt: Prompt) -> list[ScoreRequest]:
        if self.name == "symbol":
            return [ScoreRequest(prompt=prompt.text, symbols=tuple(prompt.symbols), chat=prompt.messages or None)]
        if self.name == "hybrid":
            text, chat = prompt.text, prompt.messages
        else:
            text, chat = prompt.cloze_text, prompt.cloze_messages
        return [ScoreRequest(prompt=text, continuations=self.continuations(prompt), chat=chat or None)]

    def reduce(self, prompt: Prompt, results: Sequence[ScoreResult]) -> dict[str, Any]:
        if len(results) != 1:
            raise ValueError(f"{self.name}: expected 1 result for item {prompt.item_id}, got {len(results)}")
        r = results[0]
        n = len(prompt.options)
        if self.name == "symbol":
            raw = list(r.symbol_logprobs or [])
            texts = list(prompt.symbols)
            tokens = [1] * n
        else:
            raw = list(r.continuation_logprobs or [])
            texts = list(self.continuations(prompt))
            tokens = list(r.continuation_tokens or [max(1, len(t.split())) for t in texts])
        if len(raw) != n or len(tokens) != n:
            raise ValueError(f"{self.name}: item {prompt.item_id} has {n} options but the engine returned "
                             f"{len(raw)} scores / {len(tokens)} token counts")
        raw = [float(x) if x is not None and not math.isnan(x) else -math.inf for x in raw]
        chars = [len(t.strip()) for t in texts]
        nbytes = [len(t.strip().encode("utf-8")) for t in texts]
        by_norm = {"none": raw, "tokens": _norm(raw, tokens), "chars": _norm(raw, chars), "bytes": _norm(raw, nbytes)}
        use = "none" if self.name == "symbol" else self.normalize
        scores = by_norm[use]
        pred = _argmax(scores)
        return {
            "per_option_scores": scores,
            "per_option_raw_logprob": raw,
            "per_option_score_tokens": by_norm["tokens"],
            "per_option_score_chars": by_norm["chars"],
            "per_option_score_bytes": by_norm["bytes"],
            "tokens": tokens,
            "chars": chars,
            "bytes": nbytes,
            "normalize": use,
            "prediction": pred,
            "correct": bool(pred == prompt.gold),
            "pred_none": _argmax(by_norm["none"]),
            "pred_tokens": _argmax(by_norm["tokens"]),
            "pred_chars": _argmax(by_norm["chars"]),
            "pred_bytes": _argmax(by_norm["bytes"]),
        }


def get_scoring(spec: "str | dict | Scoring") -> Scoring:
    if isinstance(spec, Scoring):
        return spec
    if isinstance(spec, str):
        return Scoring(name=spec)
    if isinstance(spec, dict):
        unknown = set(spec) - {"name", "normalize", "continuation_prefix"}
        if unknown:
            raise ValueError(f"scoring: unknown key(s) {sorted(unknown)}; expected name, normalize, continuation_prefix")
        return Scoring(**spec)
    raise ValueError(f"scoring: expected a name or a mapping, got {spec!r}")


# ----------------------------------------------------------------------------- expand / reduce

@dataclass
class Work:
    """One (item, setting, rotation, scoring) unit: the prompt and the requests to score."""

    dataset: str
    setting: str
    scoring: Scoring
    rotation: int
    prompt: Prompt
    requests: list[ScoreRequest] = field(default_factory=list)
    models: tuple[str, ...] | None = None   # the models that score it (None: every model of the run)

    def for_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def key(self) -> tuple:
        return (self.dataset, self.setting, self.scoring.label, self.prompt.item_id, self.rotation)


def in_calibration(item_id: str, seed: int, fraction: float) -> bool:
    """Deterministic, order-free choice of a ``fraction`` of items (PriDe calibration, cyclic runs)."""
    if fraction >= 1:
        return True
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}\x1fcalib\x1f{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def rotations_for(item: MCQItem, cyclic: float | bool | None, seed: int) -> list[int]:
    """Which cyclic rotations of this item to evaluate: [0], or all of them for chosen items.
    (Pinned "all of the above" options stay put, so with m < n movable options some of the n
    rotations repeat an order.)"""
    frac = 1.0 if cyclic is True else float(cyclic or 0)
    if frac > 0 and in_calibration(item.id, seed, frac):
        return list(range(item.n_choices))
    return [0]


def expand_item(item: MCQItem, setting: Any, scorings: Sequence[Any], dev_items: Sequence[MCQItem] = (),
                seed: int = 0, dataset: str = "", default_template: str = "mmlu") -> list[Work]:
    """All Work for one item under one setting (a config.Setting or a dict with the same keys:
    name, perturbations, template, shots, cyclic).  ``default_template`` serves settings naming none."""
    get = setting.get if isinstance(setting, dict) else lambda k, d=None: getattr(setting, k, d)
    name = get("name", "baseline")
    perturbed = perturb.apply(item, list(get("perturbations", None) or []), seed)
    out = []
    for r in rotations_for(perturbed, get("cyclic", None), seed):
        it = perturbed if r == 0 else perturb.build({"name": "rotate", "r": r})(perturbed, None)
        prompt = build_prompt(it, get("template", None) or default_template, get("shots", None), dev_items, seed,
                              chat=get("chat", None))
        models = get("models", None)
        for sc in scorings:
            sc = get_scoring(sc)
            if r and sc.name == "cloze":
                continue  # cloze never shows the options: every rotation would score the same
            out.append(Work(dataset, name, sc, r, prompt, sc.build_requests(prompt),
                            tuple(models) if models else None))
    return out


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def settings_for(config: Any, dataset: str = "") -> list[Any]:
    """The config's settings that apply to this dataset."""
    out = []
    for st in _get(config, "settings") or [{"name": "baseline"}]:
        only = _get(st, "datasets")
        if not only or dataset in only:
            out.append(st)
    return out


def scorings_for(config: Any, setting: Any) -> list[Scoring]:
    """The config's scorings that this setting runs (all unless it lists some)."""
    scs = [get_scoring(s) for s in (_get(config, "scorings") or ["symbol"])]
    only = _get(setting, "scorings")
    return [s for s in scs if s.label in only] if only else scs


def expand(items: Sequence[MCQItem], dev_items: Sequence[MCQItem], config: Any, dataset: str = "") -> list[Work]:
    """Every Work for these items under every setting and scoring of an EvalConfig (or dict).

    ``dataset`` names the config's dataset entry the items come from: it picks the settings that
    apply and the default template.  Pure: call it per batch of items, in any order."""
    seed = int(_get(config, "seed", 0) or 0)
    template = "mmlu"
    for ds in _get(config, "datasets") or []:
        if _get(ds, "name") == dataset:
            template = _get(ds, "template") or "mmlu"
    out = []
    for setting in settings_for(config, dataset):
        scs = scorings_for(config, setting)
        for item in items:
            out.extend(expand_item(item, setting, scs, dev_items, seed, dataset, template))
    return out


def _prompt_sha(r: ScoreRequest) -> str:
    h = hashlib.sha1(r.prompt.encode())
    if r.chat:
        h.update(repr(r.chat).encode())
    return h.hexdigest()[:12]


def reduce(work: Work, results: Sequence[ScoreResult], model: str = "") -> dict[str, Any]:
    """One output row (flat dict; lists for per-option columns) from a Work and its results."""
    p = work.prompt
    a = p.applied
    row = {
        "model": model,
        "dataset": work.dataset,
        "setting": work.setting,
        "scoring": work.scoring.label,
        "item_id": p.item_id,
        "subject": p.subject,
        "rotation": work.rotation,
        "n_options": len(p.options),
        "gold": p.gold,
        "orig_gold": a["orig_gold"],
        "perm": list(a["perm"]),
        "symbols": list(p.symbols),
        "template": a["template"],
        "shots": a["shots"]["k"] if a["shots"]["source"] not in ("self_correct", "self_incorrect") else 1,
        "shots_source": a["shots"]["source"],
        # gold position a fix_gold perturbation forced (-1: none, or it could not: see conflict)
        "forced_gold": p.gold if any(r.get("name") == "fix_gold" for r in a["perturbations"])
        and not any(c.startswith("fix_gold") for c in a["conflicts"]) else -1,
        "conflict": bool(a["conflicts"]),
        "special": bool(a["pinned"]),
        "refs_symbols": a["refs_symbols"],
        "chat": a.get("chat") or "",
        "prompt_sha": _prompt_sha(work.requests[0]) if work.requests else "",
    }
    row.update(work.scoring.reduce(p, results))
    return row


def flatten(works: Sequence[Work]) -> list[ScoreRequest]:
    """All requests of many works, in order, for one big ``engine.score`` call."""
    return [r for w in works for r in w.requests]


def reduce_all(works: Sequence[Work], results: Sequence[ScoreResult], model: str = "") -> list[dict[str, Any]]:
    """Rows from the results of ``engine.score(flatten(works))``."""
    n = sum(len(w.requests) for w in works)
    if len(results) != n:
        raise ValueError(f"expected {n} results for {len(works)} works, got {len(results)}")
    rows, k = [], 0
    for w in works:
        rows.append(reduce(w, results[k:k + len(w.requests)], model))
        k += len(w.requests)
    return rows


ROW_COLUMNS = (
    "model", "dataset", "setting", "scoring", "item_id", "subject", "rotation", "n_options", "gold", "orig_gold",
    "perm", "symbols", "template", "shots", "shots_source", "forced_gold", "conflict", "special", "refs_symbols", "chat", "prompt_sha",
    "per_option_scores", "per_option_raw_logprob", "per_option_score_tokens", "per_option_score_chars",
    "per_option_score_bytes", "tokens", "chars", "bytes", "normalize", "prediction", "correct",
    "pred_none", "pred_tokens", "pred_chars", "pred_bytes",
)
