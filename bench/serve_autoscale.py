"""Autoscaling, observed: a bounded loopback load ramp on ``POST /v1/route`` and the replica counts
Serve itself reports, sampled every half second.

    python bench/serve_autoscale.py --out bench/results/serve-autoscale-DATE-CPU

Deploys serve_configs/local_cpu.yaml on a local Ray (token auth on), then runs three phases
against 127.0.0.1 only: ``calm`` (one client), ``load`` (``--concurrency`` clients until the
Router and the Embedder both run two replicas, or ``--load-s``), ``cool`` (one client again,
until both are back to one replica, or ``--cool-s``).  Each request is a fresh RouteLLM MMLU
question through ``router-knn-0.5`` (MiniLM in the Embedder deployment: both autoscaled
deployments take load; fresh texts miss the embedder's cache).  Records, per phase, requests,
decisions/s, p50/p99 latency and status codes (every request must be 200: scaling up and down
may not fail one), and the replica timeline (RUNNING replicas of Router / Embedder over time).
Bounded: at most ``--max-requests`` requests in all.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid_speed import cpu_info  # noqa: E402
from results_io import deploy_loopback, machine_line, write_results  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # shared box: see tests/test_serve.py

WATCHED = ("Router", "Embedder")


def replica_counts(app: str = "rayeval") -> dict[str, int]:
    """RUNNING replicas per watched deployment, from ``serve.status()``."""
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None:
        return {}
    return {name: int(st.deployments[name].replica_states.get("RUNNING", 0))
            for name in WATCHED if name in st.deployments}


class Timeline(threading.Thread):
    def __init__(self, t0: float, period: float = 0.5):
        super().__init__(daemon=True)
        self.t0, self.period, self.rows, self.stop = t0, period, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.rows.append({"t": round(time.time() - self.t0, 1), **replica_counts()})
            except Exception as e:  # a status call can fail while replicas change; keep sampling
                self.rows.append({"t": round(time.time() - self.t0, 1), "error": repr(e)[:200]})
            self.stop.wait(self.period)

    def last(self) -> dict:
        return next((r for r in reversed(self.rows) if "error" not in r), {})


async def phase(url: str, name: str, prompts, conc: int, until, max_s: float, key: str | None) -> dict:
    import httpx

    lat, codes = [], []
    t_start = time.perf_counter()
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def worker(cl):
        while time.perf_counter() - t_start < max_s and not until():
            try:
                p = next(prompts)
            except StopIteration:
                return
            t0 = time.perf_counter()
            try:
                r = await cl.post(url + "/v1/route", json={"model": "router-knn-0.5",
                                                           "messages": [{"role": "user", "content": p}]})
                codes.append(r.status_code)
            except Exception as e:  # a failed request is a result, not a crash of the bench
                codes.append(type(e).__name__)
            lat.append(time.perf_counter() - t0)

    async with httpx.AsyncClient(timeout=60, headers=headers) as cl:
        await asyncio.gather(*[worker(cl) for _ in range(conc)])
    wall = time.perf_counter() - t_start
    a = np.asarray(lat or [np.nan]) * 1e3
    return {"phase": name, "concurrency": conc, "s": round(wall, 1), "requests": len(lat),
            "decisions_per_s": round(len(lat) / wall, 1), "p50_ms": round(float(np.nanpercentile(a, 50)), 1),
            "p99_ms": round(float(np.nanpercentile(a, 99)), 1),
            "codes": {c: n for c, n in sorted(Counter(map(str, codes)).items())}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="serve_configs/local_cpu.yaml")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--calm-s", type=float, default=15)
    ap.add_argument("--load-s", type=float, default=120, help="longest load phase")
    ap.add_argument("--hold-s", type=float, default=10, help="load kept on after both deployments reached 2")
    ap.add_argument("--cool-s", type=float, default=150, help="longest cool-down phase")
    ap.add_argument("--max-requests", type=int, default=20000)
    ap.add_argument("--out", default=None, help="folder for result.json / result.md")
    args = ap.parse_args()

    from ray import serve

    from rayeval.prefs.outcomes import load_routellm
    from rayeval.serve.deploy import app_config, load_config

    cfg = load_config(args.config)
    a = app_config(cfg)["args"]
    auto = {"Router": (a.get("router_deployment") or {}).get("autoscaling_config"),
            "Embedder": ((a.get("embedder") or {}).get("deployment") or {}).get("autoscaling_config")}
    qs = load_routellm("mmlu").queries["query"].astype(str).tolist()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(qs))
    prompts = iter([qs[i] for i in order[: min(args.max_requests, len(qs))]])  # fresh texts: no cache hits
    key = os.environ.get("RAYEVAL_API_KEY")
    url, up_s = deploy_loopback(args.config)
    print(f"[autoscale] gateway up in {up_s:.0f}s: {replica_counts()}", flush=True)
    tl = Timeline(time.time())
    tl.start()
    phases, marks = [], {}
    try:
        phases.append(asyncio.run(phase(url, "calm", prompts, 1, lambda: False, args.calm_s, key)))
        print(json.dumps(phases[-1]), flush=True)
        both_up: list[float] = []

        def scaled_up():
            c = tl.last()
            if all(c.get(d, 0) >= 2 for d in WATCHED):
                both_up.append(both_up[0] if both_up else time.time())
                return time.time() - both_up[0] >= args.hold_s
            return False

        marks["load_start"] = round(time.time() - tl.t0, 1)
        phases.append(asyncio.run(phase(url, "load", prompts, args.concurrency, scaled_up, args.load_s, key)))
        print(json.dumps(phases[-1]), flush=True)
        marks["cool_start"] = round(time.time() - tl.t0, 1)
        phases.append(asyncio.run(phase(url, "cool", prompts, 1,
                                        lambda: all(tl.last().get(d, 0) == 1 for d in WATCHED), args.cool_s, key)))
        print(json.dumps(phases[-1]), flush=True)
        time.sleep(1)
    finally:
        tl.stop.set()
        serve.shutdown()

    rows = [r for r in tl.rows if "error" not in r]

    def first(pred, after=0.0):
        return next((r["t"] for r in rows if r["t"] >= after and pred(r)), None)

    summary = {d: {"max": max((r.get(d, 0) for r in rows), default=0),
                   "reached_2_s": first(lambda r, d=d: r.get(d, 0) >= 2, marks["load_start"]),
                   "back_to_1_s": first(lambda r, d=d: r.get(d, 0) == 1, marks["cool_start"])} for d in WATCHED}
    failed = sum(n for p in phases for c, n in p["codes"].items() if c != "200")
    res = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_info(),
           "load_average_at_end": os.getloadavg(), "config": args.config, "autoscaling": auto,
           "gateway_up_s": round(up_s, 1), "marks_s": marks, "phases": phases, "replicas": summary,
           "failed_requests": failed, "timeline": tl.rows}
    print(json.dumps({k: res[k] for k in ("replicas", "failed_requests", "marks_s")}), flush=True)
    write_results(args.out, res, render(res), "autoscale")


def render(res: dict) -> str:
    lines = [f"# Serve autoscaling under a loopback load ramp ({res['date']})", "",
             f"{machine_line(res)}; gateway up in {res['gateway_up_s']} s.", "",
             "| phase | clients | s | requests | decisions/s | p50 ms | p99 ms | codes |", "|---|---|---|---|---|---|---|---|"]
    for p in res["phases"]:
        lines.append(f"| {p['phase']} | {p['concurrency']} | {p['s']} | {p['requests']} | {p['decisions_per_s']} | "
                     f"{p['p50_ms']} | {p['p99_ms']} | {p['codes']} |")
    lines += ["", f"Load from t = {res['marks_s']['load_start']} s, cool-down from t = {res['marks_s']['cool_start']} s; "
              f"failed requests: **{res['failed_requests']}**.", "",
              "| deployment | autoscaling_config | max replicas seen | reached 2 at t (s) | back to 1 at t (s) |",
              "|---|---|---|---|---|"]
    for d, s in res["replicas"].items():
        lines.append(f"| {d} | `{json.dumps(res['autoscaling'][d])}` | {s['max']} | {s['reached_2_s']} | {s['back_to_1_s']} |")
    lines += ["", "Replica timeline (RUNNING replicas, sampled every 0.5 s; changes only):", "",
              "| t (s) | Router | Embedder |", "|---|---|---|"]
    prev = None
    for r in res["timeline"]:
        cur = (r.get("Router"), r.get("Embedder"))
        if "error" not in r and cur != prev:
            lines.append(f"| {r['t']} | {cur[0]} | {cur[1]} |")
            prev = cur
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
