"""Router transfer to new model pairs (RouteLLM section 5.3) on RouterBench's 11 models, and the
augmentation report section (D_judge position bias, benchmark similarity, transfer table).

A router learns P(strong wins | query) for ONE (strong, weak) pair.  Transfer: fit it on the
train split of pair P, then use its scores unchanged to route between another pair Q on the
test split, and compare with a router fitted on Q itself:

    APGR(same)        = router fitted on Q's train labels, evaluated on Q (test split)
    APGR(transferred) = router fitted on P's train labels, evaluated on Q (test split)

Both use RouteLLM's APGR code (random router ~ 0.5).  The delta's 95% CI is a paired bootstrap
over test queries (both routers' scores held fixed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from rayeval.route import metrics as M
from rayeval.prefs.outcomes import Outcomes, load_routerbench

# Pairs by rank of mean train quality (0 = best): the paper-like (best, worst) pair, a
# near-neighbour pair, and pairs across the middle.
DEFAULT_RANK_PAIRS: tuple[tuple[int, int], ...] = ((0, -1), (1, -2), (0, 5), (5, -1))


def short(model: str) -> str:
    return model.split("/")[-1]


def rank_pairs(outcomes: Outcomes, ranks: Sequence[tuple[int, int]] = DEFAULT_RANK_PAIRS) -> list[tuple[str, str]]:
    """(strong, weak) model pairs chosen by rank of mean quality on ``outcomes``."""
    order = outcomes.mean_scores().sort_values(ascending=False, kind="stable").index.tolist()
    out = []
    for i, j in ranks:
        s, w = order[i], order[j]
        if s == w:
            raise ValueError(f"rank pair {(i, j)} names one model twice")
        if (s, w) not in out:
            out.append((s, w))
    return out


def _fit_scores(router: str, params: dict, train: Outcomes, test: Outcomes, pair: tuple[str, str],
                tr_emb, te_emb) -> np.ndarray:
    from rayeval.route.routers import make_router

    r = make_router(router, **{**params, "strong": pair[0], "weak": pair[1]})
    r.fit(train.select_models(list(pair)), tr_emb if r.needs_embeddings else None)
    return r.win_probability(test.texts, te_emb if r.needs_embeddings else None, groups=test.groups)


def _apgr_delta(transferred, same, s, w) -> float:
    """APGR of the transferred router's scores minus the same-pair router's (a resample where
    the two models tie on average has no APGR: skipped by the bootstrap)."""
    if s.mean() == w.mean():
        return float("nan")
    return M.apgr_routellm(transferred, s, w) - M.apgr_routellm(same, s, w)


def transfer_table(train: Outcomes, test: Outcomes, pairs: Sequence[tuple[str, str]], router: str = "knn",
                   params: dict | None = None, n_boot: int = 200, seed: int = 0, task: str = "",
                   train_embeddings: np.ndarray | None = None, test_embeddings: np.ndarray | None = None) -> pd.DataFrame:
    """Every (train pair -> test pair) of ``pairs``: APGR on the same pair vs transferred."""
    from rayeval.route.routers import ROUTERS

    params = dict(params or {})
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}")
    for p in pairs:
        missing = [m for m in p if m not in train.models or m not in test.models]
        if missing:
            raise KeyError(f"models {missing} not in the data ({train.models})")
    if ROUTERS[router].needs_embeddings:
        from rayeval.route.embed import embed

        train_embeddings = embed(train.texts) if train_embeddings is None else train_embeddings
        test_embeddings = embed(test.texts) if test_embeddings is None else test_embeddings
    scores = {p: _fit_scores(router, params, train, test, p, train_embeddings, test_embeddings) for p in pairs}
    rows = []
    for q in pairs:
        s, w = test.pair_arrays(*q)
        same = M.apgr_routellm(scores[q], s, w)
        for p in pairs:
            row = {"task": task or test.name, "router": router, "train_pair": f"{short(p[0])} / {short(p[1])}",
                   "test_pair": f"{short(q[0])} / {short(q[1])}", "same_pair": p == q, "n_test": len(test),
                   "gap": float(s.mean() - w.mean()), "apgr_same": same,
                   "apgr_transferred": M.apgr_routellm(scores[p], s, w)}
            row["delta"] = row["apgr_transferred"] - same
            row["delta_lo"] = row["delta_hi"] = np.nan
            if n_boot and p != q:  # paired: the same resamples (one seed) for every pair
                ci = M.bootstrap(_apgr_delta, scores[p], scores[q], s, w, n_boot=n_boot, seed=seed)
                row["delta_lo"], row["delta_hi"] = ci.lo, ci.hi
            rows.append(row)
    return pd.DataFrame(rows)


def routed_queries(oc: Outcomes) -> Outcomes:
    """The same outcomes with each query cut to its final question (``final_question``): what a
    router should embed for RouterBench's few-shot prompts."""
    from rayeval.prefs.similarity import final_question

    q = oc.queries.copy()
    q["query"] = [final_question(t) for t in q["query"]]
    return Outcomes(q, oc.scores, oc.costs, oc.name, dict(oc.meta))


def transfer_study(tasks: Sequence[str] = ("arc_challenge", "mbpp", "winograde"), router: str = "knn",
                   params: dict | None = None, ranks: Sequence[tuple[int, int]] = DEFAULT_RANK_PAIRS,
                   n_boot: int = 200, seed: int = 0, final_only: bool = True) -> pd.DataFrame:
    """RouterBench train/test split per task; pairs by rank of mean train quality.  With
    ``final_only`` routers see each prompt's final question, not the shared few-shot prefix."""
    parts = []
    for t in tasks:
        tr, te = load_routerbench(t, "train"), load_routerbench(t, "test")
        if final_only:
            tr, te = routed_queries(tr), routed_queries(te)
        parts.append(transfer_table(tr, te, rank_pairs(tr, ranks), router, params, n_boot, seed, task=t))
    return pd.concat(parts, ignore_index=True)


# ----------------------------------------------------------------------------- markdown

def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def transfer_markdown(tab: pd.DataFrame, only_from_first: bool = False) -> str:
    """The transfer table (off-diagonal entries: train pair != test pair) and a per-task summary."""
    off = tab[~tab["same_pair"]]
    router = ", ".join(sorted(set(tab["router"])))
    lines = ["## Router transfer to new model pairs (RouterBench, 11 models)", "",
             f"Router `{router}` fitted on the train split of one (strong, weak) pair, used unchanged on another "
             "pair's test split, vs the same router fitted on that pair.  APGR by RouteLLM's code "
             "(random ~ 0.5); delta = transferred - same, 95% paired-bootstrap CI over test queries.", "",
             "| task | train pair | test pair | APGR same pair | APGR transferred | delta [95% CI] |",
             "|---|---|---|---|---|---|"]
    for _, r in off.iterrows():
        ci = "" if np.isnan(r["delta_lo"]) else f" [{r['delta_lo']:+.3f}, {r['delta_hi']:+.3f}]"
        lines.append(f"| {r['task']} | {r['train_pair']} | {r['test_pair']} | {_pct(r['apgr_same'])} | "
                     f"{_pct(r['apgr_transferred'])} | {r['delta']:+.3f}{ci} |")
    if len(off):
        g = off.groupby("task").agg(same=("apgr_same", "mean"), transferred=("apgr_transferred", "mean"),
                                    delta=("delta", "mean"),
                                    ci_excludes_zero=("delta_hi", lambda h: int(((h < 0) | (off.loc[h.index, "delta_lo"] > 0)).sum())),
                                    n=("delta", "size"))
        lines += ["", "| task | mean APGR same | mean APGR transferred | mean delta | pairs whose CI excludes 0 |",
                  "|---|---|---|---|---|"]
        for t, r in g.iterrows():
            lines.append(f"| {t} | {r.same:.3f} | {r.transferred:.3f} | {r.delta:+.3f} | {int(r.ci_excludes_zero)}/{int(r.n)} |")
        lines += ["", f"Over all {len(off)} transfers: mean delta {off['delta'].mean():+.3f}, "
                      f"transferred APGR above 0.5 (random) in {int((off['apgr_transferred'] > 0.5).sum())}/{len(off)}."]
    return "\n".join(lines) + "\n"


def augment_markdown(judge_stats: dict | None = None, similarity: dict | None = None,
                     transfer: pd.DataFrame | None = None, title: str = "# Preference data beyond gold labels") -> str:
    """The augmentation section (judge bias, similarity, transfer), for ``rayeval.route.evaluate.write_report(res, out, extra_md=...)``."""
    from rayeval.prefs.judge import judge_markdown
    from rayeval.prefs.similarity import similarity_markdown

    parts = [title, ""]
    if judge_stats:
        parts.append(judge_markdown(judge_stats))
    if similarity:
        parts.append(similarity_markdown(similarity))
    if transfer is not None and len(transfer):
        parts.append(transfer_markdown(transfer))
    return "\n".join(parts)


def write_augment_report(out_dir: str | Path, *, transfer: pd.DataFrame | None = None, judge_dir: str | Path | None = None,
                         judge_stats: dict | None = None, similarity: dict | None = None) -> dict[str, Path]:
    """Write ``augment_report.md`` (+ ``transfer.csv``, ``similarity.json``) and return the paths.
    ``judge_dir``: a judge run folder (its ``judge_stats.json`` is read)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if judge_dir is not None and judge_stats is None:
        judge_stats = json.loads((Path(judge_dir) / "judge_stats.json").read_text())
    if transfer is not None:
        transfer.to_csv(out / "transfer.csv", index=False)
        files["transfer"] = out / "transfer.csv"
    if similarity is not None:
        (out / "similarity.json").write_text(json.dumps(similarity, indent=1))
        files["similarity"] = out / "similarity.json"
    md = augment_markdown(judge_stats, similarity, transfer)
    (out / "augment_report.md").write_text(md)
    files["report"] = out / "augment_report.md"
    return files
