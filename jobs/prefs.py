"""``ray job submit ... -- python jobs/prefs.py --config prefs.yaml`` (or ``--source S --out F``)

Build routing preference data = ``rayeval route prefs SOURCE --out FILE [--pairwise]``.
SOURCE: routellm:<mmlu|gsm8k|mt_bench>, routerbench:<task>[:split], battles:<file.jsonl>,
eval:<rows.parquet> (gold labels from an evaluation).  The YAML holds the same keys:

    source: eval:/data/runs/paper_grid/rows.parquet
    out: /data/runs/prefs/outcomes.parquet
    pairwise: false
"""


import argparse
import sys
from typing import Optional

from pydantic import BaseModel, ConfigDict

from _common import load_config, main_exit, pick, run_cli


class PrefsJob(BaseModel):
    """The job's YAML (every key optional: flags may give them)."""

    model_config = ConfigDict(extra="forbid")
    source: Optional[str] = None
    out: Optional[str] = None
    pairwise: Optional[bool] = None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/prefs.py", description="rayeval route prefs as a Ray job")
    p.add_argument("--config", help="YAML with source / out / pairwise")
    p.add_argument("--source", help="data source (overrides the config)")
    p.add_argument("--out", help="output parquet (overrides the config)")
    p.add_argument("--pairwise", action="store_true", default=None, help="write pairwise battles")
    return p


def argv(a: argparse.Namespace) -> list[str]:
    cfg = load_config(a.config, PrefsJob)
    source, out = pick(a, cfg, "source"), pick(a, cfg, "out")
    if not source or not out:
        raise SystemExit("jobs/prefs.py: need source and out (flags or --config)")
    res = ["route", "prefs", source, "--out", out]
    if pick(a, cfg, "pairwise", False):
        res.append("--pairwise")
    return res


if __name__ == "__main__":
    main_exit(run_cli(argv(build_parser().parse_args(sys.argv[1:]))))
