"""Baselines and light learned routers: random, prompt length, kNN on embeddings, per-group
prior, logistic regression on embeddings (+ group), and a blend of other routers."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rayeval.route.routers.base import Router, TrainSet, make_router, register


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.clip(x, -50, 50)))


@register
class RandomRouter(Router):
    """Uniform random P(strong wins), a deterministic function of (seed, query text)."""

    name = "random"
    SEARCH_SPACE = {"seed": [0, 1, 2, 3, 4]}

    def __init__(self, seed: int = 0):
        self.seed = seed

    def _fit(self, ts, emb, data):
        pass

    def _predict(self, texts, emb, groups):
        out = np.empty(len(texts))
        for i, t in enumerate(texts):
            h = hashlib.blake2b(f"{self.seed}\x00{i if t == '' else t}".encode("utf-8", "surrogatepass"), digest_size=8)
            out[i] = int.from_bytes(h.digest(), "little") / 2**64
        return out


@register
class LengthRouter(Router):
    """Longer prompt -> strong model.  P = len / (len + median training length)."""

    name = "length"

    def __init__(self, unit: str = "chars"):
        self.unit = unit

    def _len(self, texts):
        if self.unit == "words":
            return np.array([len(t.split()) for t in texts], float)
        return np.array([len(t) for t in texts], float)

    def _fit(self, ts, emb, data):
        self.median_ = float(np.median(self._len(ts.texts))) or 1.0

    def _predict(self, texts, emb, groups):
        L = self._len(texts)
        return L / (L + self.median_)

    def _state(self):
        return {"median": np.array(self.median_)}

    def _set_state(self, s, folder):
        self.median_ = float(s["median"])


@register
class KNNRouter(Router):
    """Mean training outcome of the k most cosine-similar training queries."""

    name = "knn"
    needs_embeddings = True
    SEARCH_SPACE = {"k": [10, 20, 50, 100, 200], "weighting": ["uniform", "similarity"]}

    def __init__(self, k: int = 50, weighting: str = "uniform", embedder: str = "minilm-l6",
                 strong: str | None = None, weak: str | None = None):
        self.k, self.weighting, self.embedder, self.strong, self.weak = k, weighting, embedder, strong, weak

    def _fit(self, ts, emb, data):
        self.X_ = emb.astype(np.float32)
        self.y_ = ts.y.astype(np.float32)
        self.n_ = ts.n.astype(np.float32)

    def _predict(self, texts, emb, groups):
        k = min(self.k, len(self.y_))
        out = np.empty(len(texts))
        for s in range(0, len(texts), 1024):
            sim = emb[s:s + 1024] @ self.X_.T
            idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            w = self.n_[idx]
            if self.weighting == "similarity":
                w = w * np.maximum(np.take_along_axis(sim, idx, 1), 0)
            out[s:s + 1024] = (w * self.y_[idx]).sum(1) / np.maximum(w.sum(1), 1e-12)
        return out

    def _state(self):
        return {"X": self.X_, "y": self.y_, "n": self.n_}

    def _set_state(self, s, folder):
        self.X_, self.y_, self.n_ = s["X"], s["y"], s["n"]


@register
class GroupPriorRouter(Router):
    """Mean outcome of the query's group (e.g. MMLU subject), shrunk to the global mean.
    Needs ``groups`` at prediction time (unknown group -> global mean)."""

    name = "group"
    SEARCH_SPACE = {"shrinkage": [0, 5, 20, 50]}

    def __init__(self, shrinkage: float = 5.0, strong: str | None = None, weak: str | None = None):
        self.shrinkage, self.strong, self.weak = shrinkage, strong, weak

    def _fit(self, ts, emb, data):
        self.global_ = float(np.average(ts.y, weights=ts.n))
        g = {}
        for grp in np.unique(ts.groups):
            m = ts.groups == grp
            g[grp] = float(((ts.y[m] * ts.n[m]).sum() + self.shrinkage * self.global_) / (ts.n[m].sum() + self.shrinkage))
        self.table_ = g

    def _predict(self, texts, emb, groups):
        return np.array([self.table_.get(g, self.global_) for g in groups], float)

    def _state(self):
        keys = sorted(self.table_)
        return {"keys": np.array(keys, dtype=str), "vals": np.array([self.table_[k] for k in keys]),
                "global": np.array(self.global_)}

    def _set_state(self, s, folder):
        self.table_ = dict(zip(s["keys"].tolist(), s["vals"].tolist()))
        self.global_ = float(s["global"])


@register
class LogisticRouter(Router):
    """L2 logistic regression on the query embedding (optionally + one-hot group), soft labels."""

    name = "logistic"
    needs_embeddings = True
    SEARCH_SPACE = {"C": ("loguniform", 1e-3, 10.0), "use_groups": [True, False]}

    def __init__(self, C: float = 0.1, use_groups: bool = False, embedder: str = "minilm-l6",
                 strong: str | None = None, weak: str | None = None):
        self.C, self.use_groups, self.embedder, self.strong, self.weak = C, use_groups, embedder, strong, weak

    def _features(self, emb, groups):
        if not self.use_groups:
            return emb
        oh = np.zeros((len(emb), len(self.groups_)), np.float32)
        pos = {g: i for i, g in enumerate(self.groups_)}
        for i, g in enumerate(groups):
            if g in pos:
                oh[i, pos[g]] = 1.0
        return np.hstack([emb, oh])

    def _fit(self, ts, emb, data):
        from sklearn.linear_model import LogisticRegression

        self.groups_ = sorted(set(ts.groups.tolist())) if self.use_groups else []
        X = self._features(emb, ts.groups)
        XX = np.vstack([X, X])
        yy = np.concatenate([np.ones(len(X)), np.zeros(len(X))])
        ww = np.concatenate([ts.y * ts.n, (1 - ts.y) * ts.n])
        keep = ww > 0
        clf = LogisticRegression(C=self.C, max_iter=2000)
        clf.fit(XX[keep], yy[keep], sample_weight=ww[keep])
        self.coef_, self.intercept_ = clf.coef_[0].astype(np.float64), float(clf.intercept_[0])

    def _predict(self, texts, emb, groups):
        return _sigmoid(self._features(emb, groups) @ self.coef_ + self.intercept_)

    def _state(self):
        return {"coef": self.coef_, "intercept": np.array(self.intercept_), "groups": np.array(self.groups_, dtype=str)}

    def _set_state(self, s, folder):
        self.coef_, self.intercept_ = s["coef"], float(s["intercept"])
        self.groups_ = s["groups"].tolist()


@register
class BlendRouter(Router):
    """Weighted sum of member routers' standardised logits (standardised with each member's
    mean/sd on the training queries), through a sigmoid.  ``members``: list of
    {"name": ..., "params": {...}}."""

    name = "blend"
    SEARCH_SPACE = {"weights": [[0.5, 0.5], [0.7, 0.3], [0.3, 0.7]]}

    def __init__(self, members: Sequence[dict] = ({"name": "knn", "params": {"k": 50}},
                                                  {"name": "mf", "params": {}}),
                 weights: Sequence[float] | None = None, embedder: str = "minilm-l6",
                 strong: str | None = None, weak: str | None = None):
        self.members = [dict(m) for m in members]
        self.weights = list(weights) if weights is not None else None
        self.embedder, self.strong, self.weak = embedder, strong, weak

    @property
    def needs_embeddings(self):  # type: ignore[override]
        return True

    def fit(self, data, embeddings=None):
        import pandas as pd

        from rayeval.route.routers.base import data_texts, training_set

        texts, qids = data_texts(data)
        emb = self._embed(texts, embeddings)
        ts = training_set(data, self.strong, self.weak)
        self.models_ = []
        for m in self.members:
            p = dict(m.get("params", {}))
            names = _params_of(m["name"])
            if "strong" in names:
                p.setdefault("strong", ts.strong)
            if "weak" in names:
                p.setdefault("weak", ts.weak)
            self.models_.append(make_router(m["name"], **p).fit(data, emb))
        self.strong_, self.weak_ = ts.strong, ts.weak
        pos = pd.Series(np.arange(len(qids)), index=qids)
        ts_emb = emb[pos[~pos.index.duplicated()].loc[ts.query_ids].to_numpy()]
        mus, sds = [], []
        for r in self.models_:  # standardise each member's logits on the training queries
            z = _logit(r.win_probability(ts.texts, ts_emb, ts.groups))
            mus.append(float(z.mean()))
            sds.append(float(z.std()) or 1.0)
        self.mu_, self.sd_ = np.array(mus), np.array(sds)
        self.fitted_ = True
        return self

    def _predict(self, texts, emb, groups):
        w = np.asarray(self.weights if self.weights is not None else [1.0] * len(self.models_), float)
        z = sum(wi * (_logit(r.win_probability(texts, emb, groups)) - mu) / sd
                for wi, r, mu, sd in zip(w, self.models_, self.mu_, self.sd_))
        return _sigmoid(z / w.sum())

    def _state(self):
        return {"mu": self.mu_, "sd": self.sd_}

    def _save_extra(self, folder: Path):
        for i, r in enumerate(self.models_):
            r.save(folder / f"member{i}")

    def _set_state(self, s, folder):
        from rayeval.route.routers.base import Router as _R

        self.mu_, self.sd_ = s["mu"], s["sd"]
        self.models_ = [_R.load(folder / f"member{i}") for i in range(len(self.members))]


def _params_of(name: str) -> list[str]:
    from rayeval.route.routers.base import ROUTERS

    return ROUTERS[name].param_names()


def _logit(p):
    p = np.clip(np.asarray(p, float), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)
