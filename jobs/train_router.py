"""``ray job submit ... -- python jobs/train_router.py --config router.yaml``

Fit a router and (optionally) calibrate its thresholds = ``rayeval route train ROUTER --data D
--out DIR -p k=v ...`` then ``rayeval route calibrate DIR --data C -t share ... --out DIR/thresholds.json``.

    router: knn
    data: eval:/data/runs/paper_grid/rows.parquet     # or routellm:mmlu, an Outcomes parquet, ...
    out: /data/runs/main/router
    params: {k: 10}
    calibrate:                                         # optional
      data: routellm:mmlu
      targets: [0.25, 0.5, 0.75]
"""


import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from _common import load_config, main_exit, pick, run_cli


class Calibrate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: Optional[str] = None      # default: the training data
    targets: list[float] = []       # strong-model shares
    out: Optional[str] = None       # default: <out>/thresholds.json


class TrainRouterJob(BaseModel):
    """The job's YAML (router/data/out may come from flags instead)."""

    model_config = ConfigDict(extra="forbid")
    router: Optional[str] = None
    data: Optional[str] = None
    out: Optional[str] = None
    params: dict[str, Any] = {}     # checked against the router's own parameters below
    calibrate: Optional[Calibrate] = None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/train_router.py", description="rayeval route train (+ calibrate) as a Ray job")
    p.add_argument("--config", help="YAML with router / data / out / params / calibrate")
    p.add_argument("--router", help="router name (rayeval route list)")
    p.add_argument("--data", help="training source")
    p.add_argument("--out", help="router folder")
    p.add_argument("--param", "-p", action="append", help="hyperparameter key=value (JSON values)")
    return p


def check_router(router: str, params: list[str], config: str | None) -> None:
    """The router and its parameters as ``rayeval route train`` will parse them (``--param k=v``,
    JSON values) must construct: an unknown router or parameter is an error here, before the job
    loads any data (``rayeval.check.router_problems``)."""
    import typer

    from rayeval.check import router_problems
    from rayeval.route.cli import _params

    where = f"{config}: " if config else ""
    try:
        parsed = _params(params)
    except typer.BadParameter as e:
        raise SystemExit(f"jobs/train_router.py: {e}") from None
    bad = router_problems(router, parsed, f"{where}router", f"{where}params")
    if bad:
        raise SystemExit("jobs/train_router.py: " + "\njobs/train_router.py: ".join(bad))


def commands(a: argparse.Namespace) -> list[list[str]]:
    cfg = load_config(a.config, TrainRouterJob)
    router, data, out = pick(a, cfg, "router"), pick(a, cfg, "data"), pick(a, cfg, "out")
    if not (router and data and out):
        raise SystemExit("jobs/train_router.py: need router, data and out (flags or --config)")
    params = [f"{k}={json.dumps(v)}" for k, v in (cfg.get("params") or {}).items()] + list(a.param or [])
    check_router(router, params, a.config)
    train = ["route", "train", router, "--data", data, "--out", out]
    for kv in params:
        train += ["--param", kv]
    cmds = [train]
    cal = cfg.get("calibrate")
    if cal:
        c = ["route", "calibrate", out, "--data", cal.get("data", data),
             "--out", cal.get("out", str(Path(out) / "thresholds.json"))]
        for t in cal.get("targets") or []:
            c += ["--target", str(t)]
        cmds.append(c)
    return cmds


if __name__ == "__main__":
    code = 0
    for cmd in commands(build_parser().parse_args(sys.argv[1:])):
        code = run_cli(cmd)
        if code:
            break
    main_exit(code)
