"""Metrics over per-item rows (the dicts ``scoring.reduce`` returns), with pandas.

Accuracies, recalls and RStd are in percentage points, as in the paper.  A "condition" is one
(dataset, setting, scoring); models are ranked within a condition.  Standard metrics use only
rotation-0 rows; rows with other rotations (settings with ``cyclic``) feed CircularEval,
permutation-averaged accuracy and PriDe.

  accuracy         acc with a seeded bootstrap CI (exact: a binomial resample of the mean)
  delta_acc        acc minus the baseline condition's acc, per model
  recall_by_gold   recall per gold position;  rstd: population std of those recalls
  rankings         rank of each model per condition (1 = best)
  kendall          Kendall tau (and (tau+1)/2) of each condition's ranking vs the baseline's
  rank_shift       each model's rank in the baseline vs in each condition (paper Figure 1)
  circular         CircularEval: correct only if correct under every cyclic rotation;
                   plus permutation-averaged accuracy over the same items
  pride            PriDe (Zheng et al. 2024): prior over positions from a few cyclically
                   permuted items, then debias the rest by dividing by it
  paired_tests     each condition vs its dataset's baseline, per model, on the same items: exact
                   McNemar, paired bootstrap interval of Δacc, Holm/BH control across the grid
  rank_table       per condition: bootstrap rank intervals (items resampled jointly for all
                   models), pairwise model tests, tied groups  (rayeval.eval.stats)
  rank_uncertainty rank_table plus, vs the baseline, the bootstrap interval of each rank shift and
                   of Kendall tau
  seed_variance    accuracy and rank spread across a setting's seed replicates (``seeds: K``)
  protocol_stability  per protocol (e.g. standard vs robust): Kendall tau, |rank shift| and
                   rank-interval width under its perturbations
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy.special import log_softmax, softmax
from scipy.stats import kendalltau

from rayeval.eval import stats as S
from rayeval.eval.config import base_setting
from rayeval.eval.scoring import in_calibration

GROUP = ["model", "dataset", "setting", "scoring"]
COND = ["dataset", "setting", "scoring"]


def to_frame(rows: Iterable[dict] | pd.DataFrame) -> pd.DataFrame:
    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    for c, default in (("dataset", ""), ("rotation", 0), ("model", ""), ("scoring", "symbol"), ("forced_gold", -1)):
        if c not in df.columns:
            df[c] = default
    if "correct" not in df.columns:
        df["correct"] = df["prediction"] == df["gold"]
    df["correct"] = df["correct"].astype(bool)
    return df


def main_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the standard (unrotated) evaluation."""
    return df[df["rotation"] == 0]


Baseline = "tuple[str, str] | dict[str, tuple[str, str]]"


def baseline_for(baseline: Any, dataset: str) -> tuple[str, str]:
    """The (setting, scoring) baseline of a dataset.  ``baseline`` is one pair for all datasets,
    or a dict {dataset: pair} with an optional "*" default (the paper: cloze for ARC, symbol for MMLU)."""
    if isinstance(baseline, dict):
        b = baseline.get(dataset, baseline.get("*"))
        if b is None:
            raise ValueError(f"no baseline for dataset {dataset!r} (and no '*' default) in {baseline}")
        return tuple(b)  # type: ignore[return-value]
    return tuple(baseline)  # type: ignore[return-value]


def baseline_mask(table: pd.DataFrame, baseline: Any) -> pd.Series:
    """True on the rows of ``table`` that are their dataset's baseline condition."""
    pairs = [baseline_for(baseline, d) for d in table["dataset"]]
    return pd.Series([(st, sc) == p for st, sc, p in zip(table["setting"], table["scoring"], pairs)],
                     index=table.index, dtype=bool)


def _seed(seed: int, key: Any) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\x1f{key}".encode(), digest_size=8).digest(), "little")


# ----------------------------------------------------------------------------- accuracy

def accuracy(df: pd.DataFrame, by: Sequence[str] = GROUP, n_boot: int = 1000, ci: float = 0.95,
             seed: int = 0) -> pd.DataFrame:
    """Accuracy (points) per group, with a bootstrap CI seeded per group (order-free)."""
    df = main_rows(to_frame(df))
    out = []
    for key, g in df.groupby(list(by), sort=True, dropna=False):
        n, k = len(g), int(g["correct"].sum())
        rng = np.random.default_rng(_seed(seed, key))
        # Resampling n Bernoulli outcomes with replacement: the count of correct ones is Binomial(n, k/n).
        boot = rng.binomial(n, k / n, size=n_boot) / n if n else np.zeros(1)
        lo, hi = np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2])
        n_conflict = int(g["conflict"].sum()) if "conflict" in g.columns else 0
        out.append(dict(zip(by, key if isinstance(key, tuple) else (key,)), n=n, acc=100 * k / max(n, 1),
                        acc_lo=100 * lo, acc_hi=100 * hi, n_conflict=n_conflict))
    return pd.DataFrame(out, columns=list(by) + ["n", "acc", "acc_lo", "acc_hi", "n_conflict"])


def delta_vs_baseline(table: pd.DataFrame, value: str, baseline: Any, same_scoring: bool = False) -> pd.Series:
    """``value`` minus the baseline condition's value for the same model and dataset.

    baseline = (setting, scoring) or {dataset: (setting, scoring), "*": default}.  same_scoring=True
    compares with the baseline setting under the row's own scoring instead (hybrid vs hybrid)."""
    keys = ["model", "dataset"] + (["scoring"] if same_scoring else [])
    if same_scoring:
        bset = pd.Series([baseline_for(baseline, d)[0] for d in table["dataset"]], index=table.index)
        base = table[table["setting"] == bset]
    else:
        base = table[baseline_mask(table, baseline)]
    base = base[keys + [value]].rename(columns={value: "_base"})
    merged = table[keys].merge(base, on=keys, how="left")
    return pd.Series(table[value].to_numpy() - merged["_base"].to_numpy(), index=table.index)


# ----------------------------------------------------------------------------- position bias

def recall_by_gold(df: pd.DataFrame, by: Sequence[str] = GROUP) -> pd.DataFrame:
    """Recall (points) of each gold position: share of items with gold at p that are answered right."""
    df = main_rows(to_frame(df))
    g = df.groupby(list(by) + ["gold"], sort=True)["correct"].agg(["size", "mean"]).reset_index()
    g = g.rename(columns={"gold": "position", "size": "n", "mean": "recall"})
    g["recall"] = 100 * g["recall"]
    return g


def rstd(df: pd.DataFrame, by: Sequence[str] = GROUP) -> pd.DataFrame:
    """RStd (points): population std of the per-gold-position recalls (positions with items only)."""
    r = recall_by_gold(df, by)
    out = r.groupby(list(by), sort=True)["recall"].agg(lambda x: float(np.std(x.to_numpy(), ddof=0))).reset_index()
    return out.rename(columns={"recall": "rstd"})


def prediction_share(df: pd.DataFrame, by: Sequence[str] = GROUP) -> pd.DataFrame:
    """How often each position is predicted (points): the raw selection bias."""
    df = main_rows(to_frame(df))
    g = df.groupby(list(by) + ["prediction"]).size().rename("n").reset_index()
    g["share"] = 100 * g["n"] / g.groupby(list(by))["n"].transform("sum")
    return g.rename(columns={"prediction": "position"})


# ----------------------------------------------------------------------------- rankings

def rankings(table: pd.DataFrame, value: str = "acc") -> pd.Series:
    """Rank (1 = best, ties share the better rank) of each model within its condition."""
    return table.groupby(COND)[value].rank(ascending=False, method="min").astype(int)


def kendall(table: pd.DataFrame, baseline: Any, value: str = "acc") -> pd.DataFrame:
    """Kendall's tau-b between each condition's model ordering and the baseline's (same dataset)."""
    base_all = table[baseline_mask(table, baseline)]
    out = []
    for (ds, st, sc), g in table.groupby(COND, sort=True):
        base = base_all[base_all["dataset"] == ds]
        m = g[["model", value]].merge(base[["model", value]], on="model", suffixes=("", "_base"))
        if len(m) >= 2:
            tau, p = kendalltau(m[value + "_base"], m[value])
        else:
            tau, p = np.nan, np.nan
        out.append({"dataset": ds, "setting": st, "scoring": sc, "n_models": len(m), "tau": float(tau),
                    "tau01": (float(tau) + 1) / 2, "p_value": float(p)})
    return pd.DataFrame(out, columns=COND + ["n_models", "tau", "tau01", "p_value"])


def rank_shift(table: pd.DataFrame, baseline: Any, value: str = "acc") -> pd.DataFrame:
    """Each model's rank in the baseline and in each condition; shift > 0 means it moved up."""
    t = table[COND + ["model", value]].copy()
    t["rank"] = rankings(t, value)
    base = t[baseline_mask(t, baseline)][["dataset", "model", "rank"]]
    t = t.merge(base.rename(columns={"rank": "baseline_rank"}), on=["dataset", "model"], how="left")
    t["shift"] = t["baseline_rank"] - t["rank"]
    return t


# ----------------------------------------------------------------------------- permutations

def _complete(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of items evaluated under every cyclic rotation (rotation 0..n-1)."""
    k = df.groupby(GROUP + ["item_id"])["rotation"].transform("nunique")
    return df[k == df["n_options"]]


def circular(df: pd.DataFrame, by: Sequence[str] = GROUP) -> pd.DataFrame:
    """CircularEval and permutation-averaged accuracy (points) over items with all rotations;
    acc_plain is the ordinary accuracy of the same items (rotation 0)."""
    df = _complete(to_frame(df))
    per_item = df.groupby(list(by) + ["item_id"]).agg(all_correct=("correct", "all"), mean_correct=("correct", "mean"))
    plain = df[df["rotation"] == 0].set_index(list(by) + ["item_id"])["correct"]
    per_item = per_item.join(plain.rename("plain"))
    out = per_item.groupby(list(by)).agg(n_items=("all_correct", "size"), circular_acc=("all_correct", "mean"),
                                         perm_avg_acc=("mean_correct", "mean"), acc_plain=("plain", "mean"))
    out[["circular_acc", "perm_avg_acc", "acc_plain"]] *= 100
    return out.reset_index()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    x = np.where(np.isfinite(x), x, -1e9)
    return log_softmax(x, axis=-1)


def pride_prior(calib: pd.DataFrame) -> dict[int, np.ndarray]:
    """PriDe prior over positions, per option count, from items seen under all cyclic rotations.

    Per item: average the log-softmax of the positional scores over its rotations (the content
    term cancels, each option having visited each position once), softmax -> the item's prior.
    The prior for n options is the mean of the item priors."""
    priors: dict[int, list[np.ndarray]] = {}
    for _, g in calib.groupby("item_id"):
        n = int(g["n_options"].iloc[0])
        lp = _log_softmax(np.stack([np.asarray(s, dtype=float) for s in g["per_option_scores"]]))
        avg = lp.mean(axis=0)
        priors.setdefault(n, []).append(softmax(avg))
    return {n: np.mean(v, axis=0) for n, v in priors.items()}


def pride_debias(rows: pd.DataFrame, prior: dict[int, np.ndarray]) -> pd.DataFrame:
    """Add pride_prediction / pride_correct: argmax of observed probs divided by the prior."""
    rows = rows.copy()
    preds = []
    for scores, n, pred in zip(rows["per_option_scores"], rows["n_options"], rows["prediction"]):
        p = prior.get(int(n))
        if p is None:
            preds.append(int(pred))  # no prior for this option count: leave the prediction alone
            continue
        logp = _log_softmax(np.asarray(scores, dtype=float)) - np.log(np.maximum(p, 1e-12))
        preds.append(int(np.argmax(logp)))
    rows["pride_prediction"] = preds
    rows["pride_correct"] = rows["pride_prediction"] == rows["gold"]
    return rows


def pride(df: pd.DataFrame, fraction: float = 0.05, seed: int = 0,
          by: Sequence[str] = GROUP) -> tuple[pd.DataFrame, pd.DataFrame]:
    """PriDe per group: calibrate on the chosen share of fully rotated items, debias the others.

    Returns (summary per group: n_calib, n_eval, acc, acc_pride, rstd, rstd_pride, prior;
    per-item rows of the evaluated items with pride_prediction / pride_correct)."""
    df = to_frame(df)
    summaries, items = [], []
    for key, g in df.groupby(list(by), sort=True):
        comp = _complete(g)
        calib_ids = {i for i in comp["item_id"].unique() if in_calibration(str(i), seed, fraction)}
        if not calib_ids:
            continue
        prior = pride_prior(comp[comp["item_id"].isin(calib_ids)])
        ev = pride_debias(g[(g["rotation"] == 0) & ~g["item_id"].isin(calib_ids)], prior)
        if ev.empty:
            continue
        items.append(ev)
        deb = ev.assign(correct=ev["pride_correct"], prediction=ev["pride_prediction"])
        summaries.append(dict(zip(by, key), n_calib=len(calib_ids), n_eval=len(ev),
                              acc=100 * ev["correct"].mean(), acc_pride=100 * ev["pride_correct"].mean(),
                              rstd=float(rstd(ev, by)["rstd"].iloc[0]), rstd_pride=float(rstd(deb, by)["rstd"].iloc[0]),
                              prior={int(n): [round(float(x), 4) for x in p] for n, p in sorted(prior.items())}))
    cols = list(by) + ["n_calib", "n_eval", "acc", "acc_pride", "rstd", "rstd_pride", "prior"]
    return pd.DataFrame(summaries, columns=cols), (pd.concat(items) if items else pd.DataFrame())


# ----------------------------------------------------------------------------- paired statistics

PAIRED_COLS = GROUP + ["n_paired", "acc_base", "acc_cond", "delta_paired", "delta_lo", "delta_hi", "n_lost",
                       "n_gained", "p_mcnemar", "p_adj", "significant"]


def correctness_matrix(g: pd.DataFrame, where: str = "") -> pd.DataFrame:
    """item_id x model table of ``correct`` (rotation-0 rows), keeping the items every model answered."""
    g = main_rows(to_frame(g))
    dup = g.duplicated(["model", "item_id"])
    if dup.any():
        r = g[dup].iloc[0]
        raise ValueError(f"{where or 'rows'}: item {r['item_id']!r} appears twice for model {r['model']!r}")
    return g.pivot(index="item_id", columns="model", values="correct").dropna().astype(bool).sort_index()


def key_name(key: Any) -> str:
    """'a / b / c' for a group key (tuple or scalar)."""
    return " / ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))


def _pair(df: pd.DataFrame, ds: str, ref: tuple[str, str], cond: tuple[str, str]):
    """Correctness matrices of two conditions of dataset ``ds`` (rotation-0 rows), restricted to
    their common items and models; None when they share none."""
    sel = [df[(df["dataset"] == ds) & (df["setting"] == st) & (df["scoring"] == sc)] for st, sc in (ref, cond)]
    if any(g.empty for g in sel):
        return None
    A, B = (correctness_matrix(g, key_name((ds,) + tuple(k))) for g, k in zip(sel, (ref, cond)))
    models = sorted(set(A.columns) & set(B.columns))
    items = A.index.intersection(B.index)
    return (A.loc[items, models], B.loc[items, models]) if models and len(items) else None


def _vs_baseline(df: pd.DataFrame, baseline: Any):
    """(dataset, setting, scoring, baseline matrix, condition matrix) for every non-baseline condition,
    both restricted to their common items and models."""
    df = main_rows(to_frame(df))
    for ds, st, sc in df[COND].drop_duplicates().sort_values(COND).itertuples(index=False):
        b = baseline_for(baseline, ds)
        pair = None if (st, sc) == b else _pair(df, ds, b, (st, sc))
        if pair is not None:
            yield (ds, st, sc) + pair


def paired_tests(df: pd.DataFrame, baseline: Any = ("baseline", "symbol"), n_boot: int = 1000, ci: float = 0.95,
                 seed: int = 0, alpha: float = 0.05, correction: str = "holm") -> pd.DataFrame:
    """Each condition against its dataset's baseline, per model, on their common items (points).

    n_lost: items right in the baseline and wrong here, n_gained the reverse; p_mcnemar: exact
    McNemar; delta_lo/hi: paired bootstrap percentile interval of Δacc (the same resampled items
    for every model of the condition); p_adj / significant: ``correction`` over the whole grid."""
    S.check_correction(correction)
    out = []
    for ds, st, sc, A, B in _vs_baseline(df, baseline):
        W = S.boot_weights(len(A), n_boot, _seed(seed, ("paired", ds, st, sc)))
        for m in A.columns:
            d, lo, hi = S.paired_delta(A[m].to_numpy(), B[m].to_numpy(), ci=ci, W=W)
            t = S.mcnemar(A[m].to_numpy(), B[m].to_numpy())
            out.append({"model": m, "dataset": ds, "setting": st, "scoring": sc, "n_paired": len(A),
                        "acc_base": 100 * A[m].mean(), "acc_cond": 100 * B[m].mean(), "delta_paired": 100 * d,
                        "delta_lo": 100 * lo, "delta_hi": 100 * hi, "n_lost": t["n_only_a"],
                        "n_gained": t["n_only_b"], "p_mcnemar": t["p_value"]})
    t = pd.DataFrame(out, columns=PAIRED_COLS[:-2])
    t["p_adj"], t["significant"] = S.adjust_pvalues(t["p_mcnemar"].to_numpy(), correction, alpha)
    return t


def rank_table(df: pd.DataFrame, by: Sequence[str] = COND, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
               alpha: float = 0.05, correction: str = "holm") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per group of ``by`` (a leaderboard): (per model: acc with interval, rank with its bootstrap
    interval, tied group; per model pair: paired Δacc interval, McNemar, adjusted p).  The
    pairwise family controlled by ``correction`` is one leaderboard."""
    df = main_rows(to_frame(df))
    pers, pws = [], []
    for key, g in df.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        C = correctness_matrix(g, key_name(key))
        if C.empty:
            continue
        per, pw = S.rank_stats(C.to_numpy(), [str(c) for c in C.columns], n_boot, ci, _seed(seed, ("rank",) + key),
                               alpha, correction)
        for col, v in zip(by, key):
            per.insert(list(by).index(col), col, v)
            pw.insert(list(by).index(col), col, v)
        pers.append(per)
        pws.append(pw)
    if not pers:
        return pd.DataFrame(columns=list(by) + ["model"]), pd.DataFrame(columns=list(by) + ["model_a", "model_b"])
    return pd.concat(pers, ignore_index=True), pd.concat(pws, ignore_index=True)


def rank_uncertainty(df: pd.DataFrame, baseline: Any = ("baseline", "symbol"), n_boot: int = 1000, ci: float = 0.95,
                     seed: int = 0, alpha: float = 0.05, correction: str = "holm") -> dict[str, pd.DataFrame]:
    """rank_intervals and pairwise (``rank_table`` per condition), shift_intervals (bootstrap
    interval of each model's rank shift vs the baseline on the common items; significant when it
    excludes 0) and kendall_ci (τ vs the baseline with its bootstrap interval)."""
    per, pw = rank_table(df, COND, n_boot, ci, seed, alpha, correction)
    shifts, taus = [], []
    q = (1 - ci) / 2
    for ds, st, sc, A, B in _vs_baseline(df, baseline):
        tau, lo, hi, sh = S.kendall_interval(A.to_numpy(), B.to_numpy(), n_boot, ci, _seed(seed, ("tau", ds, st, sc)))
        taus.append({"dataset": ds, "setting": st, "scoring": sc, "tau_lo": lo, "tau_hi": hi})
        s_lo = np.quantile(sh, q, axis=0, method="lower")
        s_hi = np.quantile(sh, 1 - q, axis=0, method="higher")
        for m, a, b in zip(A.columns, s_lo, s_hi):
            shifts.append({"model": m, "dataset": ds, "setting": st, "scoring": sc, "shift_lo": int(a),
                           "shift_hi": int(b), "shift_significant": bool(a > 0 or b < 0)})
    return {"rank_intervals": per, "pairwise": pw,
            "shift_intervals": pd.DataFrame(shifts, columns=GROUP + ["shift_lo", "shift_hi", "shift_significant"]),
            "kendall_ci": pd.DataFrame(taus, columns=COND + ["tau_lo", "tau_hi"])}


SEED_COLS = GROUP + ["n_seeds", "acc_mean", "acc_sd", "acc_min", "acc_max", "boot_ci_width", "rank_min", "rank_max"]


def seed_variance(summary: pd.DataFrame) -> pd.DataFrame:
    """Spread across seed replicates (settings "x", "x@seed1", ...; see config.expand_seeds) of each
    model's accuracy (sd with ddof=1, min, max) and rank, beside the mean width of the bootstrap
    CIs of those accuracies: seed noise next to item-sampling noise."""
    t = summary.assign(setting=summary["setting"].map(base_setting), _rep=summary["setting"],
                       _w=summary["acc_hi"] - summary["acc_lo"])
    t = t[t.groupby(GROUP)["_rep"].transform("nunique") > 1]
    out = t.groupby(GROUP, sort=True).agg(
        n_seeds=("_rep", "nunique"), acc_mean=("acc", "mean"), acc_sd=("acc", lambda x: float(x.std(ddof=1))),
        acc_min=("acc", "min"), acc_max=("acc", "max"), boot_ci_width=("_w", "mean"), rank_min=("rank", "min"),
        rank_max=("rank", "max")).reset_index()
    return out[SEED_COLS] if len(out) else pd.DataFrame(columns=SEED_COLS)


STABILITY_COLS = ["protocol", "dataset", "setting", "scoring", "n_items", "n_models", "tau", "tau_lo", "tau_hi",
                  "mean_abs_shift", "rank_width"]


def protocol_stability(df: pd.DataFrame, protocols: dict[str, dict[str, Any]], n_boot: int = 1000, ci: float = 0.95,
                       seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """How stable each protocol's ranking is under its perturbations.

    protocols: {name: {baseline: setting, scoring: label, settings: [perturbed settings]}}.  Per
    protocol, dataset and perturbed setting: Kendall tau of the model ranking vs the protocol's
    baseline with its bootstrap interval, mean |rank shift| and rank_width, the mean width
    (rank_hi - rank_lo) of the models' bootstrap rank intervals under the perturbation.
    Returns (that table, one row per protocol and dataset with the means: mean_tau, mean_abs_shift,
    mean_rank_width, n_settings)."""
    df = main_rows(to_frame(df))
    out = []
    for name, p in protocols.items():
        sc = p["scoring"]
        for ds in sorted(df["dataset"].unique()):
            for st in p["settings"]:
                pair = _pair(df, ds, (p["baseline"], sc), (st, sc))
                if pair is None:
                    continue
                A, B = pair
                key = ("stability", name, ds, st)
                tau, lo, hi, shifts = S.kendall_interval(A.to_numpy(), B.to_numpy(), n_boot, ci, _seed(seed, key))
                point = S.boot_ranks(A.to_numpy().mean(axis=0)) - S.boot_ranks(B.to_numpy().mean(axis=0))
                per, _ = S.rank_stats(B.to_numpy(), list(B.columns), n_boot, ci, _seed(seed, key + ("ranks",)))
                out.append({"protocol": name, "dataset": ds, "setting": st, "scoring": sc, "n_items": len(A),
                            "n_models": A.shape[1], "tau": tau, "tau_lo": lo, "tau_hi": hi,
                            "mean_abs_shift": float(np.abs(point).mean()),
                            "rank_width": float((per["rank_hi"] - per["rank_lo"]).mean())})
    t = pd.DataFrame(out, columns=STABILITY_COLS)
    summ = t.groupby(["protocol", "dataset"], sort=False).agg(
        n_settings=("setting", "size"), mean_tau=("tau", "mean"), mean_abs_shift=("mean_abs_shift", "mean"),
        mean_rank_width=("rank_width", "mean")).reset_index()
    return t, summ


# ----------------------------------------------------------------------------- everything

def summary(df: pd.DataFrame, baseline: Any = ("baseline", "symbol"), n_boot: int = 1000,
            ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per (model, dataset, setting, scoring): n, acc (+CI), delta_acc, rstd, delta_rstd,
    rank, baseline_rank, shift; deltas are against the baseline (setting, scoring), or per dataset."""
    df = to_frame(df)
    t = accuracy(df, GROUP, n_boot, ci, seed).merge(rstd(df), on=GROUP, how="left")
    t["delta_acc"] = delta_vs_baseline(t, "acc", baseline)
    t["delta_rstd"] = delta_vs_baseline(t, "rstd", baseline)
    rs = rank_shift(t, baseline)[GROUP + ["rank", "baseline_rank", "shift"]]
    return t.merge(rs, on=GROUP, how="left")


def compute_all(rows: Iterable[dict] | pd.DataFrame, baseline: Any = ("baseline", "symbol"),
                n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                pride_fraction: float = 0.05, alpha: float = 0.05, correction: str = "holm",
                protocols: dict[str, dict[str, Any]] | None = None) -> dict[str, pd.DataFrame]:
    """Every metric table, by name.  The summary carries the paired test of its Δacc (delta_lo,
    delta_hi, p_adj, significant at ``alpha`` after ``correction``); kendall carries tau_lo/tau_hi
    and rank_shift the rank and shift intervals.  With ``protocols``, also stability and
    stability_summary (``protocol_stability``)."""
    df = to_frame(rows)
    paired = paired_tests(df, baseline, n_boot, ci, seed, alpha, correction)
    s = summary(df, baseline, n_boot, ci, seed).merge(
        paired[GROUP + ["delta_lo", "delta_hi", "p_mcnemar", "p_adj", "significant"]], on=GROUP, how="left")
    unc = rank_uncertainty(df, baseline, n_boot, ci, seed, alpha, correction)
    ri = unc["rank_intervals"][GROUP + ["rank_lo", "rank_hi", "group"]]
    pr_summary, _ = pride(df, pride_fraction, seed)
    forced = main_rows(df)[main_rows(df)["forced_gold"] >= 0]
    extra = {}
    if protocols:
        extra["stability"], extra["stability_summary"] = protocol_stability(df, protocols, n_boot, ci, seed)
    return {
        "summary": s,
        "recall": recall_by_gold(df),
        "prediction_share": prediction_share(df),
        "kendall": kendall(s, baseline).merge(unc["kendall_ci"], on=COND, how="left"),
        "rank_shift": rank_shift(s, baseline).merge(ri, on=GROUP, how="left").merge(
            unc["shift_intervals"], on=GROUP, how="left"),
        "paired_tests": paired,
        "seed_variance": seed_variance(s),
        "rank_intervals": unc["rank_intervals"],
        "pairwise": unc["pairwise"],
        "forced_gold": accuracy(forced, GROUP + ["forced_gold"], n_boot, ci, seed) if len(forced) else
        pd.DataFrame(columns=GROUP + ["forced_gold", "n", "acc", "acc_lo", "acc_hi", "n_conflict"]),
        "circular": circular(df) if (df["rotation"] > 0).any() else pd.DataFrame(
            columns=GROUP + ["n_items", "circular_acc", "perm_avg_acc", "acc_plain"]),
        "pride": pr_summary,
    } | extra
