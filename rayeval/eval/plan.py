"""The grid planner: all the work of an eval config as token jobs, before any engine runs.

    from rayeval.eval.plan import plan_config
    p = plan_config("eval_paper_grid")        # or an EvalConfig; nothing starts, no model loads
    print(p.render())                          # `rayeval plan CONFIG`

For every model (with its own tokenizer and BOS rule, :func:`rayeval.eval.engines._expand`, the
same path its engine takes) the planner counts

  requests           scoring requests (one per work unit and scoring)
  jobs               token jobs (a symbol prompt: 1; hybrid/cloze: 1 per option)
  distinct           jobs left after identical ones collapse (across settings, scorings, rotations)
  tokens requested   sum of every job's length: what an evaluator without sharing computes
  trie minimum       tokens in the prefix trie of the distinct jobs: the least any exact
                     evaluator can compute
  to compute         what rayeval will compute: the trie of each shard's uncached distinct
                     jobs, summed over shards (shards are cut in prompt order, so a shared prefix
                     rarely straddles two)
  cache hits         distinct jobs already in the score cache

and checks every sequence against the model's context length, naming the item, setting and
scoring of each one that does not fit (before Ray starts).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rayeval.eval.tokens import PrefixTrie, unique


@dataclass
class ModelPlan:
    model: str
    requests: int = 0
    jobs: int = 0
    distinct: int = 0
    tokens_requested: int = 0
    tokens_distinct: int = 0
    trie_minimum: int = 0
    to_compute: int = 0
    cache_hits: int = 0
    max_len: int = 0
    context_limit: int = 0
    too_long: list[str] = field(default_factory=list)

    @property
    def sharing(self) -> float:
        return self.tokens_requested / max(self.to_compute, 1)


@dataclass
class GridPlan:
    config: str
    engine: str
    works: int
    shards: int
    models: list[ModelPlan]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for m, md in zip(self.models, d["models"]):
            md["sharing"] = round(m.sharing, 2)
        return d

    def render(self) -> str:
        lines = [f"plan for {self.config}: {self.works} work units in {self.shards} shards, engine {self.engine}",
                 "", "| model | requests | jobs | distinct | tokens requested | trie minimum | to compute | "
                 "requested / to compute | to compute / trie | cache hits | longest / limit |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for m in self.models:
            lines.append(f"| {m.model} | {m.requests:,} | {m.jobs:,} | {m.distinct:,} | {m.tokens_requested:,} | "
                         f"{m.trie_minimum:,} | {m.to_compute:,} | {m.sharing:.2f}x | "
                         f"{m.to_compute / max(m.trie_minimum, 1):.2f}x | {m.cache_hits:,} | "
                         f"{m.max_len} / {m.context_limit or '?'} |")
        for m in self.models:
            for t in m.too_long[:20]:
                lines.append(f"too long for {m.model}: {t}")
        return "\n".join(lines)


class ByteTokenizer:
    """Stand-in tokenizer for models that are not on disk (fake-engine configs): one token per
    UTF-8 byte, so the planner's counts keep their meaning."""

    bos_token_id = None
    add_bos_token = False

    chat_template = "role: content turns"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, **_):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant:" if add_generation_prompt else "")


def load_tokenizer(model: str):
    """(tokenizer, add_bos, context limit) of a model without loading its weights."""
    from rayeval.models import get_spec, resolve_model

    try:
        spec = get_spec(model)
        path = resolve_model(model, prepare=False)
    except (KeyError, FileNotFoundError):
        return ByteTokenizer(), False, 0
    from rayeval.eval.tokenizer import load_tokenizer as load

    tok = load(path)
    limit = 0
    cfg = Path(str(path)) / "config.json"
    if cfg.exists():
        c = json.loads(cfg.read_text())
        c = c.get("text_config", c)
        limit = int(c.get("max_position_embeddings") or 0)
    return tok, spec.add_bos, limit


def plan_works(shards: Sequence[Sequence[Any]], models: Sequence[str], *, config: str = "", engine: str = "",
               context_limit: int | None = None, caches: dict[str, Any] | None = None,
               tokenizers: dict[str, tuple] | None = None, jobs_out: dict[str, list] | None = None) -> GridPlan:
    """The plan of shards of Work (``rayeval.eval.scoring.Work``) for each model.  ``context_limit``
    overrides the model's own (an engine's ``max_model_len``); ``caches`` maps a model to its
    :class:`~rayeval.eval.score_cache.ScoreCache` for hit counts.  ``jobs_out``: filled with each
    model's token jobs (``_expand``'s) per shard and per work of that model, in shard order, for the
    models whose own tokenizer was found (the engines can score them without tokenizing again)."""
    from rayeval.eval.engines import _expand, token_job

    plans = []
    for model in models:
        tok, add_bos, limit = (tokenizers or {}).get(model) or load_tokenizer(model)
        keep = jobs_out is not None and not isinstance(tok, ByteTokenizer)
        if keep:
            jobs_out[model] = []
        limit = int(context_limit or limit or 0)
        mp = ModelPlan(model, context_limit=limit)
        sym_cache: dict = {}
        cache = (caches or {}).get(model)
        seen: set = set()      # distinct jobs of the shards so far (computed once, then reused)
        for shard in shards:
            shard_jobs = []
            if keep:
                jobs_out[model].append([])
            for w in shard:
                if not w.for_model(model):
                    continue
                try:
                    jobs = _expand(w.requests, tok, sym_cache, add_bos)
                except ValueError as e:
                    raise ValueError(f"{model}: {w.dataset}/{w.prompt.item_id} (setting {w.setting}, scoring "
                                     f"{w.scoring.label}): {e}") from None
                mp.requests += len(w.requests)
                if keep:
                    jobs_out[model][-1].append(jobs)
                tjs = [token_job(j) for j in jobs]
                shard_jobs.extend(tjs)
                n = max((len(tj.ids) for tj in tjs), default=0)
                mp.max_len = max(mp.max_len, n)
                if limit and n > limit:
                    mp.too_long.append(f"{w.dataset}/{w.prompt.item_id} (setting {w.setting}, scoring "
                                       f"{w.scoring.label}, rotation {w.rotation}): {n} tokens > {limit}")
            mp.jobs += len(shard_jobs)
            mp.tokens_requested += sum(len(j.ids) for j in shard_jobs)
            todo = [u for u in unique(shard_jobs)[0] if u not in seen]
            seen.update(todo)
            if cache is not None and todo:
                hits = cache.get_many([u.key for u in todo])
                mp.cache_hits += sum(h is not None for h in hits)
                todo = [u for u, h in zip(todo, hits) if h is None]
            mp.to_compute += PrefixTrie([u.ids for u in todo]).size if todo else 0
        mp.distinct = len(seen)
        mp.tokens_distinct = sum(len(u.ids) for u in seen)
        mp.trie_minimum = PrefixTrie([u.ids for u in seen]).size if seen else 0
        plans.append(mp)
    return GridPlan(config, engine, sum(len(s) for s in shards), len(shards), plans)


def plan_config(config: Any, *, engine: dict[str, Any] | None = None, use_cache: bool = True) -> GridPlan:
    """Plan a whole eval config (path, packaged name or EvalConfig) as ``run_eval`` would run it."""
    from rayeval.eval.config import EvalConfig, load_eval_config
    from rayeval.eval.pipeline import build_work, engine_caches, make_shards
    from rayeval.runtime import Execution

    cfg = config if isinstance(config, EvalConfig) else load_eval_config(config)
    ex = Execution.from_engine_dict({**cfg.engine, **(engine or {})})
    works, _ = build_work(cfg)
    shards = make_shards(works, cfg.batch_size)
    caches = engine_caches(cfg, ex) if use_cache else {}
    return plan_works(shards, cfg.models, config=cfg.name, engine=ex.kind,
                      context_limit=ex.engine_kwargs.get("max_model_len"), caches=caches)
