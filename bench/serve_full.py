"""Full path with real models: requests/s and latency through the HTTP gateway, bounded load.

    python bench/serve_full.py --concurrency 1 4 8 --n 24 --max-tokens 16
    python bench/serve_full.py --url http://127.0.0.1:8000 ...   # against a running gateway

Without --url it deploys serve_configs/local_cpu.yaml on a local Ray (engine starts take minutes
here), sends ``--n`` requests per concurrency level to each model name (a forced-strong router
name, a forced-weak one, the default router), only to 127.0.0.1, and reports requests/s, p50/p99
latency, time to first token (streaming) and the status codes (no 5xx expected).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # shared box: see tests/test_serve.py


async def route_level(url: str, model: str, prompts: list[str], conc: int, key: str | None) -> dict:
    """POST /v1/route (decision only) over HTTP."""
    import httpx

    lat, codes, tiers = [], [], {}
    it = iter(prompts)
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def worker(cl):
        for p in it:
            t0 = time.perf_counter()
            r = await cl.post(url + "/v1/route", json={"model": model, "messages": [{"role": "user", "content": p}]})
            lat.append(time.perf_counter() - t0)
            codes.append(r.status_code)
            if r.status_code == 200:
                t = r.json()["tier"]
                tiers[t] = tiers.get(t, 0) + 1

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, headers=headers) as cl:
        await asyncio.gather(*[worker(cl) for _ in range(conc)])
    wall = time.perf_counter() - t0
    a = np.asarray(lat) * 1e3
    return {"route_model": model, "concurrency": conc, "n": len(prompts), "decisions_per_s": len(prompts) / wall,
            "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "codes": {str(c): codes.count(c) for c in sorted(set(codes))}, "tiers": tiers}


async def run_level(url: str, model: str, prompts: list[str], conc: int, max_tokens: int, stream: bool, key: str | None):
    import httpx

    lat, ttft, codes, toks = [], [], [], 0
    it = iter(prompts)
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def worker(cl):
        nonlocal toks
        for p in it:
            body = {"model": model, "max_tokens": max_tokens, "stream": stream,
                    "messages": [{"role": "user", "content": p}]}
            t0 = time.perf_counter()
            if stream:
                async with cl.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    first = None
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and '"content": "' in line and first is None:
                            first = time.perf_counter() - t0
                    codes.append(r.status_code)
                    if first is not None:
                        ttft.append(first)
            else:
                r = await cl.post(url + "/v1/chat/completions", json=body)
                codes.append(r.status_code)
                if r.status_code == 200:
                    toks += r.json()["usage"]["completion_tokens"]
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, headers=headers) as cl:
        await asyncio.gather(*[worker(cl) for _ in range(conc)])
    wall = time.perf_counter() - t0
    a = np.asarray(lat)
    out = {"model": model, "concurrency": conc, "n": len(prompts), "stream": stream, "req_per_s": len(prompts) / wall,
           "p50_s": float(np.percentile(a, 50)), "p99_s": float(np.percentile(a, 99)),
           "codes": {str(c): codes.count(c) for c in sorted(set(codes))}}
    if toks:
        out["completion_tok_per_s"] = toks / wall
    if ttft:
        out["ttft_p50_s"] = float(np.percentile(ttft, 50))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=None)
    ap.add_argument("--models", nargs="+", default=["router-knn-1.01", "router-knn-0.0", "router-knn-0.5"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--route-n", type=int, default=0, help="also time /v1/route with this many prompts per level")
    ap.add_argument("--route-concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--route-models", nargs="+", default=["router-length-0.5", "router-knn-0.5"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.n * len(args.concurrency) * len(args.models) > 2000:
        raise SystemExit("bounded load: at most 2000 requests in one run")
    from rayeval.prefs.outcomes import load_routellm

    qs = load_routellm("mt_bench").queries["query"].astype(str).tolist()
    prompts = [qs[i % len(qs)] for i in range(args.n)]
    key = os.environ.get("RAYEVAL_API_KEY")
    url = args.url
    if url is None:
        from rayeval.serve.deploy import deploy

        t0 = time.time()
        cfg = deploy("serve_configs/local_cpu.yaml", num_cpus=4)
        print(f"[bench] gateway up in {time.time() - t0:.0f}s", flush=True)
        url = f"http://127.0.0.1:{cfg['http_options']['port']}"
    if not url.startswith(("http://127.0.0.1", "http://localhost")):
        raise SystemExit("load tests only against 127.0.0.1")
    rows = []
    if args.route_n:
        for bench in ("mt_bench", "mmlu"):
            bq = load_routellm(bench).queries["query"].astype(str).tolist()
            rng = np.random.default_rng(0)
            for model in args.route_models:
                for conc in args.route_concurrency:
                    # fresh prompts per level (the embedder caches texts)
                    ps = [bq[i] for i in rng.choice(len(bq), args.route_n, replace=args.route_n > len(bq))]
                    r = asyncio.run(route_level(url, model, ps, conc, key))
                    r["prompts"] = bench
                    print(json.dumps(r), flush=True)
                    rows.append(r)
            # the same prompts again: embedder cache hits
            r = asyncio.run(route_level(url, args.route_models[-1], ps, args.route_concurrency[-1], key))
            r.update(prompts=bench, cached=True)
            print(json.dumps(r), flush=True)
            rows.append(r)
    for model in args.models:
        for conc in args.concurrency:
            r = asyncio.run(run_level(url, model, prompts, conc, args.max_tokens, args.stream, key))
            print(json.dumps(r), flush=True)
            rows.append(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    if args.url is None:
        from ray import serve

        serve.shutdown()


if __name__ == "__main__":
    main()
