"""The evaluation pipeline on Ray Data: items -> work (item x setting x scoring) -> shards ->
``map_batches`` over an actor pool (each actor holds one engine per model) -> per-item rows.

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
import logging
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayeval.config import data_root
from rayeval.data.loaders import load_items
from rayeval.data.schema import MCQItem
from rayeval.eval.config import EvalConfig, load_eval_config
from rayeval.eval.scoring import Work, expand, reduce

log = logging.getLogger("rayeval.eval")

# Keys of ``EvalConfig.engine`` that configure execution; every other key goes to the engine.
EXEC_KEYS = ("kind", "actors", "num_cpus", "num_gpus", "resources", "cpu_cores", "max_restarts", "fault")


@dataclass
class Execution:
    kind: str = "vllm"            # vllm | hf | fake
    actors: int = 1               # actor-pool size (one engine per model in each actor)
    num_cpus: float = 1.0         # logical CPUs per actor
    num_gpus: float = 0.0         # GPUs per actor (a cluster: 1, or the tensor-parallel size)
    resources: dict[str, float] = field(default_factory=dict)  # custom resources per actor, e.g. {"gpu_node": 1}
    cpu_cores: dict[str, str] = field(default_factory=dict)  # CPU pinning per model, e.g. {m1: "0", m2: "1"}
    max_restarts: int = 3         # actor restarts after a crash; its batch is retried
    fault: dict[str, Any] = field(default_factory=dict)      # test hook: {"crash_on_shard": k, "marker": path}
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_engine_dict(cls, d: dict[str, Any]) -> "Execution":
        d = dict(d or {})
        ex = {k: d.pop(k) for k in EXEC_KEYS if k in d}
        if "kind" in ex and ex["kind"] not in ("vllm", "hf", "fake"):
            raise ValueError(f"engine.kind: {ex['kind']!r} is not one of vllm, hf, fake")
        return cls(**ex, engine_kwargs=d)


# ----------------------------------------------------------------------------- loading + expansion

def _dataset_path(name: str, path: str | None) -> Path:
    if path:
        return Path(path).expanduser()
    return data_root() / name


def load_config_items(cfg: EvalConfig) -> list[tuple[str, list[MCQItem], list[MCQItem]]]:
    """(dataset name, eval items, dev items) for every dataset in the config."""
    out = []
    for ds in cfg.datasets:
        p = _dataset_path(ds.name, ds.path)
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
    """Deterministic shards: works in a stable order, cut every ``shard_size``."""
    ordered = sorted(works, key=lambda w: w.key)
    return [ordered[i: i + shard_size] for i in range(0, len(ordered), shard_size)]


def fingerprint(cfg: EvalConfig, shards: Sequence[Sequence[Work]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(asdict(cfg), sort_keys=True, default=str).encode())
    for s in shards:
        h.update(repr([w.key for w in s]).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- the actor

def default_cpu_cores(models: Sequence[str]) -> dict[str, str]:
    """On a CPU-only host with several models in one actor, give each engine its own core(s)
    (vLLM pins its OpenMP threads; unpinned engines would all land on core 0)."""
    from rayeval.eval.engines import on_cpu

    if not on_cpu() or len(models) < 2:
        return {}
    avail = sorted(os.sched_getaffinity(0))
    if len(avail) < len(models):
        return {}
    per = len(avail) // len(models)
    out = {}
    for i, m in enumerate(models):
        mine = avail[i * per: (i + 1) * per]
        out[m] = ",".join(str(c) for c in mine)
    return out


class ScoreActor:
    """One engine per model; scores whole shards.  Used as a Ray Data ``map_batches`` class."""

    def __init__(self, models: list[str], execution: dict[str, Any]):
        from rayeval.eval.engines import make_engine

        ex = Execution(**execution)
        self.fault = ex.fault
        self.engines = {}
        cores = default_cpu_cores(models) if ex.kind == "vllm" and not ex.cpu_cores else ex.cpu_cores
        for m in models:
            kw = dict(ex.engine_kwargs)
            if ex.kind == "vllm" and m in cores:
                kw["cpu_cores"] = cores[m]
            self.engines[m] = make_engine(ex.kind, m, kw)
        self.pool = ThreadPoolExecutor(max(1, len(self.engines)))

    def _maybe_crash(self, shard: int) -> None:
        f = self.fault
        if f and int(f.get("crash_on_shard", -1)) == shard:
            marker = Path(f["marker"])
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)  # the process dies as a crashed engine would

    def __call__(self, batch: dict[str, Any]) -> pd.DataFrame:
        rows: list[dict[str, Any]] = []
        for shard, blob in zip(batch["shard"], batch["payload"]):
            shard = int(shard)
            self._maybe_crash(shard)
            works: list[Work] = pickle.loads(blob)
            reqs = [r for w in works for r in w.requests]
            # Engines of different models run side by side (each vLLM engine core is its own
            # process, pinned to its own cores), so one shard costs max(), not sum(), of them.
            scored = list(self.pool.map(lambda eng: eng.score(reqs), self.engines.values()))
            for model, results in zip(self.engines, scored):
                i = 0
                for w in works:
                    n = len(w.requests)
                    row = reduce(w, results[i: i + n], model=model)
                    row["shard"] = shard
                    rows.append(row)
                    i += n
        return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- driver

def _shard_file(out: Path, shard: int) -> Path:
    return out / "shards" / f"part-{shard:05d}.parquet"


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    pq.write_table(table.replace_schema_metadata(None), tmp)
    os.replace(tmp, path)


def read_rows(out_dir: str | Path) -> pd.DataFrame:
    """Every finished shard of a run as one frame."""
    files = sorted((Path(out_dir) / "shards").glob("part-*.parquet"))
    if not files:
        return pd.DataFrame()
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive").to_pandas()


def run_sharded(name: str, payloads: Sequence[Any], actor_cls: type, ctor_kwargs: dict[str, Any], out: Path,
                fp: str, rows_per_shard: Callable[[int], int], ex: Execution, *, resume: bool = True,
                stop_after: int | None = None, address: str | None = None, meta: dict | None = None) -> dict:
    """The execution pattern of every sharded job (evaluation, generation, judging): manifest +
    fingerprint check, skip finished shards, Ray Data actor pool with restarts, atomic shard files
    written by the driver once a shard's rows are all in.  ``actor_cls`` gets batches with columns
    ``shard`` and ``payload`` (pickled) and returns rows with a ``shard`` column.
    Returns {"written", "shards", "complete"}."""
    import ray

    from rayeval.cluster import init_ray

    t0 = time.time()
    (out / "shards").mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.json"
    if manifest.exists() and resume:
        old = json.loads(manifest.read_text())
        if old.get("fingerprint") != fp:
            raise ValueError(f"{out}: holds a run of a different config or data (fingerprint {old.get('fingerprint')}"
                             f" != {fp}); use another --out or --no-resume")
    elif not resume:
        for f in (out / "shards").glob("part-*.parquet"):
            f.unlink()
    manifest.write_text(json.dumps({"name": name, "fingerprint": fp, "shards": len(payloads), **(meta or {})},
                                   indent=1, default=str))
    done = {int(f.stem.split("-")[1]) for f in (out / "shards").glob("part-*.parquet")}
    todo = [i for i in range(len(payloads)) if i not in done]
    print(f"[rayeval] {name}: {len(payloads)} shards; {len(done)} done, {len(todo)} to run", flush=True)
    written = 0
    if todo:
        init_ray(address=address)
        ds = ray.data.from_items([{"shard": i, "payload": pickle.dumps(payloads[i])} for i in todo],
                                 override_num_blocks=len(todo))
        mapped = ds.map_batches(
            actor_cls, fn_constructor_kwargs=ctor_kwargs, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=ex.actors), num_cpus=ex.num_cpus,
            num_gpus=ex.num_gpus or None, resources=ex.resources or None, max_restarts=ex.max_restarts, max_task_retries=-1)
        pending: dict[int, list[pa.Table]] = {}
        for batch in mapped.iter_batches(batch_size=None, batch_format="pyarrow"):
            for shard in sorted(set(batch.column("shard").to_pylist())):
                part = batch.filter(pc.equal(batch.column("shard"), shard))
                pending.setdefault(shard, []).append(part)
                got = pa.concat_tables(pending[shard], promote_options="permissive")
                if got.num_rows == rows_per_shard(shard):
                    _write_atomic(got.drop_columns(["shard"]), _shard_file(out, shard))
                    del pending[shard]
                    written += 1
                    print(f"[rayeval] {name}: shard {shard + 1}/{len(payloads)} done "
                          f"({len(done) + written}/{len(payloads)}, {time.time() - t0:.0f}s)", flush=True)
            if stop_after is not None and written >= stop_after:
                print(f"[rayeval] {name}: stopping after {written} new shard(s) as asked", flush=True)
                return {"written": written, "shards": len(payloads), "complete": False}
    return {"written": written, "shards": len(payloads), "complete": True}



def run_eval(config: str | Path | EvalConfig, out_dir: str | Path, *, engine: dict[str, Any] | None = None,
             resume: bool = True, stop_after: int | None = None, report: bool = True,
             address: str | None = None) -> dict[str, Any]:
    """Run (or resume) an evaluation; returns a summary dict with paths and counts.

    ``engine`` overrides keys of the config's ``engine`` section (e.g. ``{"kind": "fake"}``).
    ``stop_after`` stops after that many newly written shards (simulates an interruption)."""
    cfg = config if isinstance(config, EvalConfig) else load_eval_config(config)
    ex = Execution.from_engine_dict({**cfg.engine, **(engine or {})})
    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    works, questions = build_work(cfg)
    shards = make_shards(works, cfg.batch_size)
    fp = fingerprint(cfg, shards)
    res = run_sharded(cfg.name, shards, ScoreActor, {"models": list(cfg.models), "execution": asdict(ex)}, out, fp,
                      lambda i: len(cfg.models) * len(shards[i]), ex, resume=resume, stop_after=stop_after,
                      address=address, meta={"work_units": len(works), "models": cfg.models})
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
    if report:
        from rayeval.eval.report import write_report

        files_ = write_report(rows, out, title=f"rayeval: {cfg.name}", **cfg.report_kwargs())
        result["report"] = str(files_["report"])
    (out / "run.json").write_text(json.dumps(result, indent=1))
    return result
