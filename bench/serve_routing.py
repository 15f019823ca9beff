"""Routing-only path (embedder + router deployments, no LLM): decisions/s and latency.

    python bench/serve_routing.py --router knn --concurrency 1 8 32 64 --n 600
    python bench/serve_routing.py --quality        # APGR of each embedder setting on RouteLLM MMLU
    python bench/serve_routing.py --cpu-cost       # CPU ms per decision step (load-independent)
    python bench/serve_routing.py --router knn-static --n 2000 --concurrency 1 16 64 128
                                                   # static featurizer, computed in the Router replica

Drives the Router deployment through a DeploymentHandle (what the ingress does); the HTTP routing
path (``/v1/route`` of the full gateway) is timed by ``bench/serve_full.py --route-n``.
Prompts: RouteLLM MT-Bench (long, chatty) and MMLU (question + 4 options) prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def prompts(kind: str, n: int, seed: int = 0) -> list[str]:
    from rayeval.prefs.outcomes import load_routellm

    q = load_routellm(kind).queries["query"].astype(str).tolist()
    rng = np.random.default_rng(seed)
    return [q[i] for i in rng.choice(len(q), size=n, replace=n > len(q))]


async def drive(call, texts: list[str], conc: int) -> dict:
    lat = []
    it = iter(range(len(texts)))
    errors = 0

    async def worker():
        nonlocal errors
        for i in it:
            t0 = time.perf_counter()
            try:
                await call(texts[i])
            except Exception:
                errors += 1
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(conc)])
    wall = time.perf_counter() - t0
    a = np.asarray(lat) * 1e3
    return {"concurrency": conc, "n": len(texts), "decisions_per_s": len(texts) / wall,
            "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "errors": errors}


def bench_handle(args) -> list[dict]:
    from ray import serve

    from rayeval.cluster import init_ray
    from rayeval.serve.app import parse_args, router_dirs
    from rayeval.serve.routing import Embedder, RouterServer

    init_ray(num_cpus=4, log_to_driver=False)
    a = parse_args({})
    rows = []
    for msl in args.max_seq_length:
        emb = Embedder.options(name="Embedder").bind(max_seq_length=msl or None, cache_size=args.cache_size,
                                                     threads=args.threads, max_batch_size=args.batch)
        defaults = {"routers": router_dirs(a), "default_router": args.router, "thresholds": {},
                    "strong_model": a.strong_model, "weak_model": a.weak_model}
        h = serve.run(RouterServer.options(name="Router").bind(emb, defaults), name="routing",
                      route_prefix=None)
        for kind in args.prompts:
            texts = prompts(kind, args.n)

            async def call(t):
                d = await h.route.remote(t, args.router, 0.5)
                if "error" in d:
                    raise RuntimeError(d["error"])

            asyncio.run(drive(call, texts[:32], 8))  # warm-up (also fills the text cache: use fresh texts below)
            for conc in args.concurrency:
                fresh = prompts(kind, args.n, seed=1000 + conc) if args.cache_size else texts
                e0 = h.describe.remote().result()["embedder"] or {}
                r = asyncio.run(drive(call, fresh, conc))
                e1 = h.describe.remote().result()["embedder"] or {}
                if e1.get("encoded", 0) > e0.get("encoded", 0):
                    n_enc = e1["encoded"] - e0["encoded"]
                    r["embedder_cpu_ms_per_text"] = 1e3 * (e1["encode_cpu_s"] - e0["encode_cpu_s"]) / n_enc
                    r["embedder_wall_ms_per_text"] = 1e3 * (e1["encode_s"] - e0["encode_s"]) / n_enc
                r.update(router=args.router, prompts=kind, max_seq_length=msl, path="handle")
                print(json.dumps(r), flush=True)
                rows.append(r)
        serve.delete("routing")
    serve.shutdown()
    return rows


def quality(args) -> list[dict]:
    """Routing quality vs featurizer cost: cross-fitted APGR on a RouteLLM MMLU sample for kNN on
    MiniLM embeddings at several input truncations and on the static featurizer, the prompt-length
    router, and random."""
    from rayeval.route.evaluate import cross_val_apgr
    from rayeval.prefs.outcomes import load_routellm
    from rayeval.serve.routing import EmbedderCore

    rows = []
    for bench in args.quality_bench:
        oc = load_routellm(bench)
        idx = np.sort(np.random.default_rng(0).choice(len(oc), size=min(args.quality_n, len(oc)), replace=False))
        oc = oc.subset(idx)
        texts = oc.texts
        featurizers = [("knn", "minilm-l6", msl) for msl in args.quality_lengths] + [("knn-static", "minilm-l6-static", 0)]
        for label, model, msl in featurizers:
            core = EmbedderCore(model, max_seq_length=msl or None, cache_size=0, threads=args.threads)
            core.encode(texts[:64])  # warm-up
            t0, c0 = time.perf_counter(), time.process_time()
            emb = core.encode(texts)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            for params in ({"k": 50}, {"k": 10}):
                r = {"bench": bench, "n": len(texts), "router": f"{label}(k={params['k']})",
                     "max_seq_length": msl or core.model.max_seq_length, "encode_per_s": len(texts) / dt,
                     "encode_cpu_ms_per_prompt": 1e3 * cpu / len(texts),
                     "apgr": cross_val_apgr("knn", params, oc, emb)}
                print(json.dumps(r), flush=True)
                rows.append(r)
        for name in ("length", "random"):
            r = {"bench": bench, "n": len(texts), "router": name, "max_seq_length": None, "encode_per_s": None,
                 "apgr": cross_val_apgr(name, {}, oc)}
            print(json.dumps(r), flush=True)
            rows.append(r)
    return rows


def cpu_cost(args) -> list[dict]:
    """Load-independent cost of one decision: process CPU ms per prompt (1 torch thread, batch 64)
    for MiniLM encodes at several truncations, a cache hit, the kNN lookup and the length router."""
    from rayeval.route.routers import load_router
    from rayeval.serve.app import parse_args, router_dirs
    from rayeval.serve.routing import EmbedderCore

    dirs = router_dirs(parse_args({}))
    knn, length, knn_static = (load_router(dirs[n]) for n in ("knn", "length", "knn-static"))
    rows = []
    for kind in args.prompts:
        texts = prompts(kind, 128)
        r = {"prompts": kind}
        for msl in (128, 64):
            core = EmbedderCore(max_seq_length=msl, cache_size=1000, threads=1)
            core.encode(texts[:8])
            core.cache = type(core.cache)(1000)
            c0 = time.process_time()
            e = core.encode(texts)
            r[f"encode_{msl}_cpu_ms"] = 1e3 * (time.process_time() - c0) / len(texts)
            c0 = time.process_time()
            core.encode(texts)
            r["cache_hit_cpu_ms"] = 1e3 * (time.process_time() - c0) / len(texts)
            c0 = time.process_time()
            knn.win_probability(texts, e)
            r["knn_cpu_ms"] = 1e3 * (time.process_time() - c0) / len(texts)
        core = EmbedderCore("minilm-l6-static", max_seq_length=None, cache_size=0)
        core.encode(texts[:8])
        c0 = time.process_time()
        e = core.encode(texts)
        r["static_encode_cpu_ms"] = 1e3 * (time.process_time() - c0) / len(texts)
        c0 = time.process_time()
        knn_static.win_probability(texts, e)
        r["knn_static_cpu_ms"] = 1e3 * (time.process_time() - c0) / len(texts)
        c0 = time.process_time()
        length.win_probability(texts)
        r["length_cpu_ms"] = 1e3 * (time.process_time() - c0) / len(texts)
        print(json.dumps(r), flush=True)
        rows.append(r)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--router", default="knn")
    ap.add_argument("--prompts", nargs="+", default=["mt_bench", "mmlu"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--max-seq-length", type=int, nargs="+", default=[128])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-size", type=int, default=0, help="0: measure encodes, not cache hits")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quality", action="store_true", help="APGR of each featurizer setting instead of speed")
    ap.add_argument("--quality-bench", nargs="+", default=["mmlu"])
    ap.add_argument("--quality-n", type=int, default=1500)
    ap.add_argument("--quality-lengths", type=int, nargs="+", default=[0, 128, 64, 32],
                    help="MiniLM max_seq_length (0: the model's own, 256)")
    ap.add_argument("--cpu-cost", action="store_true", help="CPU ms per decision step (load-independent)")
    args = ap.parse_args()
    rows = quality(args) if args.quality else cpu_cost(args) if args.cpu_cost else bench_handle(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
