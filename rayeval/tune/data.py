"""The tuning data: split once, embedded once, shipped once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rayeval.tune.config import DataSpec


# ============================================================================================
# Data: split once, ship once.
# ============================================================================================
@dataclass
class TuneData:
    """Train / valid / test Outcomes and their embeddings per embedder (shipped to trials once)."""

    train: Any
    valid: Any
    test: Any
    emb: dict[str, dict[str, np.ndarray]]  # embedder -> split -> (n, d)
    info: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str):
        return getattr(self, name)

    def embeddings(self, split: str, embedder: str | None) -> np.ndarray | None:
        if embedder is None:
            return None
        if embedder not in self.emb:
            raise ValueError(f"no embeddings for {embedder!r}; add it to data.embedders ({sorted(self.emb)})")
        return self.emb[embedder][split]


def load_outcomes(source: str):
    from rayeval.prefs.sources import load_outcomes as load

    return load(source, "tuning")


def prepare_data(spec: DataSpec, outcomes=None) -> TuneData:
    """Load, subsample and split the data by question (seeded); embed each split (cached)."""
    from rayeval.route.evaluate import embeddings_for

    o = outcomes if outcomes is not None else load_outcomes(spec.source)
    rng = np.random.default_rng(spec.seed)
    idx = rng.permutation(len(o))
    if spec.subsample and spec.subsample < len(o):
        idx = idx[: spec.subsample]
    n = len(idx)
    n_valid, n_test = int(round(spec.valid_fraction * n)), int(round(spec.test_fraction * n))
    parts = {"test": np.sort(idx[:n_test]), "valid": np.sort(idx[n_test:n_test + n_valid]),
             "train": np.sort(idx[n_test + n_valid:])}
    full_emb = {e: embeddings_for(o, e) for e in spec.embedders}
    subsets = {k: o.subset(v) for k, v in parts.items()}
    emb = {e: {k: a[v] for k, v in parts.items()} for e, a in full_emb.items()}
    strong, weak = subsets["train"].strong_weak()
    info = {"source": spec.source, "n": n, **{f"n_{k}": len(v) for k, v in parts.items()},
            "strong": strong, "weak": weak, "seed": spec.seed}
    return TuneData(subsets["train"], subsets["valid"], subsets["test"], emb, info)


def evaluate_router(router, data: TuneData, split: str) -> dict[str, float]:
    """APGR (RouteLLM's computation), paper APGR, CPT(50%), CPT(80%) of a fitted router on a split."""
    from rayeval.route.evaluate import summarize

    o = data.split(split)
    emb = data.embeddings(split, getattr(router, "embedder", None)) if router.needs_embeddings else None
    p = router.win_probability(o.texts, emb, groups=o.groups)
    s = summarize(p, o, n_boot=0, strong=router.strong_, weak=router.weak_)
    return {"apgr": s["apgr"], "apgr_paper": s["apgr_paper"], "cpt50": s["cpt50"], "cpt80": s["cpt80"]}


def _train_embeddings(router, data: TuneData) -> np.ndarray | None:
    return data.embeddings("train", getattr(router, "embedder", None)) if router.needs_embeddings else None
