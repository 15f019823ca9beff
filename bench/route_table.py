"""The full measured routing table (docs/routing.md).  Slow: tens of minutes on 2 CPU cores.

    .venv/bin/python bench/route_table.py --out bench/out/route [--quick] [--no-slow]

Writes report.md, metrics.csv, cost-quality plots, and (incrementally) table.md after every
benchmark, so a partial run is still usable.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from rayeval.route.evaluate import (EvalResult, calibration_study, evaluate_routers, markdown_table, df_markdown,
                                    nway_study, out_of_distribution, write_report)
from rayeval.prefs.outcomes import ROUTERBENCH_TASKS, load_routellm, load_routerbench

KNN_GROUP = ("knn", {"k": 50, "within_group": True, "shrinkage": 20.0})
LOGI_PAIR = ("logistic", {"C": 0.05, "use_groups": True, "use_length": True, "target": "pair"})
BLEND = ("blend", {"members": [{"name": KNN_GROUP[0], "params": KNN_GROUP[1]},
                               {"name": LOGI_PAIR[0], "params": LOGI_PAIR[1]}]})
# Side features (group one-hot + log length) beside the embedding: one setting for every benchmark.
SIDE = {"use_groups": True, "use_length": True}
SW_SIDE = ("sw_ranking", {"gamma": 1000.0, "group_weight": 0.5, "length_weight": 0.25})
MF_SIDE = ("mf", {"objective": "pointwise", **SIDE})
LOGI_SIDE = ("logistic", {"C": 0.1, **SIDE})
BLEND3 = ("blend", {"members": [{"name": n, "params": p} for n, p in (KNN_GROUP, LOGI_PAIR, SW_SIDE)]})
FAST = [
    ("random", {}), ("length", {}), ("knn", {"k": 50}), ("knn", {"k": 100, "weighting": "similarity"}),
    ("sw_ranking", {"gamma": 10.0}), ("sw_ranking", {"gamma": 1000.0}), SW_SIDE,
    ("mf", {}), ("mf", {"objective": "pointwise"}), MF_SIDE,
    ("logistic", {"C": 0.1}), LOGI_SIDE, ("group", {}), KNN_GROUP, LOGI_PAIR, BLEND, BLEND3,
]
# Classifier settings: the causal head's C was chosen on GSM8K (2026-11-30), BERT's probe C by inner CV
# inside every training fold; both then run unchanged on MMLU and MT-Bench (docs/routing.md).
SLOW = [
    ("bert", {"epochs": 1, "max_train": 2000, **SIDE}),  # LP-FT: probe C by inner CV, then 1 epoch at lr 1e-5
    ("causal_llm", {"num_layers": 12, "max_length": 128, "max_train": None, "C": 0.05}),
    ("causal_llm", {"num_layers": 12, "max_length": 128, "max_train": None, "C": 0.005, **SIDE}),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out/route")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--no-slow", action="store_true", help="skip the BERT / causal-LLM classifiers")
    ap.add_argument("--slow-benchmarks", default="gsm8k,mt_bench,mmlu",
                    help="benchmarks for the slow classifiers (MMLU: ~40 min on 2 quiet cores)")
    ap.add_argument("--slow-routers", default="bert,causal_llm", help="which slow classifiers to run")
    ap.add_argument("--quick", action="store_true", help="fast routers on GSM8K + MT-Bench only")
    ap.add_argument("--sections", default="routellm,slow,ood,routerbench",
                    help="comma list of: routellm (fast routers x benchmarks), slow (BERT/causal), ood "
                         "(+ calibration), routerbench")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log_f = open(out / "log.txt", "a")

    def log(msg):
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()

    sections = set(a.sections.split(","))
    benches = ["gsm8k", "mt_bench"] if a.quick else ["mmlu", "gsm8k", "mt_bench"]
    data = {b: load_routellm(b) for b in benches}
    total = EvalResult()
    for b in benches if "routellm" in sections else []:
        res = evaluate_routers(FAST, [b], k=a.folds, n_boot=a.n_boot, log=log, outcomes=data)
        total.rows += res.rows
        total.curves.update(res.curves)
        total.scores.update(res.scores)
        total.similarity.update(res.similarity)
        (out / "table.md").write_text(markdown_table(total.table()) + "\n")
    if not a.no_slow and not a.quick and "slow" in sections:
        for b in a.slow_benchmarks.split(","):
            slow = [spec for spec in SLOW if spec[0] in a.slow_routers.split(",")]
            res = evaluate_routers(slow, [b], k=a.folds, n_boot=a.n_boot, log=log, outcomes=data)
            total.rows += res.rows
            total.curves.update(res.curves)
            total.scores.update(res.scores)
            total.similarity.update(res.similarity)
            (out / "table.md").write_text(markdown_table(total.table()) + "\n")

    extra = []
    # out of distribution: fit on all of MMLU, score GSM8K and MT-Bench
    if "mmlu" in data and "ood" in sections:
        rows = []
        for spec in [("knn", {"k": 50}), ("logistic", {"C": 0.05, "use_length": True, "target": "pair"}),
                     ("mf", {"objective": "pointwise"})]:
            for b in ("gsm8k", "mt_bench"):
                r = out_of_distribution(spec, data["mmlu"], load_routellm(b), n_boot=a.n_boot)
                rows.append({"router": f"{spec[0]}{spec[1]}", "train": "mmlu", "test": b,
                             "apgr": f"{r['apgr']:.3f} [{r['ci']['apgr'][0]:.3f}, {r['ci']['apgr'][1]:.3f}]",
                             "cpt50": f"{100 * r['cpt50']:.1f}%"})
                log(f"OOD mmlu->{b} {spec}: APGR {r['apgr']:.3f}")
        extra += ["## Out of distribution (fit on all MMLU)", "", df_markdown(pd.DataFrame(rows)), ""]
        # threshold calibration: thresholds from half the questions, applied to the other half
        cal = calibration_study(BLEND, data["mmlu"], targets=(0.2, 0.5, 0.8), k=a.folds)
        extra += ["## Calibrated thresholds on held-out questions (MMLU, blend)", "",
                  df_markdown(cal.round(4)), ""]
        log("calibration\n" + cal.to_string())

    # RouterBench N-way
    rows = []
    for task in ROUTERBENCH_TASKS if "routerbench" in sections else []:
        tr, te = load_routerbench(task, "train"), load_routerbench(task, "test")
        for name, params in [("knn_quality", {"k": 50, "last_block": False}), ("knn_quality", {"k": 50}),
                             ("linear_quality", {"alpha": 10.0})]:
            r = nway_study(name, params, tr, te, target=0.95)
            rows.append({"task": task, "router": f"{name}{params}", "best model": r["best_model"],
                         "best q": round(r["best_quality"], 3), "AIQ [95% CI]": f"{r['aiq']:.3f} [{r['aiq_ci'][0]:.3f}, {r['aiq_ci'][1]:.3f}]",
                         "AIQ single models": round(r["aiq_single_models"], 3),
                         "cost to 95% of best (x best cost)": round(r["cost_frac_at_target"], 3),
                         "single-model mix": round(r["single_cost_frac_at_target"], 3),
                         "router max q": round(r["router_max_quality"], 3), "oracle q": round(r["oracle_quality"], 3),
                         "oracle cost (x best)": round(r["oracle_cost_frac"], 3)})
            log(f"routerbench {task} {name}{params}: AIQ {r['aiq']:.3f} cost@95% {r['cost_frac_at_target']:.3f}")
    if rows:
        extra += ["## RouterBench (11 models, N-way, test split)", "", df_markdown(pd.DataFrame(rows)), ""]
    if total.rows:
        write_report(total, out, extra_md="\n".join(extra))
    else:
        (out / "extra.md").write_text("\n".join(extra) + "\n")
    log(f"done: {out / 'report.md'}")


if __name__ == "__main__":
    main()
