"""Honest router evaluation.

* ``cross_fit``: k-fold cross-fitting over questions -- every question's score comes from a
  router fitted on the other folds (fixed seed), so the whole benchmark is scored out-of-fold.
* ``calibrate`` / ``apply_thresholds``: thresholds for target strong-call shares chosen on a
  calibration split and applied to a test split; the achieved share drifts, and we report it.
* ``out_of_distribution``: fit on one benchmark, score another.
* ``evaluate_routers``: routers x benchmarks -> metrics table with bootstrap CIs, plots, markdown.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from rayeval.eval.html import write_html
from rayeval.route import metrics as M
from rayeval.prefs.outcomes import Outcomes, load_routellm
from rayeval.route.routers import Router, make_router

RouterSpec = "tuple[str, dict] | Router"


def _make(spec) -> Router:
    if isinstance(spec, Router):
        return spec.clone()
    if isinstance(spec, str):
        return make_router(spec)
    name, params = spec
    return make_router(name, **(params or {}))


def _label(spec) -> str:
    if isinstance(spec, Router):
        return spec.name
    if isinstance(spec, str):
        return spec
    name, params = spec
    return name if not params else f"{name}({', '.join(f'{k}={v}' for k, v in params.items())})"


def embeddings_for(outcomes: Outcomes, embedder: str = "minilm-l6") -> np.ndarray:
    from rayeval.route.embed import embed

    return embed(outcomes.texts, embedder)


def folds(n: int, k: int = 5, seed: int = 0) -> np.ndarray:
    """Fold id per question: a seeded random permutation cut into k near-equal parts."""
    if k < 2 or k > n:
        raise ValueError(f"need 2 <= k <= n, got k={k}, n={n}")
    f = np.empty(n, int)
    f[np.random.default_rng(seed).permutation(n)] = np.arange(n) % k
    return f


def cross_fit(spec, outcomes: Outcomes, embeddings: np.ndarray | None = None, k: int = 5, seed: int = 0,
              fold_ids: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold P(strong wins) for every query of ``outcomes``."""
    fid = folds(len(outcomes), k, seed) if fold_ids is None else np.asarray(fold_ids)
    proto = _make(spec)
    if embeddings is None and proto.needs_embeddings:
        embeddings = embeddings_for(outcomes, getattr(proto, "embedder", "minilm-l6"))
    out = np.full(len(outcomes), np.nan)
    texts = np.array(outcomes.texts, dtype=object)
    for f in np.unique(fid):
        tr, te = np.flatnonzero(fid != f), np.flatnonzero(fid == f)
        r = proto.clone()
        r.fit(outcomes.subset(tr), None if embeddings is None else embeddings[tr])
        out[te] = r.win_probability(texts[te].tolist(), None if embeddings is None else embeddings[te],
                                    groups=outcomes.groups[te])
    return out


def crossfit_similarity(embeddings: np.ndarray, fold_ids: np.ndarray) -> float:
    """RouteLLM's benchmark-dataset similarity for cross-fitting: mean over questions of the best
    cosine similarity to any question of the folds the router was trained on (its own fold out)."""
    from rayeval.prefs.similarity import best_similarities

    fid = np.asarray(fold_ids)
    best = np.empty(len(fid))
    for f in np.unique(fid):
        te = fid == f
        best[te] = best_similarities(embeddings[te], embeddings[~te])
    return float(best.mean())


def summarize(score: np.ndarray, outcomes: Outcomes, n_boot: int = 200, seed: int = 0,
              strong: str | None = None, weak: str | None = None) -> dict[str, Any]:
    s, w = outcomes.pair_arrays(strong, weak)
    out: dict[str, Any] = M.binary_summary(score, s, w)
    if n_boot:
        out["ci"] = {k: (v.lo, v.hi) for k, v in M.binary_summary_ci(score, s, w, n_boot, seed).items()}
    return out


def cross_val_apgr(name: str, params: dict | None, outcomes: Outcomes, embeddings: np.ndarray | None = None,
                   k: int = 5, seed: int = 0) -> float:
    """One number for hyperparameter search: cross-fitted APGR (RouteLLM's computation)."""
    s, w = outcomes.pair_arrays()
    return M.apgr_routellm(cross_fit((name, params or {}), outcomes, embeddings, k, seed), s, w)


def fit_evaluate(name: str, params: dict | None, train: Outcomes, valid: Outcomes,
                 train_embeddings: np.ndarray | None = None, valid_embeddings: np.ndarray | None = None) -> dict:
    """Fit on ``train``, score ``valid``: {"apgr", "apgr_paper", "cpt50", "cpt80", ...}."""
    r = make_router(name, **(params or {}))
    r.fit(train, train_embeddings)
    p = r.win_probability(valid.texts, valid_embeddings, groups=valid.groups)
    return summarize(p, valid, n_boot=0, strong=r.strong_, weak=r.weak_)


# --------------------------------------------------------------------------------------------
# Threshold calibration.
# --------------------------------------------------------------------------------------------
def calibrate(cal_scores: np.ndarray, target_shares: Sequence[float]) -> dict[float, float]:
    """Threshold per target strong share: route strong iff score >= threshold, with the
    threshold at the (1 - share) quantile of the calibration scores."""
    cal_scores = np.asarray(cal_scores, float)
    out = {}
    for t in target_shares:
        if not 0 <= t <= 1:
            raise ValueError(f"target share {t} outside [0, 1]")
        out[float(t)] = float(np.inf if t == 0 else np.quantile(cal_scores, 1 - t, method="higher"))
    return out


def apply_thresholds(scores: np.ndarray, thresholds: dict[float, float], outcomes: Outcomes | None = None) -> pd.DataFrame:
    """Achieved strong share (and quality/PGR when outcomes are given) per calibrated target."""
    scores = np.asarray(scores, float)
    rows = []
    for target, thr in sorted(thresholds.items()):
        sel = scores >= thr
        row = {"target_share": target, "threshold": thr, "achieved_share": float(sel.mean()),
               "drift": float(sel.mean() - target)}
        if outcomes is not None:
            s, w = outcomes.pair_arrays()
            q = float(np.where(sel, s, w).mean())
            row.update(quality=q, pgr=float(M.pgr(q, w.mean(), s.mean())))
        rows.append(row)
    return pd.DataFrame(rows)


def calibration_study(spec, outcomes: Outcomes, targets=(0.2, 0.5, 0.8), embeddings=None, k: int = 5,
                      seed: int = 0, cal_fraction: float = 0.5) -> pd.DataFrame:
    """Cross-fitted scores, split questions into calibration / test halves; thresholds from the
    calibration half are applied to the test half."""
    score = cross_fit(spec, outcomes, embeddings, k, seed)
    perm = np.random.default_rng(seed + 1).permutation(len(outcomes))
    ncal = int(cal_fraction * len(outcomes))
    cal, test = perm[:ncal], perm[ncal:]
    thr = calibrate(score[cal], targets)
    return apply_thresholds(score[test], thr, outcomes.subset(test))


def out_of_distribution(spec, train: Outcomes, test: Outcomes, train_embeddings=None, test_embeddings=None,
                        n_boot: int = 200) -> dict:
    """Fit on all of ``train`` (one benchmark), score all of ``test`` (another)."""
    r = _make(spec)
    if r.needs_embeddings:
        train_embeddings = embeddings_for(train) if train_embeddings is None else train_embeddings
        test_embeddings = embeddings_for(test) if test_embeddings is None else test_embeddings
    r.fit(train, train_embeddings)
    p = r.win_probability(test.texts, test_embeddings, groups=test.groups)
    return summarize(p, test, n_boot=n_boot, strong=r.strong_, weak=r.weak_)


# --------------------------------------------------------------------------------------------
# Routers x benchmarks.
# --------------------------------------------------------------------------------------------
_SIDE = {"use_groups": True, "use_length": True}
DEFAULT_ROUTERS: list[tuple[str, dict]] = [
    ("random", {}), ("length", {}), ("knn", {"k": 50}), ("sw_ranking", {"gamma": 10.0}),
    ("sw_ranking", {"gamma": 1000.0, "group_weight": 0.5, "length_weight": 0.25}),
    ("mf", {}), ("mf", {"objective": "pointwise", **_SIDE}), ("logistic", {"C": 0.1}), ("logistic", {"C": 0.1, **_SIDE}),
    ("group", {}), ("blend", {}),
]


@dataclass
class EvalResult:
    rows: list[dict] = field(default_factory=list)
    curves: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)
    scores: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    similarity: dict[str, float] = field(default_factory=dict)  # benchmark -> train->test similarity

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def evaluate_routers(routers: Sequence = tuple(DEFAULT_ROUTERS), benchmarks: Sequence[str] = ("mmlu", "gsm8k", "mt_bench"),
                     k: int = 5, seed: int = 0, n_boot: int = 200, log=print,
                     outcomes: dict[str, Outcomes] | None = None) -> EvalResult:
    res = EvalResult()
    for b in benchmarks:
        o = outcomes[b] if outcomes and b in outcomes else load_routellm(b)
        emb = embeddings_for(o)
        s, w = o.pair_arrays()
        fid = folds(len(o), k, seed)
        res.similarity[b] = crossfit_similarity(emb, fid)
        log(f"{b:9s} train->test similarity (cross-fitted, MiniLM) {res.similarity[b]:.4f}")
        res.curves[("oracle", b)] = M.full_curve(s - w, s, w)
        for spec in routers:
            t0 = time.time()
            lab = _label(spec)
            sc = cross_fit(spec, o, emb, k, seed, fold_ids=fid)
            summ = summarize(sc, o, n_boot=n_boot, seed=seed)
            row = {"router": lab, "benchmark": b, "similarity": res.similarity[b], **{k_: v for k_, v in summ.items() if k_ != "ci"},
                   "seconds": round(time.time() - t0, 1)}
            for m, (lo, hi) in summ.get("ci", {}).items():
                row[f"{m}_lo"], row[f"{m}_hi"] = lo, hi
            res.rows.append(row)
            res.curves[(lab, b)] = M.full_curve(sc, s, w)
            res.scores[(lab, b)] = sc
            log(f"{b:9s} {lab:40s} APGR {row['apgr']:.3f}  CPT50 {row['cpt50']:.3f}  ({row['seconds']}s)")
    return res


def _ci(row, m, pct=False):
    v, lo, hi = row[m], row.get(f"{m}_lo"), row.get(f"{m}_hi")
    if lo is None or (isinstance(lo, float) and np.isnan(lo)):
        return f"{100 * v:.1f}%" if pct else f"{v:.3f}"
    return f"{100 * v:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]" if pct else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def df_markdown(df: pd.DataFrame) -> str:
    """A plain markdown table (no tabulate dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def markdown_table(table: pd.DataFrame) -> str:
    sim = "similarity" in table.columns
    lines = ["| router | benchmark | APGR (RouteLLM code) | APGR (paper, 10-pt) | CPT(50%) | CPT(80%) |"
             + (" train->test similarity |" if sim else ""),
             "|---|---|---|---|---|---|" + ("---|" if sim else "")]
    for _, r in table.iterrows():
        r = r.to_dict()
        lines.append(f"| {r['router']} | {r['benchmark']} | {_ci(r, 'apgr')} | {_ci(r, 'apgr_paper')} | "
                     f"{_ci(r, 'cpt50', True)} | {_ci(r, 'cpt80', True)} |"
                     + (f" {r['similarity']:.4f} |" if sim else ""))
    return "\n".join(lines)


def plot_curves(res: EvalResult, benchmark: str, path: Path, outcomes: Outcomes | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for (lab, b), c in res.curves.items():
        if b != benchmark:
            continue
        style = {"oracle": dict(color="k", ls=":"), "random": dict(color="grey", ls="--")}.get(lab, {})
        ax.plot(100 * c["strong_share"], c["quality"], label=lab, lw=1.2, **style)
    ax.set_xlabel("strong-model calls (%)")
    ax.set_ylabel("quality")
    ax.set_title(f"cost-quality, {benchmark} (cross-fitted)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(res: EvalResult, out_dir: str | Path, extra_md: str = "") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = res.table()
    t.to_csv(out / "metrics.csv", index=False)
    md = ["# Router evaluation", "",
          "k-fold cross-fitted scores (each question scored by a router that never saw it), "
          "95% percentile-bootstrap CIs over questions (predictions held fixed).  Train->test similarity: "
          "RouteLLM's benchmark-dataset similarity of each question to the folds its router was trained on "
          "(mean best cosine, MiniLM embeddings).", "",
          markdown_table(t), ""]
    for b in sorted({b for _, b in res.curves}):
        p = plot_curves(res, b, out / f"curve_{b}.png")
        md.append(f"![{b}]({p.name})")
    if extra_md:
        md += ["", extra_md]
    (out / "report.md").write_text("\n".join(md) + "\n")
    write_html(out / "report.md")  # report.html: the same page with the cost-quality curves inlined
    (out / "scores.json").write_text(json.dumps({f"{a}|{b}": v.tolist() for (a, b), v in res.scores.items()}))
    return out / "report.md"


# --------------------------------------------------------------------------------------------
# N-way (RouterBench).
# --------------------------------------------------------------------------------------------
def nway_study(name: str, params: dict | None, train: Outcomes, test: Outcomes, target: float = 0.95,
               train_embeddings=None, test_embeddings=None, n_boot: int = 100, seed: int = 0) -> dict:
    """Fit an N-way router on ``train``; on ``test`` sweep lambda, build the frontier, and report
    AIQ (between the cheapest and the best single model's cost) and the cost needed to reach
    ``target`` x the best single model's quality, as a fraction of that model's cost."""
    r = make_router(name, **(params or {}))
    r.fit(train, train_embeddings)
    pq = r.predict_quality(test.texts, test_embeddings)  # the router embeds its own view of the text
    S, C = test.scores.to_numpy(float), test.costs.to_numpy(float)
    curve = M.nway_curve(pq, S, C, cost_for_choice=r.cost_)
    single = M.single_models(S, C, test.models)
    best = single.sort_values(["quality", "cost"], ascending=[False, True]).iloc[0]
    cheap = single.sort_values("cost").iloc[0]
    oracle_choice = np.argmax(S - 1e-9 * C, axis=1)  # best model, cheapest among ties
    oc, oq = M.realised(oracle_choice, S, C)
    c_lo, c_hi = float(cheap["cost"]), float(best["cost"])
    res = {
        "router": name, "params": params or {}, "task": test.name,
        "best_model": best["model"], "best_quality": float(best["quality"]), "best_cost": float(best["cost"]),
        "aiq": M.aiq(curve["cost"], curve["quality"], c_lo, c_hi),
        "aiq_single_models": M.aiq(single["cost"], single["quality"], c_lo, c_hi),
        "cost_frac_at_target": M.cost_to_reach(curve["cost"], curve["quality"], target * float(best["quality"]))
        / float(best["cost"]),
        "single_cost_frac_at_target": M.cost_to_reach(single["cost"], single["quality"], target * float(best["quality"]))
        / float(best["cost"]),
        "router_max_quality": float(curve["quality"].max()),
        "oracle_quality": oq, "oracle_cost_frac": oc / float(best["cost"]),
    }
    if n_boot:
        def _aiq(pq_, S_, C_):
            c = M.nway_curve(pq_, S_, C_, cost_for_choice=r.cost_)
            return M.aiq(c["cost"], c["quality"], c_lo, c_hi)

        ci = M.bootstrap(_aiq, pq, S, C, n_boot=n_boot, seed=seed)
        res["aiq_ci"] = (ci.lo, ci.hi)
    res["curve"] = curve
    res["single"] = single
    return res
