"""Paired statistics on per-item correctness: which accuracy changes are real, which models are tied.

Everything here works on a correctness matrix ``C`` (items x columns, 0/1), a column being a model
(or a model under one condition).  Bootstraps resample items, and every column sees the same
resampled items: the comparisons are paired.  Resamples are drawn as item counts ``W``
(n_boot x n_items: how often each item is drawn), so bootstrap accuracies are one matrix
product ``W @ C / n``.

  mcnemar            exact McNemar test of two paired 0/1 vectors (statsmodels)
  adjust_pvalues     Holm / Benjamini-Hochberg / Bonferroni control (statsmodels multipletests)
  boot_weights       the resampled item counts, seeded
  paired_delta       Δacc = mean(b) - mean(a) with a paired bootstrap percentile interval
  rank_stats         accuracy and rank with bootstrap intervals per column, every pairwise test,
                     and the groups of statistically tied columns
  tied_groups        the grouping rule on its own
  kendall_interval   Kendall τ between two conditions' orderings, with a bootstrap interval
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

# scipy.stats and statsmodels are imported where they are used: configs import CORRECTIONS, and so
# does every evaluation actor, which needs neither (scipy.stats alone is 0.5 s of each one's start).

CORRECTIONS = ("holm", "fdr_bh", "bonferroni", "none")


def check_correction(method: str) -> str:
    if method not in CORRECTIONS:
        raise ValueError(f"correction: {method!r} is not one of {CORRECTIONS}")
    return method


def _as01(x: Sequence, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != bool and not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name}: expected 0/1 (or bool) values, got {sorted(set(np.unique(a).tolist()) - {0, 1})[:5]}")
    return a.astype(bool)


def mcnemar(a: Sequence, b: Sequence) -> dict[str, float]:
    """Exact McNemar test of paired outcomes ``a`` (reference) and ``b`` on the same items.

    Returns n_only_a (a right, b wrong), n_only_b (b right, a wrong) and the two-sided exact p-value
    (binomial on the discordant pairs; 1.0 when there are none)."""
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

    a, b = _as01(a, "a"), _as01(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"mcnemar: a and b differ in length ({len(a)} vs {len(b)}); they must be the same items")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    both, neither = int((a & b).sum()), int((~a & ~b).sum())
    p = 1.0 if only_a + only_b == 0 else float(sm_mcnemar([[both, only_a], [only_b, neither]], exact=True).pvalue)
    return {"n_only_a": only_a, "n_only_b": only_b, "p_value": p}


def adjust_pvalues(p: Sequence[float], method: str = "holm", alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(adjusted p-values, reject at ``alpha``) for a family of tests; NaN p-values stay NaN, not rejected."""
    from statsmodels.stats.multitest import multipletests

    check_correction(method)
    p = np.asarray(p, dtype=float)
    adj, rej = p.copy(), np.zeros(len(p), dtype=bool)
    ok = ~np.isnan(p)
    if ok.any():
        if method == "none" or ok.sum() == 1:  # one test: every method leaves its p alone
            adj[ok], rej[ok] = p[ok], p[ok] <= alpha
        else:
            r, a, _, _ = multipletests(p[ok], alpha=alpha, method=method)
            adj[ok], rej[ok] = a, r
    return adj, rej


def boot_weights(n_items: int, n_boot: int, seed: int) -> np.ndarray:
    """How often each item is drawn in each of ``n_boot`` resamples of ``n_items`` items (with replacement)."""
    if n_items < 1:
        raise ValueError("bootstrap: no items to resample")
    idx = np.random.default_rng(seed).integers(0, n_items, size=(n_boot, n_items))
    idx += np.arange(n_boot)[:, None] * n_items  # row r counts into its own block of n_items bins
    return np.bincount(idx.ravel(), minlength=n_boot * n_items).reshape(n_boot, n_items).astype(np.int32)


def _bounds(x: np.ndarray, ci: float, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    q = (1 - ci) / 2
    return np.quantile(x, q, axis=axis), np.quantile(x, 1 - q, axis=axis)


def boot_accuracy(C: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Accuracy (share) of each column in each resample: (n_boot, n_columns)."""
    # float32 is exact for counts below 2^24 and halves the memory of full-MMLU resamples
    return (W.astype(np.float32) @ np.asarray(C, dtype=np.float32)).astype(float) / W.sum(axis=1, keepdims=True)


def paired_delta(a: Sequence, b: Sequence, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                 W: np.ndarray | None = None) -> tuple[float, float, float]:
    """Δacc = acc(b) - acc(a) (shares) on the same items, with a paired bootstrap percentile interval."""
    d = _as01(b, "b").astype(float) - _as01(a, "a").astype(float)
    W = boot_weights(len(d), n_boot, seed) if W is None else W
    boot = W @ d / W.sum(axis=1)
    lo, hi = _bounds(boot, ci)
    return float(d.mean()), float(lo), float(hi)


def boot_ranks(acc: np.ndarray) -> np.ndarray:
    """Rank (1 = best, ties share the better rank) of each column, per row of ``acc``."""
    from scipy.stats import rankdata

    return rankdata(-np.asarray(acc), method="min", axis=-1).astype(int)


def tied_groups(acc: Sequence[float], different: np.ndarray) -> np.ndarray:
    """Group number (1 = best) of each column.

    Columns are taken best-first by accuracy; a group opens with the best column not yet grouped
    and takes every following column that is not significantly different from any member
    (``different[i, j]`` True: i and j differ significantly); the first column that differs from
    a member opens the next group.  Groups are therefore runs of the accuracy order."""
    acc = np.asarray(acc, dtype=float)
    order = np.argsort(-acc, kind="stable")
    group = np.zeros(len(acc), dtype=int)
    members: list[int] = []
    g = 0
    for i in order:
        if not members or any(different[i, j] for j in members):
            g += 1
            members = []
        members.append(int(i))
        group[i] = g
    return group


def rank_stats(C: np.ndarray, names: Sequence[str], n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
               alpha: float = 0.05, correction: str = "holm") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per column: n, acc, acc_lo/hi, rank, rank_lo/hi (bootstrap percentiles) and tied group;
    per pair (a better or equal): Δacc with its paired interval, McNemar p, adjusted p, significant.

    Accuracies in points.  The pairwise family (all pairs of this matrix) is controlled by
    ``correction``; tied groups use its rejections (see ``tied_groups``)."""
    check_correction(correction)
    C = np.asarray(C).astype(bool)
    n, k = C.shape
    if k != len(names):
        raise ValueError(f"rank_stats: {k} columns but {len(names)} names")
    W = boot_weights(n, n_boot, seed)
    bacc = boot_accuracy(C, W)
    acc = C.mean(axis=0)
    ranks = boot_ranks(bacc)
    a_lo, a_hi = _bounds(bacc, ci)
    q = (1 - ci) / 2
    r_lo = np.quantile(ranks, q, axis=0, method="lower")
    r_hi = np.quantile(ranks, 1 - q, axis=0, method="higher")

    pairs = []
    for i in range(k):
        for j in range(i + 1, k):
            better_i = acc[i] > acc[j] or (acc[i] == acc[j] and names[i] <= names[j])
            a, b = (i, j) if better_i else (j, i)  # a: the better one
            d = bacc[:, a] - bacc[:, b]
            lo, hi = _bounds(d, ci)
            t = mcnemar(C[:, a], C[:, b])
            pairs.append({"model_a": names[a], "model_b": names[b], "_a": a, "_b": b, "n": n,
                          "acc_a": 100 * acc[a], "acc_b": 100 * acc[b], "delta_acc": 100 * (acc[a] - acc[b]),
                          "delta_lo": 100 * float(lo), "delta_hi": 100 * float(hi),
                          "n_only_a": t["n_only_a"], "n_only_b": t["n_only_b"], "p_mcnemar": t["p_value"]})
    pw = pd.DataFrame(pairs, columns=["model_a", "model_b", "_a", "_b", "n", "acc_a", "acc_b", "delta_acc",
                                      "delta_lo", "delta_hi", "n_only_a", "n_only_b", "p_mcnemar"])
    pw["p_adj"], pw["significant"] = adjust_pvalues(pw["p_mcnemar"].to_numpy(), correction, alpha)
    different = np.zeros((k, k), dtype=bool)
    for a, b, s in zip(pw["_a"], pw["_b"], pw["significant"]):
        different[a, b] = different[b, a] = bool(s)
    per = pd.DataFrame({"model": list(names), "n": n, "acc": 100 * acc, "acc_lo": 100 * a_lo, "acc_hi": 100 * a_hi,
                        "rank": boot_ranks(acc[None, :])[0], "rank_lo": r_lo.astype(int), "rank_hi": r_hi.astype(int),
                        "group": tied_groups(acc, different)})
    return per, pw.drop(columns=["_a", "_b"])


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall τ-b of each row of ``x`` against the same row of ``y`` (NaN where one row is constant):
    Σ sign(x_i - x_j) sign(y_i - y_j) / sqrt(#pairs untied in x · #pairs untied in y), which is
    scipy.stats.kendalltau's tau-b, vectorised over bootstrap resamples."""
    x, y = np.atleast_2d(x), np.atleast_2d(y)
    i, j = np.triu_indices(x.shape[1], k=1)
    sx, sy = np.sign(x[:, i] - x[:, j]), np.sign(y[:, i] - y[:, j])
    den = np.sqrt((sx != 0).sum(axis=1) * (sy != 0).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (sx * sy).sum(axis=1) / np.where(den > 0, den, 1), np.nan)


def kendall_interval(C_ref: np.ndarray, C_other: np.ndarray, n_boot: int = 1000, ci: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float, np.ndarray]:
    """Kendall τ-b between the accuracy orderings of two conditions over the same items and columns,
    its bootstrap percentile interval (items resampled jointly for both), and the bootstrap rank
    shift of each column (rank under ref minus rank under other; > 0 = moved up) as (n_boot, k)."""
    C_ref, C_other = np.asarray(C_ref, dtype=float), np.asarray(C_other, dtype=float)
    if C_ref.shape != C_other.shape:
        raise ValueError(f"kendall_interval: shapes differ {C_ref.shape} vs {C_other.shape}; need the same items and models")
    W = boot_weights(C_ref.shape[0], n_boot, seed)
    br, bo = boot_accuracy(C_ref, W), boot_accuracy(C_other, W)
    from scipy.stats import kendalltau

    tau = float(kendalltau(C_ref.mean(axis=0), C_other.mean(axis=0)).statistic) if C_ref.shape[1] >= 2 else np.nan
    if C_ref.shape[1] >= 2:
        taus = kendall_tau_b(br, bo)
        taus = taus[~np.isnan(taus)]
        lo, hi = _bounds(taus, ci) if len(taus) else (np.nan, np.nan)
    else:
        lo = hi = np.nan
    return tau, float(lo), float(hi), boot_ranks(br) - boot_ranks(bo)
