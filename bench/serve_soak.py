"""A bounded soak of the full Serve graph: chat and route requests at fixed rates for a few
minutes, loopback only, stopping by itself.

    python bench/serve_soak.py --minutes 3 --route-rate 10 --chat-rate 0.5 \
        --out bench/results/serve-soak-DATE-CPU

Deploys serve_configs/local_cpu.yaml on a local Ray (token auth on), then sends open-loop
arrivals (a request starts on schedule whether or not earlier ones finished; at most
``--max-in-flight`` at once, a request that would exceed it counts as ``shed``):
``POST /v1/route`` with ``router-knn-static-0.5`` and ``router-knn-0.5`` in turn (fresh RouteLLM
MMLU questions), and ``POST /v1/chat/completions`` through ``router-knn-0.5`` (MT-Bench prompts,
both models reached).  Records per kind: requests, status codes, lost requests (no response
within the client timeout, or a dropped connection), p50/p99 latency; and every Serve replica's
resident memory (with its child processes: a vLLM engine core) at start and end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid_speed import cpu_info  # noqa: E402
from results_io import deploy_loopback, machine_line, write_results  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # shared box: see tests/test_serve.py


def replica_memory() -> dict[str, float]:
    """MiB resident per Serve replica process (``ray::ServeReplica:<app>:<deployment>``), its
    children included."""
    import psutil

    out: dict[str, float] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if not cmd.startswith("ray::ServeReplica:"):
            continue
        name = cmd.split()[0].split(":", 2)[-1]
        try:
            rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
        except psutil.Error:
            continue
        key = name if name not in out else f"{name}#{p.info['pid']}"
        out[key] = round(rss / 2**20, 1)
    return dict(sorted(out.items()))


async def soak(url: str, key: str | None, seconds: float, route_rate: float, chat_rate: float,
               max_in_flight: int, timeout: float) -> dict:
    import httpx

    from rayeval.prefs.outcomes import load_routellm

    mmlu = load_routellm("mmlu").queries["query"].astype(str).tolist()
    mt = load_routellm("mt_bench").queries["query"].astype(str).tolist()
    rng = np.random.default_rng(0)
    order = iter(rng.permutation(len(mmlu)).tolist() * 2)
    res: dict[str, list] = {"route": [], "chat": []}
    shed: Counter = Counter()
    in_flight = 0
    models: Counter = Counter()

    async def one(cl, kind: str, i: int):
        nonlocal in_flight
        if kind == "route":
            body = {"model": ("router-knn-static-0.5", "router-knn-0.5")[i % 2],
                    "messages": [{"role": "user", "content": mmlu[next(order)]}]}
            path = "/v1/route"
        else:
            body = {"model": "router-knn-0.5", "max_tokens": 16,
                    "messages": [{"role": "user", "content": mt[i % len(mt)]}]}
            path = "/v1/chat/completions"
        t0 = time.perf_counter()
        try:
            r = await cl.post(url + path, json=body)
            code = r.status_code
            if kind == "chat" and code == 200:
                models[r.headers.get("x-rayeval-served-by", "?")] += 1
        except Exception as e:  # no answer within the timeout, or a dropped connection: lost
            code = f"lost:{type(e).__name__}"
        res[kind].append((code, time.perf_counter() - t0))
        in_flight -= 1

    async def arrivals(cl, kind: str, rate: float, tasks: list):
        if rate <= 0:
            return
        t_start, i = time.perf_counter(), 0
        while True:
            due = t_start + i / rate
            if due - t_start >= seconds:
                return
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            nonlocal in_flight
            if in_flight >= max_in_flight:
                shed[kind] += 1
            else:
                in_flight += 1
                tasks.append(asyncio.create_task(one(cl, kind, i)))
            i += 1

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    tasks: list = []
    async with httpx.AsyncClient(timeout=timeout, headers=headers, limits=limits) as cl:
        await asyncio.gather(arrivals(cl, "route", route_rate, tasks), arrivals(cl, "chat", chat_rate, tasks))
        await asyncio.gather(*tasks)
    out = {}
    for kind, items in res.items():
        codes = Counter(str(c) for c, _ in items)
        lat = np.asarray([d for c, d in items if c == 200] or [np.nan]) * 1e3
        out[kind] = {"requests": len(items), "codes": dict(sorted(codes.items())), "shed": shed[kind],
                     "lost": sum(n for c, n in codes.items() if c.startswith("lost")),
                     "5xx": sum(n for c, n in codes.items() if c.isdigit() and int(c) >= 500),
                     "p50_ms": round(float(np.nanpercentile(lat, 50)), 1),
                     "p99_ms": round(float(np.nanpercentile(lat, 99)), 1)}
    out["chat"]["served_by"] = dict(models)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="serve_configs/local_cpu.yaml")
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--route-rate", type=float, default=10.0, help="route requests per second")
    ap.add_argument("--chat-rate", type=float, default=0.5, help="chat requests per second")
    ap.add_argument("--max-in-flight", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.minutes > 15 or args.route_rate > 500 or args.chat_rate > 20:
        raise SystemExit("bounded soak: at most 15 minutes, 500 route/s, 20 chat/s")

    from ray import serve

    key = os.environ.get("RAYEVAL_API_KEY")
    url, up_s = deploy_loopback(args.config)
    mem0 = replica_memory()
    print(f"[soak] gateway up in {up_s:.0f}s; replicas {mem0}", flush=True)
    try:
        t1 = time.time()
        kinds = asyncio.run(soak(url, key, args.minutes * 60, args.route_rate, args.chat_rate,
                                 args.max_in_flight, args.timeout))
        wall = time.time() - t1
        mem1 = replica_memory()
    finally:
        serve.shutdown()
    res = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_info(),
           "load_average_at_end": os.getloadavg(), "config": args.config, "gateway_up_s": round(up_s, 1),
           "seconds": round(wall, 1), "rates": {"route": args.route_rate, "chat": args.chat_rate},
           "max_in_flight": args.max_in_flight, "timeout_s": args.timeout, "kinds": kinds,
           "memory_mib": {"start": mem0, "end": mem1}}
    print(json.dumps({k: res[k] for k in ("seconds", "kinds", "memory_mib")}), flush=True)
    write_results(args.out, res, render(res), "soak")


def render(res: dict) -> str:
    lines = [f"# Serve soak ({res['date']})", "",
             f"{machine_line(res)}; {res['seconds']} s at {res['rates']['route']} route/s + {res['rates']['chat']} chat/s "
             f"(open loop, at most {res['max_in_flight']} in flight, client timeout {res['timeout_s']} s).", "",
             "| kind | requests | codes | shed | lost | 5xx | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|---|"]
    for k, v in res["kinds"].items():
        lines.append(f"| {k} | {v['requests']} | {v['codes']} | {v['shed']} | {v['lost']} | {v['5xx']} | "
                     f"{v['p50_ms']} | {v['p99_ms']} |")
    lines += ["", f"Chat answers by model: {res['kinds']['chat'].get('served_by')}.", "",
              "| replica | MiB at start | MiB at end |", "|---|---|---|"]
    m0, m1 = res["memory_mib"]["start"], res["memory_mib"]["end"]
    for name in sorted(set(m0) | set(m1)):
        lines.append(f"| {name} | {m0.get(name, '-')} | {m1.get(name, '-')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
