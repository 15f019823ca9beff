"""The whole pipeline, one call: evaluate -> gold preference data -> router -> thresholds ->
Serve graph -> real requests -> one report.

    rayeval pipeline                      # packaged defaults (rayeval/configs/pipeline_small.yaml)
    rayeval pipeline my_pipeline.yaml --out runs/main

Each stage is a library call that also exists on its own (``rayeval eval``, ``rayeval route``,
``serve run``); this module only wires their outputs together, so a stage that already finished
in ``--out`` is reused (the evaluation resumes shard by shard).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rayeval.config import REPO_ROOT, from_dict, load_yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Prove that there are infinitely many primes, then explain how the proof generalizes to primes of the form 4k+3.",
    "Say hello.",
    "A train leaves at 3pm at 60 km/h and another at 4pm at 90 km/h on the same track. When does the second catch up?",
]


@dataclass
class WorkflowConfig:
    name: str = "pipeline_small"
    eval: str = "eval_pipeline"                       # packaged eval config name or YAML path
    gold: dict[str, str] = field(default_factory=lambda: {"setting": "baseline", "scoring": "symbol"})
    router: dict[str, Any] = field(default_factory=lambda: {"name": "knn", "params": {"k": 10}})
    baselines: list[str] = field(default_factory=lambda: ["random", "length"])
    folds: int = 5
    seed: int = 0
    targets: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    serve: dict[str, Any] = field(default_factory=lambda: {"enabled": True, "config": "serve_configs/local_cpu.yaml",
                                                           "target_share": 0.5, "prompts": DEFAULT_PROMPTS})


def load_workflow_config(path: str | Path | None) -> WorkflowConfig:
    if path is None:
        path = CONFIG_DIR / "pipeline_small.yaml"
    p = Path(path)
    if not p.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
        p = CONFIG_DIR / f"{path}.yaml"
    return from_dict(WorkflowConfig, load_yaml(p), where=str(p))


# ----------------------------------------------------------------------------- stages

def gold_outcomes(rows: pd.DataFrame, setting: str, scoring: str):
    """Which model answered which item correctly, in the unperturbed setting: gold labels."""
    from rayeval.route.prefs import outcomes_from_eval

    sel = rows[(rows.setting == setting) & (rows.scoring == scoring) & (rows.rotation == 0)]
    if sel.empty:
        raise ValueError(f"no eval rows for gold setting={setting!r} scoring={scoring!r}; "
                         f"have settings {sorted(rows.setting.unique())}, scorings {sorted(rows.scoring.unique())}")
    sel = sel.assign(item_id=sel.dataset + "/" + sel.item_id, subject=sel.dataset + "/" + sel.subject)
    return outcomes_from_eval(sel)


def train_router(cfg: WorkflowConfig, outcomes, out: Path) -> dict[str, Any]:
    """Cross-fitted evaluation of the router and baselines, then the final router and thresholds."""
    from rayeval.route.evaluate import calibrate, cross_fit, embeddings_for, summarize
    from rayeval.route.routers import make_router

    emb = embeddings_for(outcomes)
    k = min(cfg.folds, len(outcomes))
    table, scores = [], {}
    specs = [(cfg.router["name"], cfg.router.get("params") or {})] + [(b, {}) for b in cfg.baselines]
    for name, params in specs:
        sc = cross_fit((name, params), outcomes, emb if make_router(name, **params).needs_embeddings else None,
                       k=k, seed=cfg.seed)
        scores[name] = sc
        s = summarize(sc, outcomes, n_boot=200, seed=cfg.seed)
        ci = s.get("ci", {}).get("apgr")
        table.append({"router": name, "apgr": s["apgr"], "apgr_95ci": f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "",
                      "cpt50": s.get("cpt50"), "cpt80": s.get("cpt80")})
    router = make_router(cfg.router["name"], **(cfg.router.get("params") or {}))
    router.fit(outcomes, emb if router.needs_embeddings else None)
    rdir = router.save(out / "router")
    thresholds = calibrate(scores[cfg.router["name"]], cfg.targets)
    (rdir / "thresholds.json").write_text(json.dumps({"thresholds": {str(k): v for k, v in thresholds.items()},
                                                       "calibrated_on": "cross-fitted eval gold data"}, indent=1))
    return {"table": pd.DataFrame(table), "router_dir": rdir, "thresholds": thresholds,
            "strong": router.strong_, "weak": router.weak_}


def serve_and_query(cfg: WorkflowConfig, router_dir: Path, threshold: float, strong: str, weak: str) -> pd.DataFrame:
    """Deploy the Serve graph with the trained router and send real chat requests through it."""
    from rayeval.serve import client as serve_client

    return serve_client.deploy_and_query(config=str(REPO_ROOT / cfg.serve["config"]) if not Path(
        cfg.serve["config"]).is_absolute() else cfg.serve["config"], router_dir=str(router_dir),
        threshold=threshold, strong=strong, weak=weak, prompts=list(cfg.serve.get("prompts") or DEFAULT_PROMPTS))


def run_workflow(config: str | Path | WorkflowConfig | None, out_dir: str | Path, serve: bool | None = None,
                 engine: dict | None = None) -> dict[str, Any]:
    from rayeval.eval.pipeline import run_eval

    cfg = config if isinstance(config, WorkflowConfig) else load_workflow_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings: dict[str, float] = {}

    print(f"[rayeval] 1/4 evaluate ({cfg.eval})", flush=True)
    ev = run_eval(cfg.eval, out / "eval", engine=engine)
    timings["evaluate"] = time.time() - t0
    rows = pd.read_parquet(out / "eval" / "rows.parquet")

    print("[rayeval] 2/4 gold preference data from the evaluation", flush=True)
    outcomes = gold_outcomes(rows, cfg.gold["setting"], cfg.gold["scoring"])
    (out / "prefs").mkdir(exist_ok=True)
    outcomes.save(out / "prefs" / "outcomes.parquet")
    outcomes.to_preferences().save(out / "prefs" / "preferences.parquet")

    print(f"[rayeval] 3/4 train and calibrate the {cfg.router['name']} router", flush=True)
    t1 = time.time()
    tr = train_router(cfg, outcomes, out)
    timings["route"] = time.time() - t1

    served = None
    do_serve = cfg.serve.get("enabled", True) if serve is None else serve
    if do_serve:
        print("[rayeval] 4/4 deploy the Serve graph and send real requests", flush=True)
        t2 = time.time()
        thr = tr["thresholds"].get(float(cfg.serve.get("target_share", 0.5)))
        served = serve_and_query(cfg, tr["router_dir"], thr, tr["strong"], tr["weak"])
        served.to_csv(out / "served.csv", index=False)
        timings["serve"] = time.time() - t2
    timings["total"] = time.time() - t0
    report = write_report(cfg, out, ev, outcomes, tr, served, timings)
    res = {"out": str(out), "report": str(report), "router_dir": str(tr["router_dir"]),
           "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    (out / "pipeline.json").write_text(json.dumps(res, indent=1))
    return res


def write_report(cfg, out: Path, ev: dict, outcomes, tr: dict, served: pd.DataFrame | None,
                 timings: dict[str, float]) -> Path:
    from rayeval.eval.report import md_table

    s, w = outcomes.pair_arrays(tr["strong"], tr["weak"])
    summ = json.loads((out / "eval" / "metrics.json").read_text())["tables"]["summary"]
    summ = pd.DataFrame(summ)
    cols = [c for c in ["model", "dataset", "setting", "scoring", "n", "acc", "delta_acc", "rstd", "rank", "shift"]
            if c in summ]
    md = [f"# rayeval pipeline: {cfg.name}\n",
          f"Wall time: {timings['total']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if k != 'total')}).\n",
          "\n## 1. Benchmark sensitivity\n",
          f"{ev['rows']} scored rows; full report: [eval/report.md](eval/report.md).\n\n",
          md_table(summ[cols]) + "\n",
          "\n![rank shift](eval/rank_shift_mmlu.png)\n" if (out / "eval" / "rank_shift_mmlu.png").exists() else "",
          "\n## 2. Gold preference data\n",
          f"{len(outcomes)} questions; strong = `{tr['strong']}` (accuracy {100 * s.mean():.1f}%), "
          f"weak = `{tr['weak']}` ({100 * w.mean():.1f}%); strong wins {100 * (s > w).mean():.1f}%, "
          f"ties {100 * (s == w).mean():.1f}%, weak wins {100 * (s < w).mean():.1f}%.\n",
          "\n## 3. Routers (cross-fitted, APGR as RouteLLM computes it; random = 0.5)\n\n",
          md_table(tr["table"]) + "\n",
          (f"\nThe two models' accuracies differ by {100 * abs(s.mean() - w.mean()):.1f} points: PGR divides by "
           "that gap, so APGR is ill-conditioned here (hence the wide CIs); on benchmarks where the models "
           "differ more (RouteLLM's data, docs/routing.md) the same routers are measured precisely.\n"
           if abs(s.mean() - w.mean()) < 0.05 else ""),
          "\nThresholds (calibrated on cross-fitted scores) per target strong share: "
          + ", ".join(f"{k:.0%} → {v:.3f}" for k, v in sorted(tr["thresholds"].items())) + "\n",
          f"\nRouter saved to `{tr['router_dir']}` (with thresholds.json) for `serve_configs/`.\n"]
    if served is not None:
        shown = served.copy()
        if "text" in shown:  # one table line per request
            shown["text"] = shown["text"].astype(str).str.replace(r"\s+", " ", regex=True).str.slice(0, 100)
        md += ["\n## 4. Served through the Serve graph\n\n", md_table(shown) + "\n"]
    (out / "report.md").write_text("".join(md), encoding="utf-8")
    return out / "report.md"
