"""``ray job submit ... -- python jobs/pipeline.py --config pipeline.yaml --out DIR``

The whole pipeline in one job: evaluate -> gold preference data -> router -> thresholds -> Serve
graph -> real requests -> report = ``rayeval pipeline CONFIG --out DIR``.  Finished stages in
--out are reused (the evaluation resumes shard by shard).
"""

from __future__ import annotations

import argparse
import sys

from _common import main_exit, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/pipeline.py", description="rayeval pipeline as a Ray job")
    p.add_argument("--config", help="pipeline YAML or packaged name (default pipeline_small)")
    p.add_argument("--out", required=True, help="output folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--serve", dest="serve", action="store_true", default=None, help="deploy and query the Serve graph")
    g.add_argument("--no-serve", dest="serve", action="store_false", help="stop after the router and thresholds")
    p.add_argument("--engine", choices=["auto", "vllm", "hf", "fake"], help="eval engine override")
    return p


def argv(a: argparse.Namespace) -> list[str]:
    res = ["pipeline"] + ([a.config] if a.config else []) + ["--out", a.out]
    if a.serve is not None:
        res.append("--serve" if a.serve else "--no-serve")
    if a.engine:
        res += ["--engine", a.engine]
    return res


if __name__ == "__main__":
    main_exit(run_cli(argv(build_parser().parse_args(sys.argv[1:]))))
