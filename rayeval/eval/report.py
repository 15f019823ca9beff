"""Write a run's report: DIR/report.md (tables), report.html (the same page, self-contained), PNG plots,
metrics.parquet and metrics.json.

    write_report(rows, "runs/x", baseline=("baseline", "symbol"))
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rayeval.eval import metrics as M  # noqa: E402
from rayeval.eval.html import write_html  # noqa: E402


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.2f}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def md_table(df: pd.DataFrame, cols: list[str] | None = None) -> str:
    """A GitHub-markdown table (no tabulate dependency)."""
    if df is None or df.empty:
        return "_(none)_\n"
    cols = cols or list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df[cols].iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _cond(df: pd.DataFrame) -> pd.Series:
    return df["setting"] + " / " + df["scoring"]


# ----------------------------------------------------------------------------- plots

def plot_rank_shift(rs: pd.DataFrame, baseline: Any, path: Path, dataset: str) -> None:
    """Paper Figure 1: one column per condition, a line per model through its ranks.

    With rank_lo/rank_hi columns each rank gets its bootstrap interval (a vertical bar), and with
    shift_significant a rank that moved while the bootstrap interval of its shift still holds 0
    is drawn hollow: a shift within the noise."""
    d = rs[rs["dataset"] == dataset].copy()
    d["cond"] = _cond(d)
    b = M.baseline_for(baseline, dataset)
    base = f"{b[0]} / {b[1]}"
    conds = [base] + sorted(c for c in d["cond"].unique() if c != base)
    wide = d.pivot_table(index="model", columns="cond", values="rank").reindex(columns=conds)
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(conds)), max(3, 0.5 * len(wide) + 1.5)))
    has_iv = {"rank_lo", "rank_hi"} <= set(d.columns) and d["rank_lo"].notna().any()
    offsets = np.linspace(-0.15, 0.15, len(wide)) if has_iv and len(wide) > 1 else np.zeros(len(wide))
    for k, (model, r) in enumerate(wide.iterrows()):
        xs = np.arange(len(conds)) + offsets[k]
        line = ax.plot(xs, r.to_numpy(), marker="o", label=model)[0]
        if not has_iv:
            continue
        g = d[d["model"] == model].set_index("cond").reindex(conds)
        ax.vlines(xs, g["rank_lo"].to_numpy(dtype=float), g["rank_hi"].to_numpy(dtype=float),
                  color=line.get_color(), alpha=0.45, linewidth=3)
        if "shift_significant" not in g.columns:
            continue
        noise = ((g["shift"].fillna(0) != 0) & g["shift_significant"].map(lambda v: bool(v == False))).to_numpy()  # noqa: E712
        ax.plot(xs[noise], r.to_numpy()[noise], linestyle="none", marker="o",
                markerfacecolor="white", markeredgecolor=line.get_color())
    ax.set_yticks(range(1, len(wide) + 1))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_xticks(range(len(conds)))
    ax.set_xticklabels(conds, rotation=30, ha="right", fontsize=8)
    ax.invert_yaxis()
    ax.set_ylabel("rank (1 = best)")
    ax.set_title(f"Rank shift vs baseline ({dataset or 'all'})" + (
        "\nbars: 95% bootstrap rank interval; hollow: a shift within its bootstrap interval" if has_iv else ""),
        fontsize=10 if has_iv else None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_forced_gold(fg: pd.DataFrame, path: Path) -> None:
    """Accuracy when the gold answer is forced to each position, a line per model/scoring."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for (model, ds, sc), g in fg.groupby(["model", "dataset", "scoring"]):
        g = g.sort_values("forced_gold")
        ax.errorbar(g["forced_gold"], g["acc"], yerr=[g["acc"] - g["acc_lo"], g["acc_hi"] - g["acc"]], marker="o",
                    capsize=3, label=f"{model} / {ds} / {sc}")
    pos = sorted(int(x) for x in fg["forced_gold"].unique())
    ax.set_xticks(pos)
    ax.set_xticklabels([f"{p} ({'ABCDEFGHIJ'[p]})" for p in pos])
    ax.set_xlabel("gold position the answer was moved to")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy by forced gold position")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rstd(summary: pd.DataFrame, path: Path, recall: pd.DataFrame | None = None) -> None:
    """RStd by setting (groups) and scoring x model (bars); settings whose golds all sit at one
    position (forced gold) have no RStd to speak of and are left out."""
    d = summary.copy()
    if recall is not None and not recall.empty:
        k = recall.groupby(M.GROUP)["position"].nunique().rename("_npos").reset_index()
        d = d.merge(k, on=M.GROUP, how="left")
        d = d[d["_npos"].fillna(0) > 1]
    d["series"] = d["model"] + " / " + d["scoring"]
    d["x"] = d["dataset"] + ":" + d["setting"] if d["dataset"].nunique() > 1 else d["setting"]
    wide = d.pivot_table(index="x", columns="series", values="rstd")
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(wide) * max(1, len(wide.columns)) / 3), 4))
    w = 0.8 / max(1, len(wide.columns))
    xs = np.arange(len(wide))
    for i, c in enumerate(wide.columns):
        ax.bar(xs + i * w, wide[c].to_numpy(), width=w, label=c)
    ax.set_xticks(xs + 0.4 - w / 2)
    ax.set_xticklabels(wide.index, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("RStd (points)")
    ax.set_title("Selection bias (RStd) by setting and scoring")
    if len(wide.columns):
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- report

def _baseline_text(baseline: Any, datasets: list[str]) -> str:
    return "; ".join(f"{ds or 'all'}: `{' / '.join(M.baseline_for(baseline, ds))}`" for ds in datasets)


def _baseline_json(baseline: Any) -> Any:
    return {k: list(v) for k, v in baseline.items()} if isinstance(baseline, dict) else list(baseline)


def _long(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """All tables stacked for parquet: one column 'table', nested values as JSON strings."""
    parts = []
    for name, t in tables.items():
        if t is None or t.empty:
            continue
        t = t.copy()
        for c in t.columns:
            if t[c].map(lambda v: isinstance(v, (list, dict, np.ndarray))).any():
                t[c] = t[c].map(lambda v: json.dumps(v.tolist() if isinstance(v, np.ndarray) else v))
        t.insert(0, "table", name)
        parts.append(t)
    out = pd.concat(parts, ignore_index=True, sort=False) if parts else pd.DataFrame({"table": []})
    for c in out.columns:
        if out[c].dtype == object:
            out[c] = out[c].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    return out


def write_report(rows: Iterable[dict] | pd.DataFrame, out_dir: str | Path,
                 baseline: Any = ("baseline", "symbol"), tables: dict[str, pd.DataFrame] | None = None,
                 title: str = "rayeval report", **metric_kw: Any) -> dict[str, Path]:
    """Compute (unless given) the metrics and write report.md, the plots, metrics.parquet/json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = M.to_frame(rows)
    tables = tables if tables is not None else M.compute_all(df, baseline, **metric_kw)
    s = tables["summary"]
    files: dict[str, Path] = {}

    for ds in sorted(s["dataset"].unique()):
        p = out / f"rank_shift{'_' + ds if ds else ''}.png"
        plot_rank_shift(tables["rank_shift"], baseline, p, ds)
        files[p.stem] = p
    if not tables["forced_gold"].empty:
        plot_forced_gold(tables["forced_gold"], out / "forced_gold.png")
        files["forced_gold"] = out / "forced_gold.png"
    plot_rstd(s, out / "rstd.png", tables["recall"])
    files["rstd"] = out / "rstd.png"

    md = [f"# {title}\n\n", f"{len(df)} rows; models: {', '.join(sorted(df['model'].unique()))}; "
          f"baseline (setting / scoring): {_baseline_text(baseline, sorted(s['dataset'].unique()))}.  "
          "Accuracy, recall and RStd in points; "
          "rank 1 = best; shift > 0 = moved up vs the baseline.\n"]
    alpha, correction = metric_kw.get("alpha", 0.05), metric_kw.get("correction", "holm")
    cols = ["model", "dataset", "setting", "scoring", "n", "acc", "acc_lo", "acc_hi", "delta_acc"]
    s = s.copy()
    if "significant" in s.columns:
        s["sig"] = s["significant"].map(lambda v: "*" if v is True or v == 1 else "")
        cols += ["delta_lo", "delta_hi", "p_adj", "sig"]
    md += ["\n## Accuracy, Δacc, RStd and rank\n\n",
           md_table(s, cols + ["rstd", "delta_rstd", "rank", "baseline_rank", "shift", "n_conflict"]),
           "\nn_conflict: items a perturbation could not fully apply without moving an \"all of the above\"-style "
           "option (left in place; see the rows' conflict column).\n"]
    if "significant" in s.columns:
        md.append(f"\ndelta_lo/hi: paired bootstrap interval of Δacc on the items shared with the baseline; "
                  f"p_adj: exact McNemar vs the baseline, {correction} over the grid; sig `*`: p_adj ≤ {alpha}.\n")
    md += ["\n## Kendall τ vs the baseline ranking\n\n", "tau01 = (τ+1)/2; p_value from scipy.stats.kendalltau (tau-b); "
           "tau_lo/hi: bootstrap interval (items resampled jointly for both conditions and every model).\n\n",
           md_table(tables["kendall"])]
    if "paired_tests" in tables:
        md += ["\n## Paired tests vs the baseline (same items)\n\n",
               f"n_lost: right in the baseline, wrong here; n_gained: the reverse; exact McNemar; {correction} "
               f"control across the grid at α = {alpha}.\n\n", md_table(tables["paired_tests"])]
    if "rank_intervals" in tables:
        md += ["\n## Rank intervals and tied groups\n\n",
               "rank_lo/hi: 95% bootstrap interval of the rank (items resampled, the same items for every model); "
               f"group: statistically tied models (pairwise exact McNemar, {correction} per condition; a group "
               "takes, best first, the models not significantly different from any of its members).\n\n",
               md_table(tables["rank_intervals"])]
    rs = tables["rank_shift"].copy()
    if not rs.empty:
        rs["cond"] = _cond(rs)
        wide = rs.pivot_table(index=["dataset", "model"], columns="cond", values="rank").reset_index()
        wide.columns = [str(c) for c in wide.columns]
        for c in wide.columns[2:]:
            wide[c] = wide[c].astype("Int64")
        md += ["\n## Rank shift (rank per condition)\n\n", md_table(wide)]
        for ds in sorted(s["dataset"].unique()):
            md.append(f"\n![rank shift](rank_shift{'_' + ds if ds else ''}.png)\n")
    md += ["\n## Accuracy by forced gold position\n\n", md_table(tables["forced_gold"])]
    if "forced_gold" in files:
        md.append("\n![forced gold](forced_gold.png)\n")
    rec = tables["recall"].pivot_table(index=M.GROUP, columns="position", values="recall").reset_index()
    rec.columns = [f"recall@{c}" if isinstance(c, (int, np.integer)) else str(c) for c in rec.columns]
    md += ["\n## Recall by gold position\n\n", md_table(rec), "\n![rstd](rstd.png)\n"]
    md += ["\n## CircularEval and permutation-averaged accuracy\n\n", md_table(tables["circular"])]
    md += ["\n## PriDe debiasing\n\n", md_table(tables["pride"])]
    sv = tables.get("seed_variance")
    if sv is not None and not sv.empty:
        md += ["\n## Seed variance\n\n",
               "Settings run under several seeds (`seeds: K`: replicates `x`, `x@seed1`, ...): the spread of "
               "accuracy (sd, min, max) and rank across seeds, beside the mean width of the 95% bootstrap CI "
               "of one run's accuracy (item sampling).\n\n", md_table(sv)]
    if "stability_summary" in tables:
        md += ["\n## Protocol stability\n\n",
               "Per protocol (its own baseline setting and scoring), how much the model ranking moves under the "
               "perturbations: mean Kendall τ vs the protocol's baseline (higher = more stable), mean |rank shift|, "
               "and the mean width of the models' 95% bootstrap rank intervals (rank_hi − rank_lo).\n\n",
               md_table(tables["stability_summary"]), "\n", md_table(tables["stability"])]
    (out / "report.md").write_text("".join(md), encoding="utf-8")
    files["report"] = out / "report.md"
    files["html"] = write_html(out / "report.md", title=title)

    _long(tables).to_parquet(out / "metrics.parquet", index=False)
    files["parquet"] = out / "metrics.parquet"
    js = {k: json.loads(v.to_json(orient="records")) for k, v in tables.items()}
    (out / "metrics.json").write_text(json.dumps({"baseline": _baseline_json(baseline), "tables": js}, indent=1,
                                                 ensure_ascii=False), encoding="utf-8")
    files["json"] = out / "metrics.json"
    return files
