"""Baselines and light learned routers: random, prompt length, kNN on embeddings, per-group
prior, logistic regression on embeddings (+ group), and a blend of other routers."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.special import expit, logit

from rayeval.route.routers.base import Router, make_router, register


_sigmoid = expit


@register
class RandomRouter(Router):
    """Uniform random P(strong wins), a deterministic function of (seed, query text)."""

    name = "random"
    SEARCH_SPACE = {"seed": [0, 1, 2, 3, 4]}

    def __init__(self, seed: int = 0, strong: str | None = None, weak: str | None = None):
        self.seed, self.strong, self.weak = seed, strong, weak

    def _fit(self, ts, emb, fit):
        pass

    def _predict(self, texts, emb, groups):
        out = np.empty(len(texts))
        for i, t in enumerate(texts):
            h = hashlib.blake2b(f"{self.seed}\x00{i if t == '' else t}".encode("utf-8", "surrogatepass"), digest_size=8)
            out[i] = int.from_bytes(h.digest(), "little") / 2**64
        return out


@register
class LengthRouter(Router):
    """Longer prompt -> strong model.  P = len / (len + scale): a fixed monotone map (no fitted
    state), so scores from different cross-fitting folds stay comparable."""

    name = "length"

    def __init__(self, unit: str = "chars", scale: float = 500.0, strong: str | None = None,
                 weak: str | None = None):
        self.unit, self.scale, self.strong, self.weak = unit, scale, strong, weak

    def _len(self, texts):
        if self.unit == "words":
            return np.array([len(t.split()) for t in texts], float)
        return np.array([len(t) for t in texts], float)

    def _fit(self, ts, emb, fit):
        pass

    def _predict(self, texts, emb, groups):
        L = self._len(texts)
        return L / (L + self.scale)


@register
class KNNRouter(Router):
    """Mean training outcome of the k most cosine-similar training queries."""

    name = "knn"
    needs_embeddings = True
    SEARCH_SPACE = {"k": [10, 20, 50, 100, 200], "weighting": ["uniform", "similarity"],
                    "within_group": [False, True], "shrinkage": [0.0, 5.0, 20.0]}

    def __init__(self, k: int = 50, weighting: str = "uniform", within_group: bool = False, shrinkage: float = 0.0,
                 embedder: str = "minilm-l6", strong: str | None = None, weak: str | None = None):
        self.k, self.weighting, self.embedder, self.strong, self.weak = k, weighting, embedder, strong, weak
        self.within_group, self.shrinkage = within_group, shrinkage

    def _fit(self, ts, emb, data):
        self.X_ = emb.astype(np.float32)
        self.y_ = ts.y.astype(np.float32)
        self.n_ = ts.n.astype(np.float32)
        self.g_ = np.asarray(ts.groups, dtype=str)

    def _knn(self, emb, X, y, n, prior):
        k = min(self.k, len(y))
        out = np.empty(len(emb))
        for s in range(0, len(emb), 1024):
            sim = emb[s:s + 1024] @ X.T
            idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            w = n[idx]
            if self.weighting == "similarity":
                w = w * np.maximum(np.take_along_axis(sim, idx, 1), 0)
            out[s:s + 1024] = ((w * y[idx]).sum(1) + self.shrinkage * prior) / np.maximum(w.sum(1) + self.shrinkage, 1e-12)
        return out

    def _predict(self, texts, emb, groups):
        glob = float(np.average(self.y_, weights=self.n_))
        if not self.within_group:
            return self._knn(emb, self.X_, self.y_, self.n_, glob)
        out = np.empty(len(texts))
        for g in np.unique(groups):
            q = groups == g
            pool = self.g_ == g
            if not pool.any():  # unknown group: all training queries
                out[q] = self._knn(emb[q], self.X_, self.y_, self.n_, glob)
            else:
                prior = float(np.average(self.y_[pool], weights=self.n_[pool]))
                out[q] = self._knn(emb[q], self.X_[pool], self.y_[pool], self.n_[pool], prior)
        return out

    def _state(self):
        return {"X": self.X_, "y": self.y_, "n": self.n_, "g": self.g_}

    def _set_state(self, s, folder):
        self.X_, self.y_, self.n_, self.g_ = s["X"], s["y"], s["n"], s["g"]


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


def _soft_logistic(X, y, n, C, max_iter: int = 2000):
    """L2 logistic regression with soft targets y in [0, 1] (each row split into a weighted
    positive and negative copy).  Returns (coef, intercept)."""
    from sklearn.linear_model import LogisticRegression

    XX = np.vstack([X, X])
    yy = np.concatenate([np.ones(len(X)), np.zeros(len(X))])
    ww = np.concatenate([y * n, (1 - y) * n])
    keep = ww > 0
    clf = LogisticRegression(C=C, max_iter=max_iter)
    clf.fit(XX[keep], yy[keep], sample_weight=ww[keep])
    return clf.coef_[0].astype(np.float64), float(clf.intercept_[0])


@register
class LogisticRouter(Router):
    """L2 logistic regression on the query embedding (+ one-hot group, + log length).

    ``target="win"``: one model of P(strong wins) (soft labels 1/.5/0).  ``target="pair"``
    (Outcomes only): one model per routed model predicting its (min-max scaled) score, and
    P = (1 + q_strong - q_weak) / 2 -- twice the labels, since each model's correctness varies
    on many more questions than the win/loss does."""

    name = "logistic"
    needs_embeddings = True
    SEARCH_SPACE = {"C": ("loguniform", 1e-3, 10.0), "use_groups": [True, False], "use_length": [True, False],
                    "target": ["win", "pair"]}

    def __init__(self, C: float = 0.1, use_groups: bool = False, use_length: bool = False, target: str = "win",
                 embedder: str = "minilm-l6", strong: str | None = None, weak: str | None = None):
        self.C, self.use_groups, self.use_length, self.target = C, use_groups, use_length, target
        self.embedder, self.strong, self.weak = embedder, strong, weak

    def _features(self, texts, emb, groups):
        return self.side_(texts, emb, groups)

    def _fit(self, ts, emb, fit):
        from rayeval.prefs.outcomes import Outcomes
        from rayeval.route.routers.base import SideFeatures

        data = fit.data
        self.side_ = SideFeatures(self.use_groups, self.use_length).fit(ts.texts, ts.groups)
        X = self._features(ts.texts, emb, ts.groups)
        if self.target == "pair":
            if not isinstance(data, Outcomes):
                raise ValueError("target='pair' needs Outcomes (per-model scores), not Preferences")
            S = data.scores[[ts.strong, ts.weak]].to_numpy(float)[fit.rows(ts.query_ids)]
            lo, hi = np.nanmin(S), np.nanmax(S)
            S = (S - lo) / max(hi - lo, 1e-12)
            self.coef_ = np.zeros((2, X.shape[1]))
            self.intercept_ = np.zeros(2)
            for j in range(2):
                self.coef_[j], self.intercept_[j] = _soft_logistic(X, S[:, j], ts.n, self.C)
        elif self.target == "win":
            c, b = _soft_logistic(X, ts.y, ts.n, self.C)
            self.coef_, self.intercept_ = c[None], np.array([b])
        else:
            raise ValueError(f"target must be 'win' or 'pair', got {self.target!r}")

    def _predict(self, texts, emb, groups):
        p = _sigmoid(self._features(texts, emb, groups) @ self.coef_.T + self.intercept_)
        return p[:, 0] if self.target == "win" else (1 + p[:, 0] - p[:, 1]) / 2

    def _state(self):
        return {"coef": self.coef_, "intercept": self.intercept_, **self.side_.state()}

    def _set_state(self, s, folder):
        from rayeval.route.routers.base import SideFeatures

        self.coef_, self.intercept_ = s["coef"], s["intercept"]
        self.side_ = SideFeatures(self.use_groups, self.use_length).set_state(s)


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
        self.members, self.weights = members, weights  # as given (sklearn: __init__ only stores)
        self.embedder, self.strong, self.weak = embedder, strong, weak

    @property
    def needs_embeddings(self):  # type: ignore[override]
        return True

    def _fit(self, ts, emb, fit):
        # every member on the same data, embeddings and strong/weak pair
        self.models_ = [make_router(m["name"], **{"strong": ts.strong, "weak": ts.weak, **m.get("params", {})})
                        .fit(fit.data, fit.embeddings) for m in self.members]
        mus, sds = [], []
        for r in self.models_:  # standardise each member's logits on the training queries
            z = _logit(r.win_probability(ts.texts, emb, ts.groups))
            mus.append(float(z.mean()))
            sds.append(float(z.std()) or 1.0)
        self.mu_, self.sd_ = np.array(mus), np.array(sds)

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


def _logit(p):
    return logit(np.clip(np.asarray(p, float), 1e-6, 1 - 1e-6))
