"""A leaderboard from any per-item correctness table: rank intervals, tied groups, paired tests.

    rows, notes = read_correctness(["arc=../shared/data/routerbench_zs/arc_challenge_train.csv,"
                                    "../shared/data/routerbench_zs/arc_challenge_test.csv"])
    files = write_leaderboard(leaderboard(rows), "docs/leaderboards/x", notes=notes)

Inputs (.csv, .jsonl, .parquet), one dataset per spec ``NAME=PATH[,PATH...]`` (the files are
joined) or ``PATH`` (named by its file stem):
  long  columns model, item_id, correct (+ dataset, setting, scoring, rotation): rayeval's own
        rows.parquet; one leaderboard per (dataset, setting, scoring), rotation-0 rows only
  wide  one row per item, one column per model holding 0/1 (or True/False); an id column
        (``id_col``, default the first of sample_id, item_id, id, question_id); the model
        columns are ``models`` or every column whose values are all 0/1/True/False/blank and
        whose name has no '|' (RouterBench's ``<model>|total_cost`` columns give usd_per_1k_items)
A blank is "no result".  An item's results may be spread over several rows (RouterBench repeats
some ids, each row holding some models' results); a model with two results for one item is an
error naming both rows.  Items that some model lacks are dropped (the comparisons are paired) and
counted in the notes.  A value that is not 0/1 or a missing id column is an error naming the
file, column and row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rayeval.eval import metrics as M  # noqa: E402
from rayeval.eval.html import write_html  # noqa: E402
from rayeval.eval.report import md_table  # noqa: E402

ID_COLUMNS = ("sample_id", "item_id", "id", "question_id")
TRUE = {"1", "1.0", "true"}
FALSE = {"0", "0.0", "false"}


class CorrectnessError(ValueError):
    pass


def _read(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise CorrectnessError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=suffix == ".jsonl")
    if suffix == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    raise CorrectnessError(f"{path}: unsupported format {suffix!r}; expected .csv, .jsonl or .parquet")


def _row_name(path: Path, i: int) -> str:
    """Human row reference: the CSV/JSONL line (header = line 1 for CSV), else the 0-based row."""
    suffix = path.suffix.lower()
    return f"line {i + 2}" if suffix == ".csv" else f"line {i + 1}" if suffix == ".jsonl" else f"row {i}"


def _to01(col: pd.Series, path: Path, name: str) -> pd.Series:
    """0/1/True/False/blank -> float 1/0/NaN; anything else is an error naming the row."""
    text = col.astype(str).str.strip().str.lower().where(col.notna(), "")
    out = text.map({**dict.fromkeys(TRUE, 1.0), **dict.fromkeys(FALSE, 0.0)}).astype(float)
    bad = out.isna() & (text != "")
    if bad.any():
        i = bad.idxmax()
        raise CorrectnessError(f"{path}: column {name!r} {_row_name(path, int(i))}: value {col[i]!r} is not 0/1/True/False")
    return out


def _is01(col: pd.Series) -> bool:
    vals = {str(v).strip().lower() for v in col.dropna().unique()}
    return bool(vals) and vals <= TRUE | FALSE


def _wide(df: pd.DataFrame, path: Path, name: str, models: Sequence[str] | None,
          id_col: str | None) -> tuple[pd.DataFrame, list[str]]:
    df = df.reset_index(drop=True)
    idc = id_col or next((c for c in ID_COLUMNS if c in df.columns), None)
    if idc is None or idc not in df.columns:
        raise CorrectnessError(f"{path}: no id column {id_col or ' / '.join(ID_COLUMNS)!r} among {list(df.columns)[:12]}")
    if models:
        missing = [m for m in models if m not in df.columns]
        if missing:
            raise CorrectnessError(f"{path}: model column(s) {missing} not found")
        cols = list(models)
    else:
        cols = [c for c in df.columns if c != idc and "|" not in str(c) and _is01(df[c])]
        if len(cols) < 2:
            raise CorrectnessError(f"{path}: found {len(cols)} model column(s) of 0/1 values ({cols}); "
                                   "a leaderboard needs at least 2 (name them with models=)")
    vals = pd.DataFrame({m: _to01(df[m], path, m) for m in cols})
    notes = []
    empty = vals.isna().all(axis=1)
    if empty.any():
        notes.append(f"{name}: {path.name}: {int(empty.sum())} row(s) with no model's result")
    keys = {"item_id": df[idc].astype(str), "_src": [f"{path.name} {_row_name(path, i)}" for i in range(len(df))],
            "_wide": True}
    long = vals.assign(**keys).melt(id_vars=list(keys), var_name="model", value_name="correct")
    long = long.dropna(subset=["correct"])
    costs = [f"{m}|total_cost" for m in cols if f"{m}|total_cost" in df.columns]
    if len(costs) == len(cols):
        c = df[costs].apply(pd.to_numeric, errors="coerce").set_axis(cols, axis=1).assign(**keys)
        long = long.merge(c.melt(id_vars=list(keys), var_name="model", value_name="cost"), on=list(keys) + ["model"])
    return long, notes


def _long(df: pd.DataFrame, path: Path, name: str) -> tuple[pd.DataFrame, list[str]]:
    df = df.reset_index(drop=True)
    if "rotation" in df.columns:
        df = df[df["rotation"] == 0]
    out = df[[c for c in ("model", "item_id", "setting", "scoring", "dataset", "cost") if c in df.columns]].copy()
    out["item_id"] = out["item_id"].astype(str)
    out["_src"] = [f"{path.name} {_row_name(path, i)}" for i in range(len(df))]
    out["_wide"] = False
    out["correct"] = _to01(df["correct"], path, "correct")
    bad = out["correct"].isna()
    if bad.any():
        raise CorrectnessError(f"{path}: column 'correct' {_row_name(path, int(bad.idxmax()))}: no value")
    if "dataset" not in out.columns or (out["dataset"].astype(str) == "").all():
        out["dataset"] = name
    return out, []


def read_correctness(specs: Sequence[str], models: Sequence[str] | None = None,
                     id_col: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Long rows (dataset, model, item_id, correct [, setting, scoring, cost]) from correctness
    files, and notes on what was dropped; see the module docstring for the formats."""
    parts, notes = [], []
    for spec in specs:
        name, _, paths = spec.rpartition("=") if "=" in spec else ("", "", spec)
        files = [Path(p) for p in paths.split(",") if p]
        if not files:
            raise CorrectnessError(f"{spec!r}: no file; expected PATH or NAME=PATH[,PATH...]")
        name = name or files[0].stem
        got = []
        for path in files:
            df = _read(path)
            is_long = {"model", "item_id", "correct"} <= set(df.columns)
            rows, n = _long(df, path, name) if is_long else _wide(df, path, name, models, id_col)
            got.append(rows)
            notes += n
        rows = pd.concat(got, ignore_index=True)
        rows["dataset"] = rows["dataset"].fillna(name) if "dataset" in rows.columns else name
        keys = [c for c in ("dataset", "setting", "scoring", "model", "item_id") if c in rows.columns]
        dup = rows.duplicated(keys, keep=False)
        if dup.any():
            r = rows[dup].iloc[0]
            where = rows[dup & (rows["item_id"] == r["item_id"]) & (rows["model"] == r["model"])]["_src"]
            raise CorrectnessError(f"{name}: model {r['model']!r} has more than one result for item "
                                   f"{r['item_id']!r} ({', '.join(where)})")
        # wide rows hold several models' results, so one item should sit on one row of them
        spread = rows[rows["_wide"]].groupby("item_id")["_src"].nunique()
        if (spread > 1).any():
            notes.append(f"{name}: {int((spread > 1).sum())} item id(s) spread over several rows (each model's "
                         "result given once) were joined")
        parts.append(rows.drop(columns=["_src", "_wide"]))
    rows = pd.concat(parts, ignore_index=True)
    by = condition_keys(rows)
    n_models = rows.groupby(by)["model"].transform("nunique")
    per_item = rows.groupby(by + ["item_id"])["model"].transform("nunique")
    partial = per_item < n_models
    if partial.any():
        for key, g in rows[partial].groupby(by):
            notes.append(f"{M.key_name(key)}: dropped {g['item_id'].nunique()} item(s) that not every model answered")
        rows = rows[~partial]
    return rows.reset_index(drop=True), notes


def condition_keys(rows: pd.DataFrame) -> list[str]:
    """The columns that split rows into leaderboards: dataset, and setting/scoring when present."""
    return [c for c in ("dataset", "setting", "scoring") if c in rows.columns]


def leaderboard(rows: pd.DataFrame, n_boot: int = 1000, ci: float = 0.95, seed: int = 0, alpha: float = 0.05,
                correction: str = "holm") -> dict[str, pd.DataFrame]:
    """leaderboard (per model: acc and rank with intervals, tied group, usd_per_1k_items when costs are known),
    pairwise (every model pair: paired Δacc interval, exact McNemar, adjusted p) and groups."""
    by = condition_keys(rows)
    per, pw = M.rank_table(rows, by, n_boot, ci, seed, alpha, correction)
    if "cost" in rows.columns:
        cost = (1000 * rows.groupby(by + ["model"])["cost"].mean()).rename("usd_per_1k_items").reset_index()
        per = per.merge(cost, on=by + ["model"], how="left")
    per = per.sort_values(by + ["rank", "model"]).reset_index(drop=True)
    groups = per.groupby(by + ["group"], sort=True).agg(
        models=("model", lambda m: ", ".join(m)), n_models=("model", "size"), acc_max=("acc", "max"),
        acc_min=("acc", "min")).reset_index()
    return {"leaderboard": per, "pairwise": pw, "groups": groups}


# ----------------------------------------------------------------------------- output

def _slug(key: tuple) -> str:
    return "_".join("".join(ch if ch.isalnum() or ch in "-._" else "-" for ch in str(k)) for k in key if str(k))


def plot_leaderboard(per: pd.DataFrame, path: Path, title: str) -> None:
    """Accuracy with its bootstrap interval per model (best on top), coloured by tied group,
    annotated with the rank and its interval."""
    d = per.sort_values(["rank", "model"], ascending=[False, False])
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(d) + 1.6))
    y = np.arange(len(d))
    for yi, (_, r) in zip(y, d.iterrows()):
        c = colors((int(r["group"]) - 1) % 10)
        ax.errorbar(r["acc"], yi, xerr=[[r["acc"] - r["acc_lo"]], [r["acc_hi"] - r["acc"]]], fmt="o", color=c, capsize=3)
        iv = f"{int(r['rank_lo'])}" if r["rank_lo"] == r["rank_hi"] else f"{int(r['rank_lo'])}–{int(r['rank_hi'])}"
        ax.annotate(f"rank {int(r['rank'])} [{iv}]  group {int(r['group'])}", (r["acc_hi"], yi), xytext=(6, -3),
                    textcoords="offset points", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels(d["model"], fontsize=8)
    lo, hi = float(d["acc_lo"].min()), float(d["acc_hi"].max())
    ax.set_xlim(lo - 2, hi + 0.35 * (hi - lo) + 8)
    ax.set_xlabel("accuracy (%) with 95% bootstrap interval; colour = statistically tied group")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pairwise(per: pd.DataFrame, pw: pd.DataFrame, path: Path, title: str) -> None:
    """Δacc (row model minus column model, points) for every pair; bold with '*' where the
    adjusted paired test is significant."""
    order = per.sort_values(["rank", "model"])["model"].tolist()
    k = len(order)
    mat = np.full((k, k), np.nan)
    sig = np.zeros((k, k), dtype=bool)
    pos = {m: i for i, m in enumerate(order)}
    for _, r in pw.iterrows():
        i, j = pos[r["model_a"]], pos[r["model_b"]]
        mat[i, j], mat[j, i] = r["delta_acc"], -r["delta_acc"]
        sig[i, j] = sig[j, i] = bool(r["significant"])
    lim = max(1.0, float(np.nanmax(np.abs(mat))) if k > 1 else 1.0)
    fig, ax = plt.subplots(figsize=(0.55 * k + 3, 0.5 * k + 2))
    im = ax.imshow(mat, cmap="RdBu", vmin=-lim, vmax=lim)
    for i in range(k):
        for j in range(k):
            if i != j:
                ax.text(j, i, f"{mat[i, j]:.0f}{'*' if sig[i, j] else ''}", ha="center", va="center", fontsize=6,
                        fontweight="bold" if sig[i, j] else "normal")
    ax.set_xticks(range(k))
    ax.set_xticklabels(order, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(k))
    ax.set_yticklabels(order, fontsize=7)
    fig.colorbar(im, ax=ax, label="Δacc, row − column (points)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_leaderboard(tables: dict[str, pd.DataFrame], out_dir: str | Path, title: str = "rayeval leaderboard",
                      notes: Sequence[str] = (), sources: Sequence[str] = (), alpha: float = 0.05,
                      correction: str = "holm") -> dict[str, Path]:
    """leaderboard.md (+ self-contained leaderboard.html), one accuracy/rank figure and one pairwise
    figure per leaderboard, leaderboard.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per, pw, groups = tables["leaderboard"], tables["pairwise"], tables["groups"]
    by = condition_keys(per)
    files: dict[str, Path] = {}
    md = [f"# {title}\n\n"]
    if sources:
        md.append("Sources: " + "; ".join(f"`{s}`" for s in sources) + ".\n\n")
    md.append("Accuracy in points with a 95% bootstrap interval; rank 1 = best, ties share the better rank; "
              "rank_lo/hi: 95% bootstrap interval of the rank (items resampled, the same items for every model). "
              f"Pairwise: paired bootstrap interval of Δacc and exact McNemar, {correction} control over the "
              f"pairs of each leaderboard at α = {alpha}.  A tied group takes, best first, the models not "
              "significantly different from any of its members.  Rank intervals hold for each model alone, "
              "the groups for all pairs at once, so two models can share a group while their rank intervals "
              "do not overlap.\n")
    for n in notes:
        md.append(f"\n- {n}")
    md.append("\n" if notes else "")
    for key, g in per.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        name = M.key_name(key)
        sel = np.logical_and.reduce([pw[c] == v for c, v in zip(by, key)])
        p = pw[sel].sort_values(["acc_a", "acc_b"], ascending=False)
        gr = groups[np.logical_and.reduce([groups[c] == v for c, v in zip(by, key)])]
        slug = _slug(key)
        plot_leaderboard(g, out / f"leaderboard_{slug}.png", f"{name}: {int(g['n'].iloc[0])} items")
        plot_pairwise(g, p, out / f"pairwise_{slug}.png", f"{name}: pairwise Δacc ('*' = significant)")
        files[f"leaderboard_{slug}"] = out / f"leaderboard_{slug}.png"
        files[f"pairwise_{slug}"] = out / f"pairwise_{slug}.png"
        cols = ["model", "n", "acc", "acc_lo", "acc_hi", "rank", "rank_lo", "rank_hi", "group"]
        cols += ["usd_per_1k_items"] if "usd_per_1k_items" in g.columns else []
        md += [f"\n## {name}\n\n", f"{int(g['n'].iloc[0])} items, {len(g)} models, {len(gr)} tied group(s).\n\n",
               md_table(g, cols), "\n### Tied groups\n\n", md_table(gr, ["group", "models", "acc_max", "acc_min"]),
               f"\n![leaderboard](leaderboard_{slug}.png)\n", f"\n![pairwise](pairwise_{slug}.png)\n",
               "\n### Paired tests between models\n\n",
               f"{int(p['significant'].sum())} of {len(p)} pairs differ significantly.\n\n",
               md_table(p, ["model_a", "model_b", "acc_a", "acc_b", "delta_acc", "delta_lo", "delta_hi", "n_only_a",
                            "n_only_b", "p_mcnemar", "p_adj", "significant"])]
    (out / "leaderboard.md").write_text("".join(md), encoding="utf-8")
    files["report"] = out / "leaderboard.md"
    files["html"] = write_html(out / "leaderboard.md", title=title)
    js: dict[str, Any] = {"notes": list(notes), "sources": list(sources), "alpha": alpha, "correction": correction,
                          "tables": {k: json.loads(v.to_json(orient="records")) for k, v in tables.items()}}
    (out / "leaderboard.json").write_text(json.dumps(js, indent=1, ensure_ascii=False), encoding="utf-8")
    files["json"] = out / "leaderboard.json"
    return files
