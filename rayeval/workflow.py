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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from rayeval.config import REPO_ROOT, from_dict, load_yaml, resolve_config


DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Prove that there are infinitely many primes, then explain how the proof generalizes to primes of the form 4k+3.",
    "Say hello.",
    "A train leaves at 3pm at 60 km/h and another at 4pm at 90 km/h on the same track. When does the second catch up?",
]


REFERENCE_WHEN = ("noise", "always", "never")


@dataclass
class WorkflowConfig:
    name: str = "pipeline_small"
    eval: str = "eval_pipeline"                       # packaged eval config name or YAML path
    # Which eval rows are the gold labels: one (setting, scoring), optionally per dataset
    # (``datasets: {arc_challenge: {scoring: cloze}}``, as the paper scores ARC).
    gold: dict[str, Any] = field(default_factory=lambda: {"setting": "baseline", "scoring": "hybrid",
                                                          "datasets": {"arc_challenge": {"scoring": "cloze"}}})
    # [strong, weak]; null: the better and the worse model on the gold items (a tie is an error).
    pair: list[str] | None = None
    # The router's embedder is the static MiniLM featurizer by default: it embeds RouteLLM's 14k
    # reference questions in seconds, and the Serve graph runs it inside the router replica.
    router: dict[str, Any] = field(default_factory=lambda: {"name": "knn",
                                                            "params": {"k": 10, "embedder": "minilm-l6-static"}})
    baselines: list[str] = field(default_factory=lambda: ["random", "length"])
    folds: int = 5
    seed: int = 0
    n_boot: int = 500
    targets: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    # The same router on RouteLLM's GPT-4 / Mixtral outcomes (``limit`` questions, a seeded sample; 0: all):
    # when the local pair's gap is within noise ("noise"), "always" or "never".
    reference: dict[str, Any] = field(default_factory=lambda: {"data": "routellm:mmlu", "limit": 0,
                                                               "n_boot": 200, "when": "noise"})
    serve: dict[str, Any] = field(default_factory=lambda: {"enabled": True, "config": "serve_configs/local_cpu.yaml",
                                                           "target_share": 0.5, "prompts": DEFAULT_PROMPTS})

    def validate(self, where: str = "workflow config") -> "WorkflowConfig":
        """Early errors naming the key; the stages would otherwise fail minutes later."""
        def bad(key: str, msg: str):
            raise ValueError(f"{where}: {key}: {msg}")

        for k in ("setting", "scoring"):
            if not isinstance(self.gold.get(k), str):
                bad("gold", f"needs a {k!r} string, got {self.gold!r}")
        unknown = sorted(set(self.gold) - {"setting", "scoring", "datasets"})
        if unknown:
            bad("gold", f"unknown key(s) {unknown}; expected setting, scoring, datasets")
        for ds, o in (self.gold.get("datasets") or {}).items():
            if not isinstance(o, dict) or set(o) - {"setting", "scoring"}:
                bad(f"gold.datasets.{ds}", f"expected {{setting, scoring}}, got {o!r}")
        if self.pair is not None:
            if (not isinstance(self.pair, list) or len(self.pair) != 2
                    or not all(isinstance(m, str) and m for m in self.pair)):
                bad("pair", f"expected [strong, weak] (two model names), got {self.pair!r}")
            if self.pair[0] == self.pair[1]:
                bad("pair", f"strong and weak are the same model {self.pair[0]!r}; a pair is two models")
        unknown = sorted(set(self.reference) - {"data", "limit", "n_boot", "when"})
        if unknown:
            bad("reference", f"unknown key(s) {unknown}; expected data, limit, n_boot, when")
        if self.reference.get("when", "noise") not in REFERENCE_WHEN:
            bad("reference.when", f"{self.reference.get('when')!r} is not one of {list(REFERENCE_WHEN)}")
        if not str(self.reference.get("data", "routellm:mmlu")).startswith("routellm:"):
            bad("reference.data", f"expected routellm:<mmlu|gsm8k|mt_bench>, got {self.reference.get('data')!r}")
        for key in ("limit", "n_boot"):
            v = self.reference.get(key, 0)
            if not isinstance(v, int) or v < 0:
                bad(f"reference.{key}", f"must be an integer >= 0, got {v!r}")
        unknown = sorted(set(self.serve) - {"enabled", "config", "target_share", "threshold", "prompts", "max_tokens"})
        if unknown:
            bad("serve", f"unknown key(s) {unknown}")
        if not 0 < float(self.serve.get("target_share", 0.5)) < 1:
            bad("serve.target_share", f"{self.serve.get('target_share')!r} is not in (0, 1)")
        if not all(isinstance(x, str) and x.strip() for x in (self.serve.get("prompts") or DEFAULT_PROMPTS)):
            bad("serve.prompts", "every prompt must be a non-empty string")
        return self


def load_workflow_config(path: str | Path | None) -> WorkflowConfig:
    p = resolve_config("pipeline_small" if path is None else path)
    return from_dict(WorkflowConfig, load_yaml(p), where=str(p)).validate(str(p))


# ----------------------------------------------------------------------------- stages

def gold_outcomes(rows: pd.DataFrame, gold: dict[str, Any]):
    """Which model answered which item correctly, in the gold (setting, scoring) of each dataset."""
    from rayeval.prefs.outcomes import outcomes_from_eval

    parts = []
    for ds in sorted(rows.dataset.unique()):
        o = {**gold, **((gold.get("datasets") or {}).get(ds) or {})}
        sel = rows[(rows.dataset == ds) & (rows.setting == o["setting"]) & (rows.scoring == o["scoring"])
                   & (rows.rotation == 0)]
        if sel.empty:
            raise ValueError(f"gold: no eval rows of dataset {ds!r} for setting={o['setting']!r} "
                             f"scoring={o['scoring']!r}; have settings {sorted(rows.setting.unique())}, "
                             f"scorings {sorted(rows.scoring.unique())}")
        parts.append(sel)
    sel = pd.concat(parts, ignore_index=True)
    sel = sel.assign(item_id=sel.dataset + "/" + sel.item_id, subject=sel.dataset + "/" + sel.subject)
    return outcomes_from_eval(sel)


def declare_pair(outcomes, pair: list[str] | None, where: str = "pair"):
    """``outcomes`` with its strong/weak pair fixed: the configured one, else the better and the
    worse model on the gold items.  Equal accuracies are an error, never one model for both."""
    if pair is None:
        try:
            pair = list(outcomes.strong_weak())
        except ValueError as e:
            raise ValueError(f"{e}: set `pair: [strong, weak]` in the workflow config") from None
    try:
        return outcomes.with_pair(*pair)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def pair_gap(outcomes, n_boot: int = 500, seed: int = 0) -> dict[str, Any]:
    """Accuracy of the pair's models and their paired-bootstrap gap (95% CI) on the gold items."""
    from rayeval.route.metrics import bootstrap

    strong, weak = outcomes.strong_weak()
    s, w = outcomes.pair_arrays(strong, weak)
    ci = bootstrap(lambda a, b: a.mean() - b.mean(), s, w, n_boot=n_boot, seed=seed)
    return {"strong": strong, "weak": weak, "n": len(s), "acc_strong": float(s.mean()), "acc_weak": float(w.mean()),
            "gap": ci.value, "gap_lo": ci.lo, "gap_hi": ci.hi, "within_noise": bool(ci.lo <= 0 <= ci.hi),
            "strong_wins": float((s > w).mean()), "ties": float((s == w).mean()), "weak_wins": float((s < w).mean())}


ROUTER_METRICS = ("apgr", "cpt50", "cpt80")


def router_table(cfg: WorkflowConfig, outcomes, emb: np.ndarray | None,
                 n_boot: int | None = None) -> tuple[pd.DataFrame, dict]:
    """Cross-fitted APGR and CPT (with bootstrap CIs over questions) of the router and the baselines."""
    from rayeval.route import metrics as M
    from rayeval.route.evaluate import cross_fit
    from rayeval.route.routers import make_router

    s_strong, s_weak = outcomes.pair_arrays()
    fns = {"apgr": M.apgr_routellm, "cpt50": lambda a, b, c: M.cpt(a, b, c, 0.5),
           "cpt80": lambda a, b, c: M.cpt(a, b, c, 0.8)}
    k = min(cfg.folds, len(outcomes))
    table, scores = [], {}
    specs = [(cfg.router["name"], cfg.router.get("params") or {})] + [(b, {}) for b in cfg.baselines]
    for i, (name, params) in enumerate(specs):
        # ``emb`` is in the configured router's embedder; an embedding baseline computes its own.
        sc = cross_fit((name, params), outcomes, emb if i == 0 and make_router(name, **params).needs_embeddings
                       else None, k=k, seed=cfg.seed)
        scores[name] = sc
        row = {"router": name}
        for m in ROUTER_METRICS:
            ci = M.bootstrap(fns[m], sc, s_strong, s_weak, n_boot=cfg.n_boot if n_boot is None else n_boot,
                             seed=cfg.seed)
            row[m], row[f"{m}_95ci"] = ci.value, f"[{ci.lo:.2f}, {ci.hi:.2f}]"
        table.append(row)
    return pd.DataFrame(table), scores


def router_embeddings(router, outcomes) -> np.ndarray | None:
    """The embeddings of ``outcomes``' questions in the router's own embedder (None if it needs none)."""
    from rayeval.route.evaluate import embeddings_for

    return embeddings_for(outcomes, router.embedder) if router.needs_embeddings else None


def train_router(cfg: WorkflowConfig, outcomes, out: Path) -> dict[str, Any]:
    """Cross-fitted evaluation of the router and baselines, then the final router and thresholds."""
    from rayeval.route.evaluate import calibrate
    from rayeval.route.routers import make_router

    router = make_router(cfg.router["name"], **(cfg.router.get("params") or {}))
    emb = router_embeddings(router, outcomes)
    table, scores = router_table(cfg, outcomes, emb)
    router.fit(outcomes, emb if router.needs_embeddings else None)
    rdir = router.save(out / "router")
    thresholds = calibrate(scores[cfg.router["name"]], cfg.targets)
    (rdir / "thresholds.json").write_text(json.dumps({"thresholds": {str(k): v for k, v in thresholds.items()},
                                                       "calibrated_on": "cross-fitted eval gold data"}, indent=1))
    return {"table": table, "router_dir": rdir, "thresholds": thresholds,
            "strong": router.strong_, "weak": router.weak_}


def reference_routers(cfg: WorkflowConfig) -> dict[str, Any]:
    """The same router and baselines, cross-fitted on RouteLLM's real strong/weak outcomes."""
    from rayeval.prefs.outcomes import load_routellm
    from rayeval.route.routers import make_router

    bench = str(cfg.reference.get("data", "routellm:mmlu")).split(":", 1)[1]
    o = load_routellm(bench)
    limit = int(cfg.reference.get("limit") or 0)
    if 0 < limit < len(o):
        o = o.subset(np.sort(np.random.default_rng(cfg.seed).choice(len(o), limit, replace=False)))
    o = declare_pair(o, None, where=f"reference routellm:{bench}")
    router = make_router(cfg.router["name"], **(cfg.router.get("params") or {}))
    table, _ = router_table(cfg, o, router_embeddings(router, o), n_boot=int(cfg.reference.get("n_boot", 200)))
    return {"data": f"routellm:{bench}", "table": table, "gap": pair_gap(o, cfg.n_boot, cfg.seed)}


def rank_uncertainty(summ: pd.DataFrame, shifts: pd.DataFrame) -> tuple[pd.DataFrame, list[str], int]:
    """The summary table with the uncertainty of every number a reader compares: the accuracy's
    95% CI, the rank's bootstrap 95% interval, and the shift's; plus one line per rank change whose
    interval excludes 0 (the others are within noise) and the number of rank changes.

    ``shifts`` is the eval's ``rank_shift`` table (rayeval.eval.stats: bootstrap over items)."""
    t = summ.copy()
    t.insert(list(t.columns).index("acc") + 1, "acc_95ci", [f"[{lo:.1f}, {hi:.1f}]" for lo, hi in zip(t.acc_lo, t.acc_hi)])
    key = ["model", "dataset", "setting", "scoring"]
    extra = [c for c in ("rank_lo", "rank_hi", "shift_lo", "shift_hi", "shift_significant") if c in shifts]
    t = t.merge(shifts[key + extra], on=key, how="left")
    if {"rank_lo", "rank_hi"} <= set(t):
        t["rank_95ci"] = [f"[{lo:.0f}, {hi:.0f}]" for lo, hi in zip(t.rank_lo, t.rank_hi)]
    if {"shift_lo", "shift_hi"} <= set(t):
        t["shift_95ci"] = [f"[{lo:+.0f}, {hi:+.0f}]" if pd.notna(lo) else "" for lo, hi in zip(t.shift_lo, t.shift_hi)]
    moved = t[t["shift"].fillna(0) != 0]
    sig = moved[moved.get("shift_significant", pd.Series(False, index=moved.index)).fillna(False).astype(bool)]
    lines = [f"`{r.model}` on {r.dataset} {r.setting}/{r.scoring}: rank {int(r.baseline_rank)} → {int(r['rank'])} "
             f"(shift {int(r['shift']):+d}, 95% interval {r.shift_95ci}; accuracy {r.acc:.1f} {r.acc_95ci})"
             for _, r in sig.iterrows()]
    return t, lines, len(moved)


def demo_threshold(p: Sequence[float], calibrated: float) -> tuple[float, str]:
    """The threshold for the demo requests: the calibrated one when it sends the demo prompts to
    both models, else the split point of the demo prompts' own scores (so both paths are shown)."""
    p = np.asarray(p, float)
    strong = p >= calibrated
    if strong.any() and not strong.all():
        return float(calibrated), "calibrated"
    u = np.unique(p)
    side = "strong" if strong.all() else "weak"
    if len(u) < 2:
        return float(calibrated), f"calibrated; every demo prompt scores p = {u[0]:.3f}, so all go {side}"
    thr = float(u[len(u) // 2])
    return thr, (f"the calibrated {calibrated:.3f} sends every demo prompt to the {side} model; the demo uses "
                 f"the median split of the demo prompts' p, {thr:.3f}, to show both paths")


def serve_and_query(cfg: WorkflowConfig, router_dir: Path, threshold: float, strong: str, weak: str) -> pd.DataFrame:
    """Deploy the Serve graph with the trained router (alone) and send real chat requests through it."""
    from rayeval.serve import client as serve_client

    return serve_client.deploy_and_query(config=str(REPO_ROOT / cfg.serve["config"]) if not Path(
        cfg.serve["config"]).is_absolute() else cfg.serve["config"], router_dir=str(router_dir),
        threshold=threshold, strong=strong, weak=weak, prompts=demo_prompts(cfg),
        max_tokens=int(cfg.serve.get("max_tokens", 32)), only=True)


def demo_prompts(cfg: WorkflowConfig) -> list[str]:
    return list(cfg.serve.get("prompts") or DEFAULT_PROMPTS)


def serve_stage(cfg: WorkflowConfig, tr: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Pick the demo threshold (calibrated, or configured), deploy, send the demo prompts."""
    from rayeval.route.routers import load_router

    calibrated = tr["thresholds"].get(float(cfg.serve.get("target_share", 0.5)))
    if calibrated is None:
        raise ValueError(f"serve.target_share {cfg.serve.get('target_share')!r} is not among targets {cfg.targets}")
    if cfg.serve.get("threshold") is not None:
        thr, how = float(cfg.serve["threshold"]), "configured (serve.threshold)"
    else:
        p = load_router(tr["router_dir"]).win_probability(demo_prompts(cfg))
        thr, how = demo_threshold(p, calibrated)
    served = serve_and_query(cfg, tr["router_dir"], thr, tr["strong"], tr["weak"])
    served.insert(served.columns.get_loc("tier"), "threshold", thr)
    return served, {"threshold": thr, "how": how, "calibrated": calibrated,
                    "target_share": float(cfg.serve.get("target_share", 0.5))}


def run_workflow(config: str | Path | WorkflowConfig | None, out_dir: str | Path, serve: bool | None = None,
                 engine: dict | None = None) -> dict[str, Any]:
    from rayeval.eval.pipeline import run_eval

    cfg = (config if isinstance(config, WorkflowConfig) else load_workflow_config(config)).validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings: dict[str, float] = {}

    print(f"[rayeval] 1/4 evaluate ({cfg.eval})", flush=True)
    ev = run_eval(cfg.eval, out / "eval", engine=engine)
    timings["evaluate"] = time.time() - t0
    rows = pd.read_parquet(out / "eval" / "rows.parquet")

    print("[rayeval] 2/4 gold preference data from the evaluation", flush=True)
    outcomes = declare_pair(gold_outcomes(rows, cfg.gold), cfg.pair)
    gap = pair_gap(outcomes, cfg.n_boot, cfg.seed)
    (out / "prefs").mkdir(exist_ok=True)
    outcomes.save(out / "prefs" / "outcomes.parquet")
    outcomes.to_preferences().save(out / "prefs" / "preferences.parquet")

    print(f"[rayeval] 3/4 train and calibrate the {cfg.router['name']} router", flush=True)
    t1 = time.time()
    tr = train_router(cfg, outcomes, out)
    when = cfg.reference.get("when", "noise")
    if when == "always" or (when == "noise" and gap["within_noise"]):
        print(f"[rayeval]     and the same router on {cfg.reference.get('data', 'routellm:mmlu')}", flush=True)
        tr["reference"] = reference_routers(cfg)
    timings["route"] = time.time() - t1

    served, demo = None, None
    do_serve = cfg.serve.get("enabled", True) if serve is None else serve
    if do_serve:
        print("[rayeval] 4/4 deploy the Serve graph and send real requests", flush=True)
        t2 = time.time()
        served, demo = serve_stage(cfg, tr)
        served.to_csv(out / "served.csv", index=False)
        timings["serve"] = time.time() - t2
    timings["total"] = time.time() - t0
    report = write_report(cfg, out, ev, gap, tr, served, demo, timings)
    res = {"out": str(out), "report": str(report), "router_dir": str(tr["router_dir"]),
           "pair": [gap["strong"], gap["weak"]], "gap": {k: gap[k] for k in ("gap", "gap_lo", "gap_hi")},
           "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    if served is not None:
        res["served_tiers"] = sorted(served["tier"].dropna().unique().tolist())
    (out / "pipeline.json").write_text(json.dumps(res, indent=1))
    return res


def _pct_ci(v: float, lo: float, hi: float) -> str:
    return f"{100 * v:+.1f} points (95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}])"


def write_report(cfg, out: Path, ev: dict, gap: dict, tr: dict, served: pd.DataFrame | None, demo: dict | None, timings: dict[str, float]) -> Path:
    from rayeval.eval.report import md_table

    tables = json.loads((out / "eval" / "metrics.json").read_text())["tables"]
    ranked, beyond, n_changes = rank_uncertainty(pd.DataFrame(tables["summary"]), pd.DataFrame(tables["rank_shift"]))
    cols = [c for c in ["model", "dataset", "setting", "scoring", "n", "acc", "acc_95ci", "delta_acc", "rstd", "rank",
                        "rank_95ci", "shift", "shift_95ci"] if c in ranked]
    gold_desc = f"{cfg.gold['setting']}/{cfg.gold['scoring']}" + "".join(
        f", {ds}: {o.get('setting', cfg.gold['setting'])}/{o.get('scoring', cfg.gold['scoring'])}"
        for ds, o in (cfg.gold.get("datasets") or {}).items())
    md = [f"# rayeval pipeline: {cfg.name}\n",
          f"Wall time: {timings['total']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if k != 'total')}).\n",
          "\n## 1. Benchmark sensitivity\n",
          f"{ev['rows']} scored rows; full report: [eval/report.md](eval/report.md). Accuracy in %, with its "
          "95% bootstrap CI; rank 1 = best within a condition, with its bootstrap 95% interval; shift = baseline "
          "rank - rank, with its interval.\n\n",
          md_table(ranked[cols]) + "\n",
          (f"\nRank changes beyond noise (the shift's 95% interval excludes 0): {len(beyond)} of {n_changes}"
           + (":\n" + "".join(f"- {b}\n" for b in beyond) if beyond else
              ("; the others are within noise.\n" if n_changes else ".\n"))),
          "\n![rank shift](eval/rank_shift_mmlu.png)\n" if (out / "eval" / "rank_shift_mmlu.png").exists() else "",
          "\n## 2. Gold preference data\n",
          f"{gap['n']} questions ({gold_desc}, unrotated); strong = `{gap['strong']}` (accuracy "
          f"{100 * gap['acc_strong']:.1f}%), weak = `{gap['weak']}` ({100 * gap['acc_weak']:.1f}%)"
          f"{' (pair set in the config)' if cfg.pair else ''}; strong wins {100 * gap['strong_wins']:.1f}%, "
          f"ties {100 * gap['ties']:.1f}%, weak wins {100 * gap['weak_wins']:.1f}%.\n\n",
          f"Gap strong - weak: {_pct_ci(gap['gap'], gap['gap_lo'], gap['gap_hi'])}, paired bootstrap over the "
          "questions.\n",
          ("\n**The gap is within noise** (its CI includes 0): APGR divides by it, so the local routers' numbers "
           "below are ill-conditioned; the same router on RouteLLM's data follows for comparison.\n"
           if gap["within_noise"] else ""),
          "\n## 3. Routers (cross-fitted, APGR as RouteLLM computes it; random = 0.5; 95% bootstrap CIs)\n\n",
          f"On the gold data ({gap['strong']} vs {gap['weak']}):\n\n", md_table(tr["table"]) + "\n"]
    if tr.get("reference"):
        ref = tr["reference"]
        g = ref["gap"]
        md += [f"\nThe same routers on {ref['data']} ({g['n']} questions; strong `{g['strong']}` "
               f"{100 * g['acc_strong']:.1f}%, weak `{g['weak']}` {100 * g['acc_weak']:.1f}%; gap "
               f"{_pct_ci(g['gap'], g['gap_lo'], g['gap_hi'])}):\n\n", md_table(ref["table"]) + "\n"]
    md += ["\nThresholds (calibrated on cross-fitted scores) per target strong share: "
           + ", ".join(f"{k:.0%} → {v:.3f}" for k, v in sorted(tr["thresholds"].items())) + "\n",
           f"\nRouter saved to `{tr['router_dir']}` (with thresholds.json) for `serve_configs/`.\n"]
    if served is not None:
        shown = pd.DataFrame({
            "prompt": served["prompt"].astype(str).str.slice(0, 60),
            "p": served.get("p_strong"), "threshold": served["threshold"], "tier": served.get("tier"),
            "model": served.get("served_by"),
            "answer": served.get("text", served.get("error", "")).astype(str)
            .str.replace(r"\s+", " ", regex=True).str.strip().str.slice(0, 120),
            "latency_s": served.get("latency_s")})
        tiers = sorted(shown["tier"].dropna().unique())
        md += ["\n## 4. Served through the Serve graph\n\n",
               (f"Threshold {demo['threshold']:.3f}, calibrated for a {demo['target_share']:.0%} strong share on the "
                "cross-fitted gold scores" if demo["how"] == "calibrated" else
                f"Threshold {demo['threshold']:.3f}: {demo['how']} (calibrated for a {demo['target_share']:.0%} strong "
                f"share: {demo['calibrated']:.3f})") + f". Tiers used: {', '.join(tiers) or 'none'}.\n\n",
               md_table(shown) + "\n"]
    (out / "report.md").write_text("".join(md), encoding="utf-8")
    return out / "report.md"
