"""The routing path: an embedder deployment (MiniLM, ``@serve.batch``, truncated inputs, LRU cache)
and a router deployment (trained router folders; router choice and thresholds in ``user_config``).

A decision is ``P(strong wins) >= threshold -> strong model`` (the threshold is not part of a router).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from rayeval.route.embed import is_static


def _key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class LRU:
    def __init__(self, size: int):
        self.size, self.d = int(size), OrderedDict()
        self.hits = self.misses = 0

    def get(self, k):
        v = self.d.get(k)
        if v is None:
            self.misses += 1
            return None
        self.hits += 1
        self.d.move_to_end(k)
        return v

    def put(self, k, v):
        if self.size <= 0:
            return
        self.d[k] = v
        if len(self.d) > self.size:
            self.d.popitem(last=False)


class EmbedderCore:
    """sentence-transformers model with input truncation and a text cache (also used by the bench)."""

    def __init__(self, model: str = "minilm-l6", max_seq_length: int | None = 128, cache_size: int = 20000,
                 threads: int | None = None, batch_size: int = 64):
        import torch

        from rayeval.route.embed import new_embedder  # sets HF_HUB_OFFLINE / TOKENIZERS_PARALLELISM

        if threads:
            torch.set_num_threads(int(threads))
        self.model_name = model
        self.model = new_embedder(model)  # own instance: max_seq_length is set on it below
        if max_seq_length:
            self.model.max_seq_length = int(max_seq_length)
        self.batch_size = batch_size
        self.cache = LRU(cache_size)
        self.encoded = 0
        self.encode_s = 0.0       # wall seconds inside model.encode
        self.encode_cpu_s = 0.0   # process CPU seconds inside model.encode (load-independent cost)

    def encode(self, texts: list[str]) -> np.ndarray:
        out: list[np.ndarray | None] = [None] * len(texts)
        todo: dict[bytes, list[int]] = {}
        for i, t in enumerate(texts):
            k = _key(t)
            v = self.cache.get(k)
            if v is None:
                todo.setdefault(k, []).append(i)
            else:
                out[i] = v
        if todo:
            keys = list(todo)
            uniq = [texts[todo[k][0]] for k in keys]
            t0, c0 = time.perf_counter(), time.process_time()
            emb = self.model.encode(uniq, batch_size=self.batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False).astype(np.float32)
            self.encode_s += time.perf_counter() - t0
            self.encode_cpu_s += time.process_time() - c0
            self.encoded += len(uniq)
            for k, e in zip(keys, emb):
                self.cache.put(k, e)
                for i in todo[k]:
                    out[i] = e
        dim = (getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension)()
        return np.stack(out) if out else np.zeros((0, dim), np.float32)


# health_check_period_s=2: the controller notices a crashed replica within 2 s, not Serve's
# default 10 s (which was most of the 13-17 s recovery measured with 10 s); a check costs one RPC.
@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256, max_queued_requests=1024,
                  health_check_timeout_s=60, health_check_period_s=2,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64})
class Embedder:
    """Each call embeds a list of texts; ``@serve.batch`` merges concurrent calls into one encode."""

    def __init__(self, model: str = "minilm-l6", max_seq_length: int | None = 128, cache_size: int = 20000,
                 threads: int | None = None, max_batch_size: int = 64, batch_wait_timeout_s: float = 0.003):
        self.core = EmbedderCore(model, max_seq_length, cache_size, threads)
        self.core.model.encode(["warm-up"], show_progress_bar=False)  # first encode is slow: not on a request
        self.embed.set_max_batch_size(max_batch_size)
        self.embed.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.003)
    async def embed(self, requests: list[list[str]]) -> list[np.ndarray]:
        flat = [t for r in requests for t in r]
        emb = await asyncio.get_running_loop().run_in_executor(None, self.core.encode, flat)
        out, s = [], 0
        for r in requests:
            out.append(emb[s:s + len(r)])
            s += len(r)
        return out

    def stats(self) -> dict:
        c = self.core
        return {"pid": os.getpid(), "encoded": c.encoded, "cache_hits": c.cache.hits, "cache_misses": c.cache.misses,
                "max_seq_length": c.model.max_seq_length, "encode_s": c.encode_s, "encode_cpu_s": c.encode_cpu_s}


async def _await(r):
    return await r


def uses_embedder(r) -> bool:
    """Does the router need the Embedder deployment (a transformer encode)?"""
    return r.needs_embeddings and not is_static(getattr(r, "embedder", ""))


def load_routers(dirs: dict[str, str]) -> dict[str, Any]:
    from rayeval.route.routers import load_router

    return {name: load_router(d) for name, d in dirs.items()}


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256, max_queued_requests=1024,
                  health_check_timeout_s=60, health_check_period_s=2,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64})
class RouterServer:
    """Decides strong vs weak.  ``user_config`` (hot, via ``reconfigure``)::

        routers: {knn: /path/to/router_dir, ...}   # loaded on change
        default_router: knn                         # for model "router" / "auto"
        thresholds: {knn: 0.5, length: 0.5}         # for "router-<name>" without a threshold
        strong_model: gemma3-270m                   # served models behind the router's strong/weak
        weak_model: smollm2-135m
    """

    def __init__(self, embedder=None, defaults: dict | None = None):
        self.embedder = embedder
        self.defaults = dict(defaults or {})
        self.routers: dict[str, Any] = {}
        self.dirs: dict[str, str] = {}
        self.cfg: dict = {}
        self.version = 0
        self.decisions: Counter = Counter()
        self.local: dict[str, EmbedderCore] = {}  # static featurizers, in-replica (set by reconfigure)
        self.reconfigure({})

    def reconfigure(self, user_config: dict | None):
        cfg = {**self.defaults, **(user_config or {})}
        dirs = {str(k): str(v) for k, v in (cfg.get("routers") or {}).items()}
        if dirs != self.dirs:
            loaded = {n: self.routers[n] for n, d in dirs.items() if self.dirs.get(n) == d and n in self.routers}
            loaded.update(load_routers({n: d for n, d in dirs.items() if n not in loaded}))
            self.routers, self.dirs = loaded, dirs
            for r in loaded.values():  # static featurizers live here: load them now, not on a request
                model = getattr(r, "embedder", "")
                if r.needs_embeddings and is_static(model) and model not in self.local:
                    self.local[model] = EmbedderCore(model, max_seq_length=None)
        thr = {str(k): float(v) for k, v in (cfg.get("thresholds") or {}).items()}
        default = cfg.get("default_router") or (next(iter(self.routers)) if self.routers else None)
        if default is not None and default not in self.routers:
            raise ValueError(f"default_router {default!r} is not among the routers {sorted(self.routers)}")
        self.cfg = {"default_router": default, "thresholds": thr, "strong_model": cfg.get("strong_model"),
                    "weak_model": cfg.get("weak_model"), "default_threshold": float(cfg.get("default_threshold", 0.5))}
        self.version += 1

    async def describe(self) -> dict:
        ctx = serve.get_replica_context()
        emb = None
        if self.embedder is not None:
            try:
                emb = await asyncio.wait_for(_await(self.embedder.stats.remote()), 5)
            except Exception as e:  # stats only
                emb = {"error": repr(e)}
        return {"embedder": emb, "pid": os.getpid(), "replica_id": str(ctx.replica_id.unique_id), "config_version": self.version,
                "routers": {n: {"dir": self.dirs[n], "type": type(r).__name__, "needs_embeddings": r.needs_embeddings}
                            for n, r in self.routers.items()},
                **self.cfg, "decisions": {f"{k[0]}:{k[1]}": v for k, v in self.decisions.items()}}

    def threshold_for(self, router: str, threshold: float | None) -> float:
        if threshold is not None:
            return float(threshold)
        return self.cfg["thresholds"].get(router, self.cfg["default_threshold"])

    async def route(self, text: str, router: str | None = None, threshold: float | None = None) -> dict:
        """{router, p, threshold, tier, model, ms}, or {"error": ...} for an unknown router.
        Exceptions mean the routing path failed (the ingress then falls back)."""
        t0 = time.perf_counter()
        name = router or self.cfg["default_router"]
        if name not in self.routers:
            return {"error": f"unknown router {name!r}; serving {sorted(self.routers)}"}
        r = self.routers[name]
        if uses_embedder(r):
            p = float(await self._score_one((name, text)))  # batched: one Embedder call per batch
        else:  # microseconds of work (length, static features): a batch wait would cost more
            emb = await self._embed(r.embedder, [text]) if r.needs_embeddings else None
            p = float(r.win_probability([text], emb)[0])
        thr = self.threshold_for(name, threshold)
        tier = "strong" if p >= thr else "weak"
        self.decisions[(name, tier)] += 1
        return {"router": name, "p": p, "threshold": thr, "tier": tier, "model": self.cfg[f"{tier}_model"],
                "ms": (time.perf_counter() - t0) * 1e3}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def _score_one(self, items: list[tuple[str, str]]) -> list[float]:
        out = np.zeros(len(items))
        by: dict[str, list[int]] = {}
        for i, (n, _) in enumerate(items):
            by.setdefault(n, []).append(i)
        for n, idx in by.items():
            r = self.routers[n]
            texts = [items[i][1] for i in idx]
            emb = None
            if r.needs_embeddings:
                emb = await self._embed(getattr(r, "embedder", "minilm-l6"), texts)
            out[idx] = r.win_probability(texts, emb)
        return out.tolist()

    async def _embed(self, model: str, texts: list[str]) -> np.ndarray:
        """Static featurizers run here, in the router replica (microseconds: a Serve hop would cost
        more than the work); transformer embedders run in the Embedder deployment."""
        if is_static(model):
            return self.local[model].encode(texts)
        if self.embedder is None:
            raise RuntimeError(f"router needs {model!r} embeddings but the graph has no Embedder deployment")
        return await self.embedder.embed.remote(texts)


def routers_root() -> Path:
    from rayeval.config import cache_dir

    p = cache_dir() / "serve" / "routers"
    p.mkdir(parents=True, exist_ok=True)
    return p


def default_router_dir(name: str, data: str = "routellm:mt_bench", params: dict | None = None) -> Path:
    """A small router trained once (at app build time) when the config names no folder.
    ``<router>-static`` (e.g. ``knn-static``) is that router on the static featurizer.

    Trained on RouteLLM's MT-Bench GPT-4-vs-Mixtral data by default (80 prompts: seconds to embed);
    point ``routers: {knn: <dir>}`` at a folder from ``rayeval route train`` for a real one."""
    from rayeval.route.embed import DEFAULT_EMBEDDER, STATIC_SUFFIX
    from rayeval.route.routers import make_router

    kind = name[: -len(STATIC_SUFFIX)] if name.endswith(STATIC_SUFFIX) else name  # knn-static: knn on the static featurizer
    params = dict(params or ({"k": 10} if kind == "knn" else {}))
    if kind != name:
        params.setdefault("embedder", DEFAULT_EMBEDDER + STATIC_SUFFIX)
    tag = hashlib.sha1(f"{name}|{data}|{sorted(params.items())}".encode()).hexdigest()[:10]
    out = routers_root() / f"{name}-{data.replace(':', '_')}-{tag}"
    if (out / "router.json").exists():
        return out
    from rayeval.prefs.sources import load_source

    r = make_router(kind, **params)
    r.fit(load_source(data))
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    r.save(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another builder won
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out
