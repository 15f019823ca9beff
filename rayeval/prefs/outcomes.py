"""Routing training/evaluation data: ``Outcomes`` (query x model -> score, cost) and ``Preferences``
(pairwise battles), with builders from rayeval's eval output, RouteLLM's eval files, RouterBench
CSVs and arena-style battle JSONL.

Everything here is plain pandas; ``save``/``load`` go through parquet.
"""

from __future__ import annotations

import glob
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from rayeval.config import data_root
from rayeval.data.loaders import jsonl_rows
from rayeval.data.schema import DataValidationError, RowError

ROUTELLM_STRONG = "gpt-4-1106-preview"
ROUTELLM_WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
ROUTERBENCH_TASKS = ("arc_challenge", "mbpp", "winograde")
WINNERS = ("a", "b", "tie")


def check_pair(strong: str, weak: str, models: Sequence[str], where: str = "pair") -> None:
    """A strong/weak pair is two different models, both among ``models``."""
    missing = [m for m in (strong, weak) if m not in models]
    if missing:
        raise ValueError(f"{where}: model(s) {missing} of the pair (strong={strong!r}, weak={weak!r}) are not "
                         f"among {list(models)}")
    if strong == weak:
        raise ValueError(f"{where}: strong and weak are the same model {strong!r}; a pair is two models")


# --------------------------------------------------------------------------------------------
# Outcomes: one row per query, one score column per model (and optionally one cost column).
# --------------------------------------------------------------------------------------------
@dataclass
class Outcomes:
    """Per-query quality of several models.

    ``queries``: columns ``query_id`` (unique str), ``query`` (str), ``group`` (subject/task, str).
    ``scores``: float, same row order as ``queries``, one column per model (NaN = not evaluated).
    ``costs``: optional, same shape as ``scores`` (dollars or any unit, per query).
    """

    queries: pd.DataFrame
    scores: pd.DataFrame
    costs: pd.DataFrame | None = None
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.queries = self.queries.reset_index(drop=True)
        self.scores = self.scores.reset_index(drop=True).astype(float)
        self.scores.columns = pd.Index([str(c) for c in self.scores.columns])
        if "group" not in self.queries:
            self.queries["group"] = ""
        if len(self.queries) != len(self.scores):
            raise ValueError(f"{len(self.queries)} queries but {len(self.scores)} score rows")
        if self.queries["query_id"].duplicated().any():
            dup = self.queries["query_id"][self.queries["query_id"].duplicated()].iloc[0]
            raise ValueError(f"duplicate query_id {dup!r}")
        if self.costs is not None:
            self.costs = self.costs.reset_index(drop=True).astype(float)
            self.costs.columns = pd.Index([str(c) for c in self.costs.columns])
            if list(self.costs.columns) != list(self.scores.columns) or len(self.costs) != len(self.scores):
                raise ValueError("costs must have the same models and rows as scores")

    # -- basic views ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.queries)

    @property
    def models(self) -> list[str]:
        return list(self.scores.columns)

    @property
    def texts(self) -> list[str]:
        return self.queries["query"].astype(str).tolist()

    @property
    def groups(self) -> np.ndarray:
        return self.queries["group"].astype(str).to_numpy()

    def mean_scores(self) -> pd.Series:
        return self.scores.mean()

    def strong_weak(self, order: Sequence[str] | None = None) -> tuple[str, str]:
        """(strong, weak): the pair declared with :meth:`with_pair`, else the best and worst model
        by mean score.  A pair is two models: when the best and worst means tie (no gap, e.g. two
        models with the same accuracy), ``order`` (strongest first) decides, and without one the
        tie is an error.  Other ties keep the models' column order."""
        if self.meta.get("pair"):
            return tuple(self.meta["pair"])  # type: ignore[return-value]
        m = self.mean_scores().dropna()
        if len(m) < 2:
            raise ValueError(f"outcomes {self.name or '<unnamed>'}: a strong/weak pair needs two models with "
                             f"scores; have {self.models}")
        if m.max() > m.min():
            return str(m.idxmax()), str(m.idxmin())
        ranked = [x for x in (order or []) if x in m.index]
        if len(ranked) >= 2:
            return str(ranked[0]), str(ranked[-1])
        raise ValueError(f"outcomes {self.name or '<unnamed>'}: cannot tell strong from weak, every model has "
                         f"mean score {m.max():.4g} ({', '.join(m.index)}); declare the pair (strong first)")

    def with_pair(self, strong: str, weak: str) -> "Outcomes":
        """A copy whose strong/weak pair is fixed (kept by ``subset``, so cross-fitted folds agree)."""
        check_pair(strong, weak, self.models, where=f"outcomes {self.name or '<unnamed>'}")
        return Outcomes(self.queries, self.scores, self.costs, self.name, {**self.meta, "pair": [strong, weak]})

    def subset(self, idx: Sequence[int] | np.ndarray) -> "Outcomes":
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return Outcomes(
            self.queries.iloc[idx].reset_index(drop=True),
            self.scores.iloc[idx].reset_index(drop=True),
            None if self.costs is None else self.costs.iloc[idx].reset_index(drop=True),
            self.name, dict(self.meta),
        )

    def select_models(self, models: Sequence[str]) -> "Outcomes":
        models = list(models)
        missing = [m for m in models if m not in self.scores]
        if missing:
            raise KeyError(f"models {missing} not in {self.models}")
        return Outcomes(self.queries, self.scores[models],
                        None if self.costs is None else self.costs[models], self.name, dict(self.meta))

    def pair_arrays(self, strong: str | None = None, weak: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(strong scores, weak scores) as float arrays."""
        if not (strong and weak):
            s, w = self.strong_weak()
            strong, weak = strong or s, weak or w
        check_pair(strong, weak, self.models, where=f"outcomes {self.name or '<unnamed>'}")
        return self.scores[strong].to_numpy(float), self.scores[weak].to_numpy(float)

    # -- conversion ------------------------------------------------------------------------------
    def to_preferences(self, tie_eps: float = 0.0, models: Sequence[str] | None = None) -> "Preferences":
        """Every model pair on every query -> one battle (winner by score, tie within ``tie_eps``)."""
        models = list(models) if models is not None else self.models
        rows = []
        S = self.scores
        for a, b in itertools.combinations(models, 2):
            sa, sb = S[a].to_numpy(float), S[b].to_numpy(float)
            ok = ~(np.isnan(sa) | np.isnan(sb))
            d = sa - sb
            win = np.where(d > tie_eps, "a", np.where(d < -tie_eps, "b", "tie"))
            part = pd.DataFrame({
                "query_id": self.queries["query_id"].to_numpy()[ok],
                "query": self.queries["query"].to_numpy()[ok],
                "group": self.queries["group"].to_numpy()[ok],
                "model_a": a, "model_b": b, "winner": win[ok],
            })
            rows.append(part)
        df = pd.concat(rows, ignore_index=True) if rows else _empty_prefs()
        return Preferences(df, name=self.name)

    # -- io --------------------------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        df = self.queries[["query_id", "query", "group"]].copy()
        for m in self.models:
            df[f"score::{m}"] = self.scores[m].to_numpy()
        if self.costs is not None:
            for m in self.models:
                df[f"cost::{m}"] = self.costs[m].to_numpy()
        return df

    @classmethod
    def from_frame(cls, df: pd.DataFrame, name: str = "") -> "Outcomes":
        sc = [c for c in df.columns if c.startswith("score::")]
        cc = [c for c in df.columns if c.startswith("cost::")]
        if not sc:
            raise ValueError("no score::<model> columns: not an Outcomes table")
        scores = df[sc].rename(columns=lambda c: c[len("score::"):])
        costs = df[cc].rename(columns=lambda c: c[len("cost::"):]) if cc else None
        if costs is not None:
            costs = costs[list(scores.columns)]
        return cls(df[["query_id", "query", "group"]].copy(), scores, costs, name)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_frame().to_parquet(path, index=False)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Outcomes":
        return cls.from_frame(pd.read_parquet(path), name=Path(path).stem)


# --------------------------------------------------------------------------------------------
# Preferences: pairwise battles.
# --------------------------------------------------------------------------------------------
def _empty_prefs() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=str) for c in
                         ("query_id", "query", "group", "model_a", "model_b", "winner")})


@dataclass
class Preferences:
    """Battles: columns ``query_id, query, group, model_a, model_b, winner`` (winner in a/b/tie)."""

    df: pd.DataFrame
    name: str = ""

    def __post_init__(self) -> None:
        df = self.df.reset_index(drop=True).copy()
        for c in ("query", "model_a", "model_b", "winner"):
            if c not in df:
                raise ValueError(f"preferences need column {c!r}; have {list(df.columns)}")
        if "query_id" not in df:
            df["query_id"] = [_hash_id(q) for q in df["query"].astype(str)]
        if "group" not in df:
            df["group"] = ""
        bad = ~df["winner"].isin(WINNERS)
        if bad.any():
            raise ValueError(f"winner must be one of {WINNERS}; row {int(np.flatnonzero(bad)[0])} "
                             f"has {df['winner'][bad].iloc[0]!r}")
        self.df = df

    def __len__(self) -> int:
        return len(self.df)

    @property
    def models(self) -> list[str]:
        return sorted(set(self.df["model_a"]) | set(self.df["model_b"]))

    def unique_queries(self) -> pd.DataFrame:
        """query_id, query, group of each distinct query, in first-seen order."""
        return self.df.drop_duplicates("query_id")[["query_id", "query", "group"]].reset_index(drop=True)

    def subset_queries(self, query_ids: Iterable[str]) -> "Preferences":
        keep = self.df["query_id"].isin(set(query_ids))
        return Preferences(self.df[keep].reset_index(drop=True), self.name)

    def strong_labels(self, strong: str, weak: str) -> pd.DataFrame:
        """Per query, mean outcome of strong-vs-weak battles (1 strong wins, 0.5 tie, 0 loses)
        and the number of such battles: columns query_id, query, group, y, n."""
        d = self.df
        ab = (d["model_a"] == strong) & (d["model_b"] == weak)
        ba = (d["model_a"] == weak) & (d["model_b"] == strong)
        sub = d[ab | ba].copy()
        y = np.where(sub["winner"] == "tie", 0.5, 0.0)
        y = np.where((ab[ab | ba].to_numpy() & (sub["winner"] == "a").to_numpy())
                     | (ba[ab | ba].to_numpy() & (sub["winner"] == "b").to_numpy()), 1.0, y)
        sub["y"] = y
        g = sub.groupby("query_id", sort=False)
        out = g.agg(query=("query", "first"), group=("group", "first"), y=("y", "mean"), n=("y", "size"))
        return out.reset_index()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.df.to_parquet(path, index=False)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Preferences":
        return cls(pd.read_parquet(path), name=Path(path).stem)


def _hash_id(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Builders.
# --------------------------------------------------------------------------------------------
def _parse_bool(v, file: str, line: int, fieldname: str, errors: list[RowError]) -> float:
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    s = str(v).strip().lower()
    if s in ("true", "1", "1.0", "yes"):
        return 1.0
    if s in ("false", "0", "0.0", "no"):
        return 0.0
    errors.append(RowError(file, line, f"field {fieldname!r}: expected True/False, got {v!r}"))
    return float("nan")


def _contaminated(bench_dir: Path) -> set[str]:
    p = bench_dir / "contaminated_prompts.jsonl"
    if not p.exists():
        return set()
    return set(pd.read_json(p, lines=True)["eval_prompt"].astype(str))


def load_routellm(benchmark: str, root: str | Path | None = None, drop_contaminated: bool = True,
                  mt_bench_turns: Sequence[int] = (1, 2)) -> Outcomes:
    """RouteLLM's GPT-4 vs Mixtral eval files as Outcomes (scores: correctness 0/1, or MT-Bench
    judge score 1-10).  ``benchmark`` in mmlu, gsm8k, mt_bench (mt-bench).

    MT-Bench: the routed prompt is turn 1; the quality is the mean judge score over
    ``mt_bench_turns`` (RouteLLM's evaluation averages both turns: strong 9.21, weak 8.28;
    pass ``(1,)`` for first-turn scores only) and over judges when there are several.
    """
    bench = benchmark.lower().replace("-", "_")
    base = Path(root) if root else data_root() / "routellm_evals"
    models = [ROUTELLM_STRONG, ROUTELLM_WEAK]
    if bench == "mmlu":
        files = sorted(glob.glob(str(base / "mmlu" / "responses" / "mmlu_*.csv")))
        if not files:
            raise FileNotFoundError(f"no MMLU response files under {base / 'mmlu' / 'responses'}")
        parts = []
        for f in files:
            df = pd.read_csv(f, dtype=str, keep_default_na=False)
            df["group"] = Path(f).stem[len("mmlu_"):]
            df["_file"], df["_line"] = f, np.arange(len(df)) + 2
            parts.append(df)
        raw = pd.concat(parts, ignore_index=True)
        bench_dir = base / "mmlu"
    elif bench == "gsm8k":
        f = base / "gsm8k" / "gsm8k_responses.csv"
        raw = pd.read_csv(f, dtype=str, keep_default_na=False)
        raw["group"] = "gsm8k"
        raw["_file"], raw["_line"] = str(f), np.arange(len(raw)) + 2
        bench_dir = base / "gsm8k"
    elif bench == "mt_bench":
        return _load_mt_bench(base / "mt_bench", drop_contaminated, tuple(mt_bench_turns))
    else:
        raise ValueError(f"unknown RouteLLM benchmark {benchmark!r}: mmlu, gsm8k or mt_bench")
    errors: list[RowError] = []
    for col in ["prompt", *models]:
        if col not in raw:
            raise DataValidationError([RowError(str(raw["_file"].iloc[0]), 1, f"missing column {col!r}")])
    sc = {m: [_parse_bool(v, fi, li, m, errors) for v, fi, li in zip(raw[m], raw["_file"], raw["_line"])]
          for m in models}
    empty = raw["prompt"].str.strip() == ""
    for fi, li in zip(raw["_file"][empty], raw["_line"][empty]):
        errors.append(RowError(fi, int(li), "field 'prompt' is empty"))
    if errors:
        raise DataValidationError(errors)
    n0 = len(raw)
    keep = np.ones(n0, bool)
    if drop_contaminated:
        keep = ~raw["prompt"].isin(_contaminated(bench_dir)).to_numpy()
    qid = [f"{bench}:{g}:{i}" for i, g in enumerate(raw["group"])]
    queries = pd.DataFrame({"query_id": qid, "query": raw["prompt"], "group": raw["group"]})[keep]
    scores = pd.DataFrame(sc)[keep]
    return Outcomes(queries, scores, None, name=bench, meta={"n_raw": n0, "n_dropped": int((~keep).sum())})


def _load_mt_bench(d: Path, drop_contaminated: bool, turns: tuple[int, ...]) -> Outcomes:
    qf, jf = d / "question.jsonl", d / "judgements.jsonl"
    qs = _read_jsonl(qf, required=("question_id", "turns"))
    js = _read_jsonl(jf, required=("question_id", "model", "score", "turn"))
    errors = []
    for r in js:
        try:
            float(r["score"])
        except (TypeError, ValueError):
            errors.append(RowError(str(jf), r["_line"], f"field 'score': not a number: {r['score']!r}"))
    if errors:
        raise DataValidationError(errors)
    q = pd.DataFrame(qs)
    q["turn1"] = q["turns"].apply(lambda t: t[0])
    q["turn2"] = q["turns"].apply(lambda t: t[1] if len(t) > 1 else "")
    n0 = len(q)
    if drop_contaminated:
        c = _contaminated(d)
        q = q[~(q["turn1"].isin(c) | q["turn2"].isin(c))]
    j = pd.DataFrame(js)
    j = j[j["turn"].astype(int).isin(turns)]
    j["score"] = j["score"].astype(float)
    j = j[j["score"] >= 0]  # FastChat writes -1 when the judge output could not be parsed
    piv = j.groupby(["question_id", "model"])["score"].mean().unstack("model")
    piv = piv.reindex(q["question_id"].to_numpy())
    models = [m for m in (ROUTELLM_STRONG, ROUTELLM_WEAK) if m in piv] + \
             [m for m in piv.columns if m not in (ROUTELLM_STRONG, ROUTELLM_WEAK)]
    queries = pd.DataFrame({"query_id": [f"mt_bench:{i}" for i in q["question_id"]],
                            "query": q["turn1"].to_numpy(),
                            "group": q["category"].to_numpy() if "category" in q else "mt_bench"})
    return Outcomes(queries, piv[models].reset_index(drop=True), None, name="mt_bench",
                    meta={"n_raw": n0, "n_dropped": n0 - len(q)})


def _read_jsonl(path: Path, required: Sequence[str] = ()) -> list[dict]:
    out, errors = [], []
    for i, r in jsonl_rows(path):
        if isinstance(r, str):  # bad encoding / invalid JSON / not an object, said by the data layer
            errors.append(RowError(str(path), i, r))
            continue
        miss = [k for k in required if k not in r or r[k] is None]
        if miss:
            errors.append(RowError(str(path), i, f"missing field(s) {miss}"))
            continue
        r["_line"] = i
        out.append(r)
    if errors:
        raise DataValidationError(errors)
    return out


def load_routerbench(task: str, split: str = "train", root: str | Path | None = None,
                     drop_missing: bool = True) -> Outcomes:
    """RouterBench zero-shot subset: 11 models' 0/1 scores and per-query dollar costs.

    Empty cells are missing evaluations (NaN); with ``drop_missing`` (default) queries with any
    missing score or cost are dropped (count in ``meta["n_dropped"]``).  Non-numeric non-empty
    cells are errors (file:record, header = record 1).
    """
    base = Path(root) if root else data_root() / "routerbench_zs"
    f = base / f"{task}_{split}.csv"
    if not f.exists():
        raise FileNotFoundError(f"{f} not found (tasks: {ROUTERBENCH_TASKS}, splits: train/test)")
    raw = pd.read_csv(f, dtype=str, keep_default_na=False)
    cost_cols = [c for c in raw.columns if c.endswith("|total_cost")]
    models = [c[: -len("|total_cost")] for c in cost_cols]
    missing = [m for m in models if m not in raw]
    if missing or not models:
        raise DataValidationError([RowError(str(f), 1, f"missing score column(s) {missing or 'any'}")])
    errors = []
    S = np.full((len(raw), len(models)), np.nan)
    C = np.full_like(S, np.nan)
    for j, m in enumerate(models):
        for col, arr in ((m, S), (f"{m}|total_cost", C)):
            vals = pd.to_numeric(raw[col], errors="coerce").to_numpy()
            for i in np.flatnonzero(np.isnan(vals) & (raw[col].str.strip() != "").to_numpy()):
                errors.append(RowError(str(f), int(i) + 2, f"field {col!r}: not a number: {raw[col].iloc[i]!r}"))
            arr[:, j] = vals
    if errors:
        raise DataValidationError(errors)
    prompts = raw["prompt"].map(_unwrap_list_literal)
    qid = raw["sample_id"] if "sample_id" in raw else pd.Series([f"{task}:{i}" for i in range(len(raw))])
    queries = pd.DataFrame({"query_id": qid.astype(str), "query": prompts,
                            "group": raw["eval_name"] if "eval_name" in raw else task})
    keep = ~(np.isnan(S).any(1) | np.isnan(C).any(1)) if drop_missing else np.ones(len(S), bool)
    return Outcomes(queries[keep], pd.DataFrame(S[keep], columns=models), pd.DataFrame(C[keep], columns=models),
                    name=f"routerbench_{task}_{split}", meta={"n_raw": len(S), "n_dropped": int((~keep).sum())})


def _unwrap_list_literal(s: str) -> str:
    """RouterBench stores prompts as a python list literal "['...']"; unwrap it."""
    s = str(s)
    if s.startswith("[") and s.endswith("]"):
        import ast

        try:
            v = ast.literal_eval(s)
            if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
                return "\n".join(v)
        except (ValueError, SyntaxError):
            pass
    return s


_ARENA_WINNER = {"model_a": "a", "a": "a", "model_b": "b", "b": "b", "tie": "tie",
                 "tie (bothbad)": "tie", "tie(bothbad)": "tie"}


def load_battles_jsonl(path: str | Path) -> Preferences:
    """Arena-style battles: ``question`` or ``prompt`` (str, or a conversation list whose first
    user turn is used), ``model_a``, ``model_b``, ``winner`` in model_a/model_b/tie/tie (bothbad)."""
    path = Path(path)
    rows, errors = [], []
    for i, r in jsonl_rows(path):  # the data layer's JSONL reader: encoding, JSON, object checks
        if isinstance(r, str):
            errors.append(RowError(str(path), i, r))
            continue
        q = r.get("question", r.get("prompt"))
        if isinstance(q, list):
            q = next((t.get("content") for t in q if isinstance(t, dict) and t.get("role", "user") == "user"),
                     q[0] if q and isinstance(q[0], str) else None)
        if not isinstance(q, str) or not q.strip():
            errors.append(RowError(str(path), i, "field 'question'/'prompt': missing or empty"))
            continue
        bad = [k for k in ("model_a", "model_b") if not isinstance(r.get(k), str) or not r.get(k)]
        if bad:
            errors.append(RowError(str(path), i, f"field {bad[0]!r}: missing or not a string"))
            continue
        w = _ARENA_WINNER.get(str(r.get("winner", "")).strip().lower())
        if w is None:
            errors.append(RowError(str(path), i, f"field 'winner': {r.get('winner')!r} not in "
                                                 "model_a/model_b/tie/tie (bothbad)"))
            continue
        rows.append({"query_id": str(r.get("question_id") or _hash_id(q)), "query": q,
                     "group": str(r.get("category", "") or ""), "model_a": r["model_a"],
                     "model_b": r["model_b"], "winner": w})
    if errors:
        raise DataValidationError(errors)
    return Preferences(pd.DataFrame(rows) if rows else _empty_prefs(), name=path.stem)


def outcomes_from_eval(src: str | Path | pd.DataFrame, score_col: str = "correct") -> Outcomes:
    """rayeval eval output (parquet file/folder or DataFrame) -> Outcomes.

    Needs columns ``model``, ``item_id``, ``question`` (or ``prompt``) and ``correct`` (bool) or
    another numeric ``score_col``; optional ``subject``, ``cost``.  Exactly one row per
    (model, item) is expected (the unperturbed setting); duplicates are an error.
    """
    where = "<dataframe>"
    if not isinstance(src, pd.DataFrame):
        where = str(src)
        src = pd.read_parquet(src)
    df = src.reset_index(drop=True)
    qcol = "question" if "question" in df else ("prompt" if "prompt" in df else None)
    need = ["model", "item_id", score_col]
    miss = [c for c in need if c not in df] + ([] if qcol else ["question|prompt"])
    if miss:
        raise ValueError(f"{where}: eval output lacks column(s) {miss}; has {list(df.columns)}")
    errors = []
    sc = pd.to_numeric(df[score_col].map(lambda v: float(v) if isinstance(v, (bool, np.bool_)) else v),
                       errors="coerce")
    for i in np.flatnonzero(sc.isna().to_numpy()):
        errors.append(RowError(where, int(i) + 1, f"field {score_col!r}: {df[score_col].iloc[i]!r} is not bool/number"))
    dup = df.duplicated(["model", "item_id"], keep="first")
    for i in np.flatnonzero(dup.to_numpy()):
        errors.append(RowError(where, int(i) + 1, f"duplicate (model, item_id) = ({df['model'].iloc[i]!r}, "
                                                  f"{df['item_id'].iloc[i]!r}); filter to one setting first"))
    if errors:
        raise DataValidationError(errors)
    df = df.assign(_score=sc.astype(float))
    items = df.drop_duplicates("item_id")[["item_id", qcol] + (["subject"] if "subject" in df else [])]
    queries = pd.DataFrame({"query_id": items["item_id"].astype(str), "query": items[qcol].astype(str),
                            "group": items["subject"].astype(str) if "subject" in items else ""})
    scores = df.pivot(index="item_id", columns="model", values="_score").reindex(items["item_id"])
    costs = None
    if "cost" in df:
        costs = df.pivot(index="item_id", columns="model", values="cost").reindex(items["item_id"])
        costs = costs[list(scores.columns)].reset_index(drop=True)
    return Outcomes(queries, scores.reset_index(drop=True), costs, name=Path(where).stem)
