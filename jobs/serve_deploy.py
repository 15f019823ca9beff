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

from _common import main_exit  # also puts the repo on sys.path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/serve_deploy.py", description="deploy a Serve config as a Ray job")
    p.add_argument("--config", required=True, help="Serve config YAML (applications: [{import_path, args, ...}])")
    p.add_argument("--app-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="set args[KEY] of every rayeval application (JSON value)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for RUNNING (model downloads)")
    p.add_argument("--no-wait", action="store_true", help="submit the config and exit")
    return p


def load_deploy_config(path: str, app_args: list[str]):
    """The config validated by Ray Serve's schema, with --app-arg overrides applied
    (``rayeval.serve.deploy.apply_app_args``)."""
    from rayeval.serve.deploy import apply_app_args, load_config, validated

    over = {}
    for kv in app_args:
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"--app-arg wants KEY=VALUE, got {kv!r}")
        try:
            over[k] = json.loads(v)
        except json.JSONDecodeError:
            over[k] = v
    return validated(apply_app_args(load_config(path) or {}, over))


def main(argv: list[str]) -> int:
    """``rayeval.serve.deploy.deploy`` on the job's cluster, then the applications' status."""
    import ray
    from ray import serve

    from rayeval.serve.deploy import deploy

    a = build_parser().parse_args(argv)
    cfg = load_deploy_config(a.config, a.app_arg)
    names = [x.name for x in cfg.applications]
    print(f"[jobs] deploying Serve applications {names}", flush=True)
    try:
        deploy(cfg.model_dump(exclude_unset=True), wait=not a.no_wait, wait_s=a.timeout)
    except (RuntimeError, TimeoutError) as e:
        print(f"[jobs] {e}", file=sys.stderr, flush=True)
        return 1
    apps = serve.status().applications
    status = {n: str(getattr(apps.get(n), "status", "SUBMITTED")) for n in names}
    print(json.dumps({"applications": status}), flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    main_exit(main(sys.argv[1:]))
