"""``ray job submit ... -- python jobs/serve_deploy.py --config serve_configs/<x>.yaml``

Deploy the rayeval Serve app(s) described by a Serve config file (Ray Serve's own
``ServeDeploySchema``: the same file ``serve run`` / ``serve deploy`` and KubeRay's
``serveConfigV2`` take), wait until every application is RUNNING, and exit.  Serve applications
outlive the job; ``serve shutdown`` (or another deploy) replaces them.

    --app-arg 'routers={"knn": "/data/runs/main/router"}'   # override a key of every rayeval
    --app-arg 'thresholds={"knn": 0.3}'                     # app's args (rayeval.serve.app.AppArgs;
                                                            # JSON values)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _common import main_exit  # noqa: F401  (also puts the repo on sys.path)

RAYEVAL_IMPORT_PREFIX = "rayeval."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/serve_deploy.py", description="deploy a Serve config as a Ray job")
    p.add_argument("--config", required=True, help="Serve config YAML (applications: [{import_path, args, ...}])")
    p.add_argument("--app-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="set args[KEY] of every rayeval application (JSON value)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for RUNNING (model downloads)")
    p.add_argument("--no-wait", action="store_true", help="submit the config and exit")
    return p


def load_deploy_config(path: str, app_args: list[str]):
    """The config validated by Ray Serve's schema, with --app-arg overrides applied."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    over = {}
    for kv in app_args:
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"--app-arg wants KEY=VALUE, got {kv!r}")
        try:
            over[k] = json.loads(v)
        except json.JSONDecodeError:
            over[k] = v
    for app in doc.get("applications") or []:
        if over and str(app.get("import_path", "")).startswith(RAYEVAL_IMPORT_PREFIX):
            app["args"] = {**(app.get("args") or {}), **over}
    return ServeDeploySchema.model_validate(doc)


def deploy(config, wait: bool = True, timeout: float = 1800.0) -> dict[str, str]:
    """What ``serve run CONFIG --non-blocking`` does, then wait for the applications' status."""
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions

    from rayeval.cluster import init_ray

    init_ray(namespace="serve")
    client = serve_api.serve_start(http_options=config.http_options.model_dump(),
                                   proxy_location=config.proxy_location,
                                   grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
                                   controller_options=config.controller_options)
    client.deploy_apps(config, _blocking=False)
    names = [a.name for a in config.applications]
    print(f"[jobs] submitted Serve applications {names}", flush=True)
    status: dict[str, str] = {}
    deadline = time.time() + timeout
    while wait:
        apps = serve.status().applications
        status = {n: str(getattr(apps.get(n), "status", "NOT_STARTED")) for n in names}
        if any(s.endswith("DEPLOY_FAILED") for s in status.values()):
            msgs = {n: apps[n].message for n in names if n in apps}
            raise SystemExit(f"Serve deploy failed: {status} {msgs}")
        if all(s.endswith("RUNNING") for s in status.values()):
            break
        if time.time() > deadline:
            raise SystemExit(f"Serve applications not RUNNING after {timeout:.0f}s: {status}")
        time.sleep(5)
    print(json.dumps({"applications": status or {n: "SUBMITTED" for n in names}}), flush=True)
    ray.shutdown()
    return status


if __name__ == "__main__":
    a = build_parser().parse_args(sys.argv[1:])
    deploy(load_deploy_config(a.config, a.app_arg), wait=not a.no_wait, timeout=a.timeout)
