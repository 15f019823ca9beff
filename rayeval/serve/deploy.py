"""Deploy a Serve config file the way ``serve run``/``serve deploy`` do (through the controller's
``deploy_apps``), from Python: tests, the workflow and ``python -m rayeval.serve.deploy``.

Config deploys keep Ray's lightweight updates: redeploying with only ``deployments[].user_config``
changed calls ``reconfigure`` on the running replicas instead of restarting them.

    python -m rayeval.serve.deploy serve_configs/local_cpu.yaml --num-cpus 4   # blocks; Ctrl-C stops
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import yaml


# Read by Serve's processes when they start, so set before the local Ray starts (and on a cluster,
# in the environment of `ray start`: cluster.yaml, k8s/rayservice.yaml).
#  * proxy readiness/health checks: Serve's 5/10 s defaults kill the proxy in a loop on a loaded box;
#  * RAY_SERVE_THROUGHPUT_OPTIMIZED (Ray >= 2.56): gRPC between replicas, user code on the replica's
#    own event loop, buffered request logs, and direct ingress: the Ingress replica serves HTTP on
#    its own port (``ingress_urls``) besides the proxy's.  bench/serve_route_http.py (results
#    committed, 2026-12-01): POST /v1/route 59-84/s through the default proxy, 365-402/s direct
#    at p99 23-24 ms (concurrency 4); the deployment handle 186-259/s -> 455-811/s.
SERVE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
             "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def load_config(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def app_config(cfg: dict, name: str | None = None) -> dict:
    apps = cfg["applications"]
    for a in apps:
        if name is None or a.get("name") == name:
            return a
    raise KeyError(f"no application {name!r} in config")


def set_user_config(cfg: dict, deployment: str, user_config: dict, app: str | None = None) -> dict:
    """A copy of ``cfg`` with ``deployment``'s user_config replaced (a hot update)."""
    cfg = copy.deepcopy(cfg)
    a = app_config(cfg, app)
    deps = a.setdefault("deployments", [])
    for d in deps:
        if d.get("name") == deployment:
            d["user_config"] = user_config
            break
    else:
        deps.append({"name": deployment, "user_config": user_config})
    return cfg


RAYEVAL_IMPORT_PREFIX = "rayeval."


def apply_app_args(cfg: dict, overrides: dict[str, Any]) -> dict:
    """A copy of ``cfg`` with ``overrides`` merged into the ``args`` of every rayeval application
    (``import_path`` under ``rayeval.``); other applications are left alone."""
    cfg = copy.deepcopy(cfg)
    for app in cfg.get("applications") or []:
        if overrides and str(app.get("import_path", "")).startswith(RAYEVAL_IMPORT_PREFIX):
            app["args"] = {**(app.get("args") or {}), **overrides}
    return cfg


def validated(cfg: dict):
    """``cfg`` as Ray Serve's ``ServeDeploySchema`` (what ``serve deploy`` and KubeRay take)."""
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(cfg)


def deploy(cfg: dict | str | Path, *, num_cpus: float | None = None, wait_s: float = 600,
           http_port: int | None = None, wait: bool = True) -> dict:
    """Start (or update) Serve with the config, as ``serve deploy`` does (the controller's
    ``deploy_apps``); with ``wait``, block until every application is RUNNING.  The one deploy
    path of the CLI, the workflow, the tests and ``jobs/serve_deploy.py``.

    Starts a local Ray (``rayeval.cluster.init_ray``) when none is connected."""
    import ray
    from ray.serve._private.api import serve_start
    from ray.serve.config import gRPCOptions

    from rayeval.cluster import init_ray

    if not isinstance(cfg, dict):
        cfg = load_config(cfg)
    cfg = copy.deepcopy(cfg)
    if http_port is not None:
        cfg.setdefault("http_options", {})["port"] = int(http_port)
    if not ray.is_initialized():
        for k, v in SERVE_ENV.items():  # inherited by the local Ray's Serve processes
            os.environ.setdefault(k, v)
        init_ray(num_cpus=num_cpus)
    schema = validated(cfg)
    # as `serve run <config>` does (ray/serve/scripts.py)
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
                         grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
                         controller_options=schema.controller_options)
    client.deploy_apps(schema, _blocking=False)
    if wait:
        wait_running([a["name"] for a in cfg["applications"]], wait_s)
    return cfg


def ingress_urls(app: str | None = None, host: str | None = None) -> list[str]:
    """The HTTP servers of ``app``'s Ingress replicas under direct ingress (throughput-optimized
    Serve: one per replica, no proxy hop), from the controller's target groups; empty when direct
    ingress is off or no replica runs yet.  ``host``: the address to put in the URLs (a replica
    binds ``http_options.host``; the controller reports the node's IP)."""
    from ray.serve.context import _get_global_client

    out = []
    for g in _get_global_client().get_serve_details().get("target_groups") or []:
        if str(g.get("protocol", "")).upper().endswith("HTTP") and app in (None, g.get("app_name")):
            out += [f"http://{host or t['ip']}:{t['port']}" for t in g.get("targets") or []
                    if str(t.get("name", "")).startswith("SERVE_REPLICA::")]
    return sorted(out)


def wait_running(app_names: list[str], wait_s: float = 600) -> None:
    from ray import serve

    t0 = time.time()
    while True:
        st = serve.status()
        apps = {n: st.applications.get(n) for n in app_names}
        states = {n: (a.status if a else "MISSING") for n, a in apps.items()}
        if all(s == "RUNNING" for s in states.values()):
            # and no deployment still updating (a hot reconfigure shows UPDATING briefly)
            if all(d.status == "HEALTHY" for a in apps.values() for d in a.deployments.values()):
                return
        bad = {n: a.message for n, a in apps.items() if a and a.status in ("DEPLOY_FAILED", "UNHEALTHY")}
        if bad:
            raise RuntimeError(f"Serve deploy failed: {bad}")
        if time.time() - t0 > wait_s:
            raise TimeoutError(f"Serve apps not RUNNING after {wait_s}s: {states}")
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from ray import serve

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--num-cpus", type=float, default=None, help="logical CPUs of the local Ray (default: cores+2)")
    ap.add_argument("--port", type=int, default=None)
    a = ap.parse_args(argv)

    ncpu = a.num_cpus or float((os.cpu_count() or 1) + 2)
    cfg = deploy(a.config, num_cpus=ncpu, http_port=a.port)
    port = (cfg.get("http_options") or {}).get("port", 8000)
    print(f"[rayeval] serving on http://127.0.0.1:{port}/v1 (Ctrl-C stops)", flush=True)
    host = (cfg.get("http_options") or {}).get("host", "127.0.0.1")
    for name in (x["name"] for x in cfg["applications"]):
        for url in ingress_urls(name, host if host not in ("0.0.0.0", "::") else None):
            print(f"[rayeval] {name}: direct ingress (no proxy hop) on {url}/v1", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
