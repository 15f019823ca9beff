"""Routing metrics: strong-call share, quality, PGR, APGR (paper and RouteLLM-code versions),
CPT without monotonicity assumptions, cost-saving ratio, N-way cost-quality frontier and AIQ,
and bootstrap confidence intervals.

Conventions: ``score`` is the router's P(strong wins) (higher -> strong); ``s_strong`` and
``s_weak`` are per-query qualities of the two models (0/1 correctness, or judge scores);
shares are fractions in [0, 1] (not percent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd


def _arrays(score, s_strong, s_weak):
    score = np.asarray(score, float)
    s_strong = np.asarray(s_strong, float)
    s_weak = np.asarray(s_weak, float)
    if not (score.shape == s_strong.shape == s_weak.shape) or score.ndim != 1:
        raise ValueError(f"shapes differ: score {score.shape}, strong {s_strong.shape}, weak {s_weak.shape}")
    if len(score) == 0:
        raise ValueError("empty evaluation set")
    return score, s_strong, s_weak


def pgr(quality, q_weak: float, q_strong: float):
    """Performance gap recovered: (quality - weak) / (strong - weak)."""
    gap = q_strong - q_weak
    if gap == 0:
        return np.full_like(np.asarray(quality, float), np.nan)
    return (np.asarray(quality, float) - q_weak) / gap


def route_at_threshold(score, s_strong, s_weak, threshold: float, strict: bool = False):
    """(strong share, quality) of 'strong iff score >= threshold' (> if strict)."""
    score, s_strong, s_weak = _arrays(score, s_strong, s_weak)
    sel = score > threshold if strict else score >= threshold
    return float(sel.mean()), float(np.where(sel, s_strong, s_weak).mean())


def full_curve(score, s_strong, s_weak) -> pd.DataFrame:
    """Every operating point a threshold on ``score`` can realise (queries with equal scores
    move together), from share 0 to share 1: columns threshold, strong_share, quality."""
    score, s_strong, s_weak = _arrays(score, s_strong, s_weak)
    n = len(score)
    order = np.argsort(-score, kind="stable")
    ss = score[order]
    gain = (s_strong - s_weak)[order]
    cum = np.concatenate([[0.0], np.cumsum(gain)])
    # boundaries between distinct score values (after position k-1): k = 0, ..., n
    ks = np.concatenate([[0], np.flatnonzero(np.diff(ss) != 0) + 1, [n]])
    thr = np.concatenate([[np.inf], ss[ks[1:] - 1]])
    return pd.DataFrame({"threshold": thr, "strong_share": ks / n, "quality": s_weak.mean() + cum[ks] / n})


def routellm_curve(score, s_strong, s_weak, num_results: int = 10) -> pd.DataFrame:
    """RouteLLM's evaluation curve: thresholds at the ``num_results``-quantile bin edges of the
    scores (``pd.qcut``), 'strong iff score >= t' except '> t' for the top edge.  Duplicate
    edges are dropped (``pd.qcut`` would raise).  Sorted by strong share."""
    score, s_strong, s_weak = _arrays(score, s_strong, s_weak)
    edges = np.unique(np.quantile(score, np.linspace(0, 1, num_results + 1)))
    rows = []
    for i, t in enumerate(edges):
        share, q = route_at_threshold(score, s_strong, s_weak, t, strict=(i == len(edges) - 1))
        rows.append((t, share, q))
    df = pd.DataFrame(rows, columns=["threshold", "strong_share", "quality"])
    return df.sort_values("strong_share", kind="stable").reset_index(drop=True)


def apgr_from_curve(curve: pd.DataFrame, q_weak: float, q_strong: float) -> float:
    """RouteLLM's code: trapezoid area under quality vs strong share, normalised by the areas of
    the all-weak and all-strong lines over the same share range."""
    c = curve.sort_values("strong_share", kind="stable")
    x, y = c["strong_share"].to_numpy(float), c["quality"].to_numpy(float)
    span = x[-1] - x[0]
    if span <= 0 or q_strong == q_weak:
        return float("nan")
    auc = np.trapezoid(y, x)
    return float((auc - q_weak * span) / ((q_strong - q_weak) * span))


def apgr_routellm(score, s_strong, s_weak, num_results: int = 10) -> float:
    """APGR as RouteLLM's evaluate.py computes it (random router ~ 0.5)."""
    score, s_strong, s_weak = _arrays(score, s_strong, s_weak)
    return apgr_from_curve(routellm_curve(score, s_strong, s_weak, num_results), s_weak.mean(), s_strong.mean())


def quality_at_share(score, s_strong, s_weak, share: float) -> float:
    """Quality when exactly round(share * n) queries go strong (highest scores first; ties are
    broken by input order, so this is an exact budget, not a threshold)."""
    score, s_strong, s_weak = _arrays(score, s_strong, s_weak)
    n = len(score)
    k = int(round(share * n))
    order = np.argsort(-score, kind="stable")
    sel = np.zeros(n, bool)
    sel[order[:k]] = True
    return float(np.where(sel, s_strong, s_weak).mean())


def apgr_paper(score, s_strong, s_weak, n_points: int = 10) -> float:
    """APGR as the paper writes it: (1/10) * sum_i PGR at strong shares c_i = i/10, i=1..10
    (a right Riemann sum, so a random router scores ~0.55 here, not 0.5)."""
    score, s_strong, s_weak = _arrays(score, s_strong, s_weak)
    qw, qs = s_weak.mean(), s_strong.mean()
    vals = [pgr(quality_at_share(score, s_strong, s_weak, i / n_points), qw, qs) for i in range(1, n_points + 1)]
    return float(np.mean(vals))


def cpt(score, s_strong, s_weak, x: float) -> float:
    """Call-performance threshold: the smallest strong share, over every threshold the router
    can realise, whose PGR >= x.  Scans the actual curve (no monotonicity or interpolation)."""
    score, s_strong, s_weak = _arrays(score, s_strong, s_weak)
    c = full_curve(score, s_strong, s_weak)
    p = pgr(c["quality"].to_numpy(), s_weak.mean(), s_strong.mean())
    ok = np.flatnonzero(p >= x - 1e-12)
    return float(c["strong_share"].iloc[ok[0]]) if len(ok) else float("nan")


def cpt_from_curve(curve: pd.DataFrame, q_weak: float, q_strong: float, x: float) -> float:
    """Smallest share among the given curve's points with PGR >= x (no interpolation)."""
    c = curve.sort_values("strong_share", kind="stable")
    p = pgr(c["quality"].to_numpy(), q_weak, q_strong)
    ok = np.flatnonzero(p >= x - 1e-12)
    return float(c["strong_share"].iloc[ok[0]]) if len(ok) else float("nan")


def cpt_routellm(score, s_strong, s_weak, x: float, num_results: int = 10) -> float:
    """RouteLLM's code: np.interp of the target quality on its 11-point curve (assumes quality
    increases with share; wrong for non-monotone curves, kept to compare with published numbers)."""
    score, s_strong, s_weak = _arrays(score, s_strong, s_weak)
    c = routellm_curve(score, s_strong, s_weak, num_results)
    qw, qs = s_weak.mean(), s_strong.mean()
    return float(np.interp(x * (qs - qw) + qw, c["quality"], c["strong_share"]))


def cost_saving_ratio(strong_share: float, cost_strong: float = 1.0, cost_weak: float = 0.0) -> float:
    """Cost of sending everything to the strong model / cost of the routed mix."""
    mix = strong_share * cost_strong + (1 - strong_share) * cost_weak
    return float("inf") if mix == 0 else float(cost_strong / mix)


def binary_summary(score, s_strong, s_weak, num_results: int = 10) -> dict:
    """The headline numbers of a strong/weak router on one evaluation set."""
    score, s_strong, s_weak = _arrays(score, s_strong, s_weak)
    out = {
        "n": len(score),
        "q_strong": float(s_strong.mean()),
        "q_weak": float(s_weak.mean()),
        "apgr": apgr_routellm(score, s_strong, s_weak, num_results),
        "apgr_paper": apgr_paper(score, s_strong, s_weak, num_results),
        "cpt50": cpt(score, s_strong, s_weak, 0.5),
        "cpt80": cpt(score, s_strong, s_weak, 0.8),
        "cpt50_routellm": cpt_routellm(score, s_strong, s_weak, 0.5, num_results),
        "cpt80_routellm": cpt_routellm(score, s_strong, s_weak, 0.8, num_results),
    }
    out["cost_saving_50"] = cost_saving_ratio(out["cpt50"])
    return out


# --------------------------------------------------------------------------------------------
# Bootstrap.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CI:
    value: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}]"

    def fmt(self, pct: bool = False) -> str:
        if pct:
            return f"{100 * self.value:.1f}% [{100 * self.lo:.1f}, {100 * self.hi:.1f}]"
        return str(self)


def bootstrap(metric: Callable[..., float], *arrays, n_boot: int = 200, alpha: float = 0.05,
              seed: int = 0) -> CI:
    """Percentile bootstrap over queries: resample rows of all ``arrays`` jointly."""
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    point = float(metric(*arrays))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        try:
            v = float(metric(*[a[idx] for a in arrays]))
        except (ValueError, ZeroDivisionError):
            continue
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return CI(point, float("nan"), float("nan"))
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return CI(point, float(lo), float(hi))


def binary_summary_ci(score, s_strong, s_weak, n_boot: int = 200, seed: int = 0) -> dict[str, CI]:
    f = {
        "apgr": apgr_routellm,
        "apgr_paper": apgr_paper,
        "cpt50": lambda a, b, c: cpt(a, b, c, 0.5),
        "cpt80": lambda a, b, c: cpt(a, b, c, 0.8),
    }
    return {k: bootstrap(fn, score, s_strong, s_weak, n_boot=n_boot, seed=seed) for k, fn in f.items()}


# --------------------------------------------------------------------------------------------
# N-way routing: cost-quality points, frontier, AIQ.
# --------------------------------------------------------------------------------------------
def choose_models(pred_quality: np.ndarray, cost: np.ndarray, lam: float) -> np.ndarray:
    """Per query, argmax of predicted quality - lam * cost (cost per query or per model)."""
    pred_quality = np.asarray(pred_quality, float)
    cost = np.broadcast_to(np.asarray(cost, float), pred_quality.shape)
    return np.argmax(pred_quality - lam * cost, axis=1)


def realised(choice: np.ndarray, scores: np.ndarray, costs: np.ndarray) -> tuple[float, float]:
    """(mean cost, mean quality) actually obtained by the per-query model choice."""
    r = np.arange(len(choice))
    return float(np.asarray(costs)[r, choice].mean()), float(np.asarray(scores)[r, choice].mean())


def nway_curve(pred_quality, scores, costs, lambdas: Sequence[float] | None = None,
               cost_for_choice=None) -> pd.DataFrame:
    """Sweep the cost-quality trade-off lambda: columns lam, cost, quality.

    ``cost_for_choice`` is the cost the router believes (default: per-model mean of ``costs``,
    as a router does not know a query's true cost before running it)."""
    scores, costs = np.asarray(scores, float), np.asarray(costs, float)
    cb = costs.mean(0) if cost_for_choice is None else np.asarray(cost_for_choice, float)
    if lambdas is None:
        scale = 1.0 / max(float(np.ptp(cb)), 1e-12)
        lambdas = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 60) * scale])
    rows = [(lam, *realised(choose_models(pred_quality, cb, lam), scores, costs)) for lam in lambdas]
    return pd.DataFrame(rows, columns=["lam", "cost", "quality"])


def upper_frontier(cost, quality) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing concave upper envelope of (cost, quality) points: the best quality
    reachable at each cost by mixing operating points (RouterBench's 'non-decreasing convex
    hull').  Returns the hull vertices sorted by cost."""
    pts = sorted(set(zip(np.asarray(cost, float), np.asarray(quality, float))))
    hull: list[tuple[float, float]] = []
    for p in pts:  # monotone chain, upper part
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    # non-decreasing: cut after the maximum quality
    hx, hy = np.array([h[0] for h in hull]), np.array([h[1] for h in hull])
    imax = int(np.argmax(hy))
    return hx[: imax + 1], hy[: imax + 1]


def frontier_value(hx, hy, c) -> np.ndarray:
    """Frontier quality at cost(s) c: flat left of the cheapest vertex and right of the best."""
    return np.interp(np.asarray(c, float), hx, hy)


def aiq(cost, quality, c_lo: float, c_hi: float, n_grid: int = 2001) -> float:
    """Average improvement in quality (RouterBench): mean of the non-decreasing concave frontier
    over costs [c_lo, c_hi] (e.g. cheapest single model to the best single model)."""
    if c_hi <= c_lo:
        raise ValueError(f"need c_hi > c_lo, got {c_lo}, {c_hi}")
    hx, hy = upper_frontier(cost, quality)
    grid = np.linspace(c_lo, c_hi, n_grid)
    return float(np.trapezoid(frontier_value(hx, hy, grid), grid) / (c_hi - c_lo))


def cost_to_reach(cost, quality, target_quality: float) -> float:
    """Smallest cost on the frontier (mixing allowed) whose quality >= target; nan if never."""
    hx, hy = upper_frontier(cost, quality)
    if hy[-1] < target_quality:
        return float("nan")
    i = int(np.argmax(hy >= target_quality))
    if i == 0:
        return float(hx[0])
    x0, x1, y0, y1 = hx[i - 1], hx[i], hy[i - 1], hy[i]
    return float(x0 + (target_quality - y0) * (x1 - x0) / (y1 - y0))


def single_models(scores, costs, models: Sequence[str]) -> pd.DataFrame:
    s, c = np.asarray(scores, float), np.asarray(costs, float)
    return pd.DataFrame({"model": list(models), "cost": c.mean(0), "quality": s.mean(0)})
