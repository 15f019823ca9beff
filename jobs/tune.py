"""``ray job submit ... -- python jobs/tune.py --config tune.yaml [--out DIR] [--resume]``

Search router hyperparameters with Ray Tune (random/grid/optuna + ASHA), calibrate thresholds,
export the best router = ``rayeval tune CONFIG [--out DIR] [--resume]``.  Trials spread over the
cluster's CPUs (resources_per_trial in the YAML); --resume continues after a failure.
"""

from __future__ import annotations

import argparse
import sys

from _common import main_exit, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/tune.py", description="rayeval tune as a Ray job")
    p.add_argument("--config", required=True, help="tune YAML, or a packaged name (tune_small)")
    p.add_argument("--out", help="output folder (default: the config's out)")
    p.add_argument("--resume", action="store_true", help="continue the experiments under --out")
    return p


def argv(a: argparse.Namespace) -> list[str]:
    # Options before CONFIG: parses whether `rayeval tune` is a plain command or a group whose
    # callback is the command (a group stops parsing options at its first positional argument).
    res = ["tune"]
    if a.out:
        res += ["--out", a.out]
    if a.resume:
        res.append("--resume")
    return res + [a.config]


if __name__ == "__main__":
    main_exit(run_cli(argv(build_parser().parse_args(sys.argv[1:]))))
