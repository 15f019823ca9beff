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
                      chunk: int = 2048) -> np.ndarray:
    """Per evaluation row, the best cosine similarity to any training row (rows need not be
    normalised).  ``exclude_identical`` skips training rows identical to the evaluation row
    (cosine >= 1 - 1e-6): leave-one-out when the sets overlap."""
    E, T = _normalise(eval_emb), _normalise(train_emb)
    if E.shape[1] != T.shape[1]:
        raise ValueError(f"embedding sizes differ: eval {E.shape[1]}, train {T.shape[1]}")
    if len(T) == 0 or len(E) == 0:
        raise ValueError("empty set")
    out = np.empty(len(E))
    for s in range(0, len(E), chunk):
        sim = E[s:s + chunk] @ T.T
        if exclude_identical:
            sim = np.where(sim >= 1 - 1e-6, -np.inf, sim)
        out[s:s + chunk] = sim.max(1)
    if not np.isfinite(out).all():
        raise ValueError("an evaluation query has no training query other than itself")
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
    "routerbench": "RouterBench zero-shot train prompts: ARC-Challenge + MBPP + Winogrande (2,225)",
    "routerbench:<task>[:split]": "one RouterBench task",
    "judge:<run dir>": "the prompts of a D_judge preference file (judge run folder or preferences.parquet)",
    "<file>": "any .jsonl/.parquet/.csv of prompts (as for generation)",
}


def query_set(name: str, sample: int | None = None, seed: int = 0) -> list[str]:
    """The distinct query texts of a named set (see ``SOURCES``), optionally a seeded sample."""
    from rayeval.route import prefs as P
    from rayeval.route.generate import load_prompts

    kind, _, rest = name.partition(":")
    if name == "mt_bench":
        texts = load_prompts("mt_bench", turn=1)["prompt"].tolist()
    elif name == "mt_bench_turn2":
        texts = load_prompts("mt_bench", turn=2)["prompt"].tolist()
    elif name in ("mmlu", "gsm8k"):
        texts = P.load_routellm(name).texts
    elif kind == "routerbench":
        if rest:
            task, _, split = rest.partition(":")
            texts = P.load_routerbench(task, split or "train").texts
        else:
            texts = [t for task in P.ROUTERBENCH_TASKS for t in P.load_routerbench(task, "train").texts]
    elif kind == "judge":
        p = Path(rest)
        texts = P.Preferences.load(p / "preferences.parquet" if p.is_dir() else p).unique_queries()["query"].tolist()
    else:
        texts = load_prompts(name)["prompt"].tolist()
    texts = list(dict.fromkeys(str(t) for t in texts))  # distinct, first-seen order
    if sample is not None and len(texts) > sample:
        idx = np.sort(np.random.default_rng(seed).choice(len(texts), sample, replace=False))
        texts = [texts[i] for i in idx]
    return texts


def similarity_study(train: Sequence[str], bench: Sequence[str], *, sample: int | None = 1000, seed: int = 0,
                     embedder: str = DEFAULT_EMBEDDER) -> dict[str, Any]:
    """S(bench, train) for every (training proxy, benchmark).  Sets are sampled to ``sample``
    queries (seeded) to bound the cost; a benchmark that is also (part of) the training set is
    scored leave-one-out.  Returns {"rows": [...], "sources": {...}, "embedder", "sample"}."""
    from rayeval.route.embed import embed

    names = list(dict.fromkeys(list(train) + list(bench)))
    sets = {n: query_set(n, sample, seed) for n in names}
    embs = {n: embed(t, embedder, use_cache=True) for n, t in sets.items()}
    rows = []
    for t in train:
        tset = set(sets[t])
        for b in bench:
            overlap = sum(q in tset for q in sets[b])
            loo = overlap > 0
            sims = best_similarities(embs[b], embs[t], exclude_identical=loo)
            rows.append({"train": t, "bench": b, "score": float(sims.mean()), "median": float(np.median(sims)),
                         "n_eval": len(sets[b]), "n_train": len(sets[t]), "overlap": overlap, "leave_one_out": loo})
    return {"rows": rows, "embedder": embedder, "sample": sample, "seed": seed,
            "sources": {n: SOURCES.get(n, SOURCES.get(n.split(":")[0] + (":<task>[:split]" if n.startswith("routerbench:") else ""), n))
                        for n in names}}


def similarity_markdown(res: dict[str, Any], title: str = "Benchmark-dataset similarity") -> str:
    df = pd.DataFrame(res["rows"])
    lines = [f"## {title}", "",
             f"S(B, T) = mean over benchmark queries of the best cosine similarity to any training query "
             f"(`{res['embedder']}` embeddings, the routers'; at most {res['sample']} queries per set, seed "
             f"{res['seed']}; leave-one-out where the sets overlap).", ""]
    trains = list(dict.fromkeys(df["train"]))
    benches = list(dict.fromkeys(df["bench"]))
    lines.append("| training set (proxy) | " + " | ".join(benches) + " |")
    lines.append("|---|" + "---|" * len(benches))
    for t in trains:
        cells = []
        for b in benches:
            r = df[(df.train == t) & (df.bench == b)].iloc[0]
            cells.append(f"{r.score:.4f}" + (" (LOO)" if r.leave_one_out else ""))
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
