"""``ray job submit ... -- python jobs/eval.py --config CONFIG --out DIR``

Evaluate models x datasets x perturbations x scorings on the cluster (Ray Data actor pool, one
engine per model per actor, `auto` by default) = ``rayeval eval CONFIG --out DIR``.  CONFIG is an eval YAML or a
packaged name (eval_small, eval_paper_grid).  Rerunning with the same --out resumes.
"""

from __future__ import annotations

import argparse
import sys

from _common import main_exit, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/eval.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--config", required=True, help="eval YAML, or a packaged config name")
    p.add_argument("--out", required=True, help="output folder (rows, metrics, report); resumes")
    p.add_argument("--engine", choices=["auto", "vllm", "hf", "fake"], help="engine kind override")
    p.add_argument("--actors", type=int, help="actor-pool size override (e.g. the number of GPUs)")
    p.add_argument("--no-resume", action="store_true", help="recompute every shard")
    return p


def argv(a: argparse.Namespace) -> list[str]:
    out = ["eval", a.config, "--out", a.out]
    if a.engine:
        out += ["--engine", a.engine]
    if a.actors:
        out += ["--actors", str(a.actors)]
    if a.no_resume:
        out.append("--no-resume")
    return out


if __name__ == "__main__":
    main_exit(run_cli(argv(build_parser().parse_args(sys.argv[1:]))))
