"""The sharded-job runner shared by evaluation, generation and judging.

A job is a list of payloads (one per shard).  :func:`run_sharded` writes a manifest with the job's
fingerprint, skips shards already on disk, maps the rest over a Ray Data actor pool (actors
restart after a crash and their shard is retried) and writes each shard's rows atomically from
the driver once all of them are in, so rows land exactly once.  Actors subclass
:class:`ShardActor`: they hold their engines and turn one payload into rows.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayeval.runtime.execution import Execution


def crash_only(call: Callable) -> Callable:
    """For the batch method of a sharded actor: when an engine's worker process died, the engine
    cannot be used again, so the actor process exits.  Ray restarts the actor (``max_restarts``) and
    retries its shard; the driver writes each shard once, atomically, so rows land exactly once."""
    from rayeval.eval.engines import engine_died

    @functools.wraps(call)
    def wrapped(self, batch):
        try:
            return call(self, batch)
        except Exception as e:
            if not engine_died(e):
                raise
            print(f"[rayeval] actor pid {os.getpid()}: {e}; exiting so that Ray restarts this actor and "
                  f"retries its shard", file=sys.stderr, flush=True)
            os._exit(70)
    return wrapped


class ShardActor:
    """Base of the sharded jobs' Ray Data actors: batches of ``shard`` + pickled ``payload`` in,
    rows (with their ``shard``) out.  Subclasses build their engines in ``__init__`` and implement
    :meth:`process`; an engine death exits the actor (:func:`crash_only`) so Ray retries the shard."""

    def process(self, shard: int, payload: Any) -> list[dict[str, Any]]:
        raise NotImplementedError

    @crash_only
    def __call__(self, batch: dict[str, Any]) -> pd.DataFrame:
        rows: list[dict[str, Any]] = []
        for shard, blob in zip(batch["shard"], batch["payload"]):
            for row in self.process(int(shard), pickle.loads(blob)):
                row["shard"] = int(shard)
                rows.append(row)
        return pd.DataFrame(rows)


def shard_file(out: Path, shard: int) -> Path:
    return out / "shards" / f"part-{shard:05d}.parquet"


def write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    pq.write_table(table.replace_schema_metadata(None), tmp)
    os.replace(tmp, path)


def write_parquet(df: pd.DataFrame, path: Path) -> Path:
    """A job's final table, written atomically (its folder made if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(pa.Table.from_pandas(df, preserve_index=False), path)
    return path


def digest(*parts: Any) -> str:
    """A short fingerprint of a job's inputs (JSON of each part, keys sorted) for its manifest."""
    import hashlib

    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def read_rows(out_dir: str | Path) -> pd.DataFrame:
    """Every finished shard of a run as one frame."""
    files = sorted((Path(out_dir) / "shards").glob("part-*.parquet"))
    if not files:
        return pd.DataFrame()
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive").to_pandas()


def run_sharded(name: str, payloads: Sequence[Any], actor_cls: type, ctor_kwargs: dict[str, Any], out: Path,
                fp: str, rows_per_shard: Callable[[int], int], ex: Execution, *, resume: bool = True,
                stop_after: int | None = None, address: str | None = None, meta: dict | None = None,
                pools: Sequence[dict[str, Any]] | None = None) -> dict:
    """The execution pattern of every sharded job (evaluation, generation, judging): manifest +
    fingerprint check, skip finished shards, Ray Data actor pool with restarts, atomic shard files
    written by the driver once a shard's rows are all in.  ``actor_cls`` gets batches with columns
    ``shard`` and ``payload`` (pickled) and returns rows with a ``shard`` column.

    ``pools``: several actor pools side by side, each over every shard, its actors built with
    ``ctor_kwargs`` updated by its entry (evaluation: a pool per model, each actor hosting one
    model's engine; a shard is done when every pool's rows of it are in).  The execution's
    per-actor resources are then shared: each pool's actors get ``1 / len(pools)`` of them, so the
    job asks for what one pool of actors hosting every engine would.
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
    stats: dict[str, dict[str, float]] = {}
    if todo:
        init_ray(address=address)
        ds = ray.data.from_items([{"shard": i, "payload": pickle.dumps(payloads[i])} for i in todo],
                                 override_num_blocks=len(todo))
        split = list(pools) if pools else [{}]
        share = 1.0 / len(split)
        branches = [ds.map_batches(
            actor_cls, fn_constructor_kwargs={**ctor_kwargs, **extra}, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=ex.actors), num_cpus=ex.num_cpus * share,
            num_gpus=ex.num_gpus * share or None, resources={k: v * share for k, v in ex.resources.items()} or None,
            max_restarts=ex.max_restarts, max_task_retries=-1) for extra in split]
        mapped = branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
        pending: dict[int, list[pa.Table]] = {}
        for batch in mapped.iter_batches(batch_size=None, batch_format="pyarrow"):
            for shard in sorted(set(batch.column("shard").to_pylist())):
                part = batch.filter(pc.equal(batch.column("shard"), shard))
                pending.setdefault(shard, []).append(part)
                got = pa.concat_tables(pending[shard], promote_options="permissive")
                if got.num_rows == rows_per_shard(shard):
                    if "_stats" in got.column_names:
                        add_stats(stats, got)
                        got = got.drop_columns(["_stats"])
                    write_atomic(got.drop_columns(["shard"]), shard_file(out, shard))
                    del pending[shard]
                    written += 1
                    print(f"[rayeval] {name}: shard {shard + 1}/{len(payloads)} done "
                          f"({len(done) + written}/{len(payloads)}, {time.time() - t0:.0f}s)", flush=True)
            if stop_after is not None and written >= stop_after:
                print(f"[rayeval] {name}: stopping after {written} new shard(s) as asked", flush=True)
                return {"written": written, "shards": len(payloads), "complete": False, "stats": stats}
    return {"written": written, "shards": len(payloads), "complete": True, "stats": stats}


def add_stats(acc: dict[str, dict[str, float]], table: pa.Table) -> None:
    """Sum the per-shard engine counters (one JSON per model and shard, on each of its rows)."""
    cols = table.column_names
    models = table.column("model").to_pylist() if "model" in cols else [""] * table.num_rows
    for model, tag in sorted(set(zip(models, table.column("_stats").to_pylist()))):
        dst = acc.setdefault(model, {})
        for k, v in json.loads(tag).items():
            dst[k] = dst.get(k, 0) + v
