"""Benchmark-to-training-data similarity (RouteLLM, Ong et al. 2024, section 5.1).

For a training set T and an evaluation set B, with L2-normalised embeddings,

    S(B, T) = (1 / |B|) * sum_{b in B} max_{t in T} cos(b, t)

the mean over evaluation queries of the best cosine similarity to any training query, on the
same embeddings the routers use (``rayeval.route.embed``, all-MiniLM-L6-v2 by default).  The
paper finds Arena (its training data) much closer to MT-Bench than to MMLU or GSM8K, which
explains why its routers do best on MT-Bench.  There is no Arena data here; the proxies
``similarity_study`` offers, and what they can and cannot show, are in docs/preference_data.md.

``leave_one_out``: when B and T are the same set (or B is inside T), a query's own copy is
excluded (its best match is then its nearest *other* query) -- otherwise the score is 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from rayeval.route.embed import DEFAULT_EMBEDDER


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    if (n == 0).any():
        raise ValueError("zero-length embedding: cosine similarity is undefined")
    return x / n


def best_similarities(eval_emb: np.ndarray, train_emb: np.ndarray, *, exclude_identical: bool = False,
                      exclude: np.ndarray | None = None, chunk: int = 2048) -> np.ndarray:
    """Per evaluation row, the best cosine similarity to any training row (rows need not be
    normalised).  ``exclude_identical`` skips training rows identical to the evaluation row
    (cosine >= 1 - 1e-6): leave-one-out when the sets overlap.  ``exclude`` (bool, n_eval x
    n_train) skips chosen pairs, e.g. the other turns of the same conversation."""
    E, T = _normalise(eval_emb), _normalise(train_emb)
    if E.shape[1] != T.shape[1]:
        raise ValueError(f"embedding sizes differ: eval {E.shape[1]}, train {T.shape[1]}")
    if len(T) == 0 or len(E) == 0:
        raise ValueError("empty set")
    if exclude is not None and exclude.shape != (len(E), len(T)):
        raise ValueError(f"exclude mask {exclude.shape} != {(len(E), len(T))}")
    out = np.empty(len(E))
    for s in range(0, len(E), chunk):
        sim = E[s:s + chunk] @ T.T
        if exclude_identical:
            sim = np.where(sim >= 1 - 1e-6, -np.inf, sim)
        if exclude is not None:
            sim = np.where(exclude[s:s + chunk], -np.inf, sim)
        out[s:s + chunk] = sim.max(1)
    if not np.isfinite(out).all():
        raise ValueError("an evaluation query has no training query left to compare with")
    return out


def similarity_score(eval_set: Sequence[str] | np.ndarray, train_set: Sequence[str] | np.ndarray, *,
                     embedder: str = DEFAULT_EMBEDDER, leave_one_out: bool = False) -> float:
    """S(B, T): texts (embedded with ``embedder``, cached) or embedding arrays."""
    return float(best_similarities(_emb(eval_set, embedder), _emb(train_set, embedder),
                                   exclude_identical=leave_one_out).mean())


def _emb(x, embedder: str) -> np.ndarray:
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        return x
    from rayeval.route.embed import embed

    texts = [str(t) for t in x]
    return embed(texts, embedder, use_cache=True)


# ----------------------------------------------------------------------------- named query sets

SOURCES = {
    "mt_bench": "MT-Bench first turns (80)",
    "mt_bench_turn2": "MT-Bench second turns (80, follow-up requests)",
    "mmlu": "MMLU test prompts (RouteLLM's files, 14,037)",
    "gsm8k": "GSM8K test prompts (RouteLLM's files, 1,307)",
    "routerbench": "RouterBench train prompts, ARC-Challenge + MBPP + Winogrande (2,225; final question of each few-shot prompt)",
    "routerbench:<task>[:split]": "one RouterBench task",
    "judge:<run dir>": "the prompts of a D_judge preference file (judge run folder or preferences.parquet)",
    "<file>": "any .jsonl/.parquet/.csv of prompts (as for generation)",
}


def query_set(name: str, sample: int | None = None, seed: int = 0) -> pd.DataFrame:
    """The distinct queries of a named set (see ``SOURCES``; ``a+b`` is the union of two sets):
    columns ``id`` (item / conversation id: the two MT-Bench turns of a question share it) and
    ``text``; optionally a seeded sample of ``sample`` rows."""
    from rayeval.prefs import outcomes as P
    from rayeval.prefs.generate import load_prompts

    if "+" in name:
        parts = [query_set(n, None, seed) for n in name.split("+")]
        df = pd.concat(parts, ignore_index=True).drop_duplicates("text")
        return _sample(df, sample, seed)
    kind, _, rest = name.partition(":")
    if name in ("mt_bench", "mt_bench_turn2"):
        d = load_prompts("mt_bench", turn=1 if name == "mt_bench" else 2)
        df = pd.DataFrame({"id": d["prompt_id"], "text": d["prompt"]})
    elif name in ("mmlu", "gsm8k"):
        o = P.load_routellm(name)
        df = pd.DataFrame({"id": o.queries["query_id"], "text": o.texts})
    elif kind == "routerbench":
        tasks = [rest.partition(":")[0]] if rest else list(P.ROUTERBENCH_TASKS)
        split = rest.partition(":")[2] or "train"
        os_ = [P.load_routerbench(t, split) for t in tasks]
        df = pd.concat([pd.DataFrame({"id": o.queries["query_id"], "text": [final_question(x) for x in o.texts]})
                        for o in os_], ignore_index=True)
    elif kind == "judge":
        p = Path(rest)
        q = P.Preferences.load(p / "preferences.parquet" if p.is_dir() else p).unique_queries()
        df = pd.DataFrame({"id": q["query_id"], "text": q["query"]})
    else:
        d = load_prompts(name)
        df = pd.DataFrame({"id": d["prompt_id"], "text": d["prompt"]})
    df = df.astype(str).drop_duplicates("text").reset_index(drop=True)
    return _sample(df, sample, seed)


def final_question(text: str) -> str:
    """The last blank-line-separated block of a few-shot prompt: RouterBench's ARC and Winogrande
    prompts repeat the same 5-shot examples first, and the embedder (all-MiniLM-L6-v2 reads at
    most 256 word pieces) would see only that shared prefix -- every query would embed alike."""
    text = str(text).strip()
    return text.rsplit("\n\n", 1)[-1] if "\n\n" in text else text


def _sample(df: pd.DataFrame, sample: int | None, seed: int) -> pd.DataFrame:
    if sample is not None and len(df) > sample:
        idx = np.sort(np.random.default_rng(seed).choice(len(df), sample, replace=False))
        df = df.iloc[idx]
    return df.reset_index(drop=True)


def similarity_study(train: Sequence[str], bench: Sequence[str], *, sample: int | None = 1000, seed: int = 0,
                     embedder: str = DEFAULT_EMBEDDER) -> dict[str, Any]:
    """S(bench, train) for every (training proxy, benchmark).  Sets are sampled to ``sample``
    queries (seeded) to bound the cost.  Where a benchmark query also occurs in the training
    set -- the same text, or the same item/conversation id (MT-Bench's two turns) -- those
    training queries are left out for it.  Returns {"rows": [...], "sources", "embedder", ...}."""
    from rayeval.route.embed import embed

    names = list(dict.fromkeys(list(train) + list(bench)))
    sets = {n: query_set(n, sample, seed) for n in names}
    embs = {n: embed(sets[n]["text"].tolist(), embedder, use_cache=True) for n in names}
    rows = []
    for t in train:
        T = sets[t]
        for b in bench:
            B = sets[b]
            mask = (B["id"].to_numpy()[:, None] == T["id"].to_numpy()[None, :]) | \
                   (B["text"].to_numpy()[:, None] == T["text"].to_numpy()[None, :])
            excluded = int(mask.any(1).sum())
            sims = best_similarities(embs[b], embs[t], exclude_identical=excluded > 0, exclude=mask if excluded else None)
            rows.append({"train": t, "bench": b, "score": float(sims.mean()), "median": float(np.median(sims)),
                         "n_eval": len(B), "n_train": len(T), "held_out": excluded})
    return {"rows": rows, "embedder": embedder, "sample": sample, "seed": seed,
            "sources": {n: " + ".join(SOURCES.get(p, SOURCES.get(p.split(":")[0] + ":<task>[:split]", p))
                                      for p in n.split("+")) for n in names}}


def similarity_markdown(res: dict[str, Any], title: str = "Benchmark-dataset similarity") -> str:
    df = pd.DataFrame(res["rows"])
    lines = [f"## {title}", "",
             f"S(B, T) = mean over benchmark queries of the best cosine similarity to any training query "
             f"(`{res['embedder']}` embeddings, the routers'; at most {res['sample']} queries per set, seed "
             f"{res['seed']}).  * = some benchmark queries are also in the training set (same text or same "
             f"conversation id): for those, their own copies are left out of the training set.", ""]
    trains = list(dict.fromkeys(df["train"]))
    benches = list(dict.fromkeys(df["bench"]))
    lines.append("| training set (proxy) | " + " | ".join(benches) + " |")
    lines.append("|---|" + "---|" * len(benches))
    for t in trains:
        cells = []
        for b in benches:
            r = df[(df.train == t) & (df.bench == b)].iloc[0]
            cells.append(f"{r.score:.4f}" + (" *" if r.held_out else ""))
        lines.append(f"| {t} (n={int(df[df.train == t].n_train.iloc[0])}) | " + " | ".join(cells) + " |")
    lines += ["", "RouteLLM (paper, Chatbot Arena battles as the training data, OpenAI embeddings): MT-Bench is "
                  "the most similar benchmark, MMLU and GSM8K clearly less -- and its routers do best on MT-Bench."]
    return "\n".join(lines) + "\n"


def save_similarity(res: dict[str, Any], out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "similarity.json").write_text(json.dumps(res, indent=1))
    (out / "similarity.md").write_text(similarity_markdown(res))
    return {"json": out / "similarity.json", "md": out / "similarity.md"}
