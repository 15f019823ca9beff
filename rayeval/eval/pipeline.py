"""The evaluation pipeline on Ray Data: items -> work (item x setting x scoring) -> shards ->
``map_batches`` over an actor pool per model (each actor hosts that model's engine; or one pool
of actors hosting every model's, ``engine.pools: shared``) -> per-item rows.

    from rayeval.eval.pipeline import run_eval
    run_eval("eval_small", "runs/small")          # packaged config name or a YAML path

Output directory:
    manifest.json           config fingerprint, shard count, models
    shards/part-NNNNN.parquet  one file per finished shard (written atomically by the driver)
    rows.parquet            every row, exactly once (model x work unit)
    report.md, *.png, metrics.parquet, metrics.json   (rayeval.eval.report)

Resume: a rerun with the same config and output directory computes only the missing shards.
Fault tolerance: actors restart (``max_restarts``) and Ray Data retries their batch; shards are
keyed by id, so a retried batch can never duplicate rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from rayeval.data.loaders import load_items
from rayeval.data.schema import MCQItem
from rayeval.eval.config import EvalConfig, dataset_path, load_eval_config
from rayeval.eval.scoring import Work, expand, reduce
from rayeval.runtime import Execution, ShardActor, read_rows, run_sharded


# ----------------------------------------------------------------------------- loading + expansion

def load_config_items(cfg: EvalConfig) -> list[tuple[str, list[MCQItem], list[MCQItem]]]:
    """(dataset name, eval items, dev items) for every dataset in the config."""
    out = []
    for ds in cfg.datasets:
        p = dataset_path({"name": ds.name, "path": ds.path})
        items = load_items(p, split=ds.split, subjects=ds.subjects, limit=ds.limit).items
        try:
            dev = load_items(p, split=ds.dev_split, subjects=ds.subjects).items if ds.dev_split else []
        except FileNotFoundError:
            dev = []
        if not items:
            raise ValueError(f"dataset {ds.name!r} ({p}, split={ds.split}): no items")
        out.append((ds.name, items, dev))
    return out


def build_work(cfg: EvalConfig) -> tuple[list[Work], dict[tuple[str, str], str]]:
    """Every work unit of the config, and each (dataset, item id)'s question text."""
    works: list[Work] = []
    questions: dict[tuple[str, str], str] = {}
    for name, items, dev in load_config_items(cfg):
        works.extend(expand(items, dev, cfg, dataset=name))
        questions.update({(name, it.id): it.question for it in items})
    return works, questions


def make_shards(works: Sequence[Work], shard_size: int) -> list[list[Work]]:
    """Deterministic shards cut every ``shard_size`` from the works in prompt order: works whose
    prompts share a prefix (a few-shot block, one item's symbol and hybrid prompts, a subject's
    header) land in the same shard, where the engine computes that prefix once."""
    ordered = sorted(works, key=lambda w: (w.dataset, w.requests[0].prompt if w.requests else "", w.key))
    return [ordered[i: i + shard_size] for i in range(0, len(ordered), shard_size)]


def fingerprint(cfg: EvalConfig, shards: Sequence[Sequence[Work]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(asdict(cfg), sort_keys=True, default=str).encode())
    for s in shards:
        h.update(repr([w.key for w in s]).encode())
    return h.hexdigest()[:16]


@dataclass
class ShardPayload:
    """One shard as its actors get it: the works, and for each model whose tokenizer the driver's
    plan loaded, the plan's token jobs of that model's works (one list per work, in order), so the
    engines score them without tokenizing again (:meth:`rayeval.eval.engines.TokenEngine.score`)."""
    works: list[Work]
    jobs: dict[str, list] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the actor

class ScoreActor(ShardActor):
    """One engine per model of ``models``; scores their works of whole shards.  Used as a Ray Data
    ``map_batches`` class.  ``all_models``: every model of the run (default ``models``), whose
    engines share this host's cores, each pool of its own (``execution.pools: model``) or all in
    this actor (``shared``)."""

    def __init__(self, models: list[str], execution: dict[str, Any], all_models: list[str] | None = None):
        t0 = time.perf_counter()
        from rayeval.eval.engines import default_threads, make_engine

        ex = Execution(**execution)
        everyone = list(all_models or models)
        self.fault = ex.fault
        self.engines = {}
        cores = ex.pinning(everyone)
        cache = ex.cache_path()
        for m in models:
            kw = ex.engine_kwargs_for(m, cores)
            if ex.kind == "hf":  # the run's engines run side by side: split the cores between them
                kw.setdefault("num_threads", max(1, default_threads() // len(everyone)))
            if cache and ex.kind != "fake":
                kw["score_cache"] = cache
            self.engines[m] = make_engine(ex.kind, m, kw)
        self.pool = ThreadPoolExecutor(max(1, len(self.engines)))
        self.start_s = time.perf_counter() - t0   # the engines' imports and start, told with the first shard

    def _stats(self) -> dict[str, dict]:
        return {m: dict(getattr(e, "stats", {}) or {}) for m, e in self.engines.items()}

    def _maybe_crash(self, shard: int) -> None:
        """Test hook: ``crash_on_shard`` kills this actor process; ``kill_engine_core_on_shard``
        kills the engine-core processes of its engines (as the OOM killer would), once each."""
        f = self.fault
        if not f or Path(f["marker"]).exists():
            return
        if int(f.get("crash_on_shard", -1)) == shard:
            Path(f["marker"]).write_text(str(os.getpid()))
            os._exit(1)  # the process dies as a crashed engine would
        if int(f.get("kill_engine_core_on_shard", -1)) == shard:
            pids = [p for e in self.engines.values() for p in getattr(e, "engine_core_pids", list)()]
            Path(f["marker"]).write_text(json.dumps(pids))
            for pid in pids:
                os.kill(pid, signal.SIGKILL)

    def _score(self, model: str, works: list[Work], planned: list | None) -> list:
        from rayeval.eval.engines import TokenEngine, shift_jobs

        engine = self.engines[model]
        requests = [r for w in works for r in w.requests]
        if planned is None or not isinstance(engine, TokenEngine):
            return engine.score(requests)
        return engine.score(requests, jobs=shift_jobs(planned, [len(w.requests) for w in works]))

    def process(self, shard: int, payload: ShardPayload) -> list[dict[str, Any]]:
        self._maybe_crash(shard)
        planned = payload.jobs
        mine = {m: [w for w in payload.works if w.for_model(m)] for m in self.engines}
        before, cpu0, t0 = self._stats(), time.process_time(), time.perf_counter()
        # Engines of different models run side by side (each vLLM engine core is its own
        # process, pinned to its own cores), so one shard costs max(), not sum(), of them.
        scored = list(self.pool.map(lambda m: self._score(m, mine[m], planned.get(m)), self.engines))
        after = self._stats()
        start_s, self.start_s = self.start_s, 0.0
        rows = []
        for model, results in zip(self.engines, scored):
            st = {k: v - before[model].get(k, 0) for k, v in after[model].items()}
            st.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - cpu0, works=len(mine[model]),
                      start_s=start_s)
            tag = json.dumps(st)
            i = 0
            for w in mine[model]:
                n = len(w.requests)
                row = reduce(w, results[i: i + n], model=model)
                row["_stats"] = tag
                rows.append(row)
                i += n
        return rows


# ----------------------------------------------------------------------------- driver

def engine_caches(cfg: EvalConfig, ex: Execution) -> dict[str, Any]:
    """The score cache each model's engine will use (none for the fake engine or ``cache: false``)."""
    from rayeval.eval.engines import engine_identity
    from rayeval.eval.score_cache import ScoreCache

    path = ex.cache_path()
    if not path:
        return {}
    return {m: ScoreCache(path, engine_identity(ex.kind, m, ex.engine_kwargs)) for m in cfg.models}


def plan_checked(cfg: EvalConfig, ex: Execution, shards: Sequence[Sequence[Work]], jobs_out: dict | None = None):
    """The grid plan (rayeval.eval.plan); every prompt over a model's context is an error here,
    naming item, setting and scoring, before Ray starts.  ``jobs_out``: see ``plan_works``."""
    from rayeval.eval.config import ConfigError
    from rayeval.eval.plan import plan_works

    limit = ex.engine_kwargs.get("max_model_len")
    try:
        grid = plan_works(shards, cfg.models, config=cfg.name, engine=ex.kind, context_limit=limit,
                          caches=engine_caches(cfg, ex), jobs_out=jobs_out)
    except ValueError as e:  # a request the model's tokenizer cannot encode (a chat turn without a template)
        raise ConfigError(str(e)) from None
    bad = [f"{m.model}: {t}" for m in grid.models for t in m.too_long]
    if bad:
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise ConfigError(f"{len(bad)} prompt(s) do not fit the model's context{more}:\n  " + "\n  ".join(bad[:10]))
    return grid


def accounting(grid, stats: dict[str, dict[str, float]], stages: dict[str, float]) -> dict[str, Any]:
    """What the run asked for and what it computed, per model (plan beside the engines' counters)."""
    out: dict[str, Any] = {"stages": {k: round(v, 1) for k, v in stages.items()}, "models": {}}
    for m in grid.models:
        st = stats.get(m.model, {})
        wall = st.get("compute_s", 0.0)
        out["models"][m.model] = {
            "requests": m.requests, "jobs": m.jobs, "distinct_jobs": m.distinct,
            "tokens_requested": m.tokens_requested, "trie_minimum": m.trie_minimum, "planned_to_compute": m.to_compute,
            "tokens_computed": int(st.get("tokens_computed", 0)), "cache_hits": int(st.get("cache_hits", 0)),
            "cache_misses": int(st.get("distinct_jobs", 0) - st.get("cache_hits", 0)),
            "engine_s": round(wall, 1), "engine_start_s": round(st.get("start_s", 0.0), 1),
            "actor_cpu_s": round(st.get("cpu_s", 0.0), 1),
            "works": int(st.get("works", 0)),
            "questions_per_s": round(st.get("works", 0) / wall, 2) if wall > 0 else None,
        }
    return out


def render_accounting(acct: dict[str, Any]) -> str:
    lines = ["## Work accounting", "",
             "Tokens the grid asks for, the prefix-trie minimum, what the engines computed, score-cache hits, "
             "and time per stage (" + ", ".join(f"{k} {v}" for k, v in acct["stages"].items()) + ").", "",
             "| model | jobs | distinct | tokens requested | trie minimum | computed | cache hits | misses | "
             "engine start s | engine s | questions/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, a in acct["models"].items():
        lines.append(f"| {m} | {a['jobs']:,} | {a['distinct_jobs']:,} | {a['tokens_requested']:,} | "
                     f"{a['trie_minimum']:,} | {a['tokens_computed']:,} | {a['cache_hits']:,} | {a['cache_misses']:,} | "
                     f"{a.get('engine_start_s', '-')} | {a['engine_s']} | {a['questions_per_s'] if a['questions_per_s'] is not None else '-'} |")
    return "\n".join(lines)


def run_eval(config: str | Path | EvalConfig, out_dir: str | Path, *, engine: dict[str, Any] | None = None,
             resume: bool = True, stop_after: int | None = None, report: bool = True,
             address: str | None = None) -> dict[str, Any]:
    """Run (or resume) an evaluation; returns a summary dict with paths and counts.

    ``engine`` overrides keys of the config's ``engine`` section (e.g. ``{"kind": "fake"}``).
    ``stop_after`` stops after that many newly written shards (simulates an interruption)."""
    cfg = config if isinstance(config, EvalConfig) else load_eval_config(config)
    ex = Execution.from_engine_dict({**cfg.engine, **(engine or {})})
    # The cache folder is resolved here, by the driver: actors may run with another environment.
    ex.cache = ex.cache_path() or False
    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    works, questions = build_work(cfg)
    shards = make_shards(works, cfg.batch_size)
    # The plan's token jobs go with the shards, and the engines score them as they are, unless the
    # engine was given a tokenizer other than the model folder's own (the one the plan loads)
    planned: dict[str, list] = {}
    own = not any(k in ex.engine_kwargs for k in ("tokenizer", "tokenizer_mode", "tokenizer_revision"))
    grid = plan_checked(cfg, ex, shards, jobs_out=planned if own else None)
    payloads = [ShardPayload(s, {m: planned[m][i] for m in planned}) for i, s in enumerate(shards)]
    t_plan = time.time() - t0
    fp = fingerprint(cfg, shards)
    # engine.pools (Execution): "model", an actor pool per model; "shared", one pool hosting every engine
    pools = [{"models": [m]} for m in cfg.models] if ex.pools == "model" and len(cfg.models) > 1 else None
    res = run_sharded(cfg.name, payloads, ScoreActor, {"models": list(cfg.models), "execution": asdict(ex),
                                                     "all_models": list(cfg.models)}, out, fp,
                      lambda i: sum(w.for_model(m) for m in cfg.models for w in shards[i]), ex, resume=resume, stop_after=stop_after,
                      address=address, meta={"work_units": len(works), "models": cfg.models}, pools=pools)
    t_eval = time.time() - t0 - t_plan
    written = res["written"]
    if not res["complete"]:
        return {"out": str(out), "complete": False, "written": written, "shards": len(shards)}
    rows = read_rows(out)
    # The question text rides along so the rows are gold preference data for routers as they are.
    rows["question"] = [questions.get((d, i), "") for d, i in zip(rows["dataset"], rows["item_id"])]
    rows = rows.sort_values(["model", "dataset", "setting", "scoring", "item_id", "rotation"], ignore_index=True)
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False).replace_schema_metadata(None),
                   out / "rows.parquet")
    result: dict[str, Any] = {"out": str(out), "complete": True, "written": written, "shards": len(shards),
                              "rows": len(rows), "seconds": round(time.time() - t0, 1)}
    acct = accounting(grid, res.get("stats", {}), {"plan_s": t_plan, "evaluate_s": t_eval})
    if report:
        from rayeval.eval.report import write_report

        t1 = time.time()
        files_ = write_report(rows, out, title=f"rayeval: {cfg.name}", **cfg.report_kwargs())
        acct["stages"]["report_s"] = round(time.time() - t1, 1)
        result["report"] = str(files_["report"])
        with open(files_["report"], "a", encoding="utf-8") as f:
            f.write("\n" + render_accounting(acct) + "\n")
    result["accounting"] = acct
    (out / "run.json").write_text(json.dumps(result, indent=1))
    return result
