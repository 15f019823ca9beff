"""N-way routing: predict every model's quality for a query, then pick the model maximising
predicted quality - lam * cost (or the best model within a cost budget).

These are Routers too (same params/save/load contract); as binary routers their
``win_probability`` is 0.5 + (predicted quality of strong - of weak) / 2."""

from __future__ import annotations

import numpy as np

from rayeval.prefs.outcomes import Outcomes
from rayeval.route.routers.base import Router, register


def last_block(text: str) -> str:
    """The last blank-line-separated block: RouterBench prompts share a long few-shot prefix, and
    MiniLM (256 word pieces) would embed only that prefix -- every query alike."""
    text = str(text).strip()
    return text.rsplit("\n\n", 1)[-1] if "\n\n" in text else text


class QualityRouter(Router):
    needs_embeddings = True
    last_block: bool = False

    def _embed(self, texts, embeddings):
        if embeddings is None and self.last_block:
            texts = [last_block(t) for t in texts]
        return super()._embed(texts, embeddings)

    def _check_data(self, data):
        if not isinstance(data, Outcomes):
            raise TypeError("N-way routers learn from Outcomes (per-model scores), not Preferences")

    def _fit(self, ts, emb, fit):
        data = fit.data
        self.models_ = data.models
        self.cost_ = (data.costs.mean().to_numpy(float) if data.costs is not None else np.ones(len(self.models_)))
        self._fit_quality(fit.embeddings, data.scores.to_numpy(float))

    def predict_quality(self, queries, embeddings=None) -> np.ndarray:
        """(n, n_models) predicted quality."""
        if isinstance(queries, str):
            queries = [queries]
        return self._predict_quality(self._embed(list(queries), embeddings))

    def route(self, queries, lam: float = 0.0, embeddings=None) -> list[str]:
        """Model per query: argmax predicted quality - lam * mean training cost."""
        q = self.predict_quality(queries, embeddings)
        return [self.models_[i] for i in np.argmax(q - lam * self.cost_[None], axis=1)]

    def route_budget(self, queries, budget: float, embeddings=None, lambdas=None) -> list[str]:
        """Cheapest-lambda routing whose mean expected cost on ``queries`` stays within ``budget``
        (per query, same unit as training costs).  Falls back to the cheapest model."""
        q = self.predict_quality(queries, embeddings)
        lambdas = lambdas if lambdas is not None else np.concatenate(
            [[0.0], np.geomspace(1e-3, 1e3, 120) / max(np.ptp(self.cost_), 1e-12)])
        for lam in sorted(lambdas):
            ch = np.argmax(q - lam * self.cost_[None], axis=1)
            if self.cost_[ch].mean() <= budget:
                return [self.models_[i] for i in ch]
        return [self.models_[int(np.argmin(self.cost_))]] * len(q)

    def _predict(self, texts, emb, groups):
        q = self._predict_quality(emb)
        i, j = self.models_.index(self.strong_), self.models_.index(self.weak_)
        rng = max(float(np.nanmax(q) - np.nanmin(q)), 1e-12)
        return 0.5 + (q[:, i] - q[:, j]) / (2 * rng)

    def _fit_quality(self, emb, S):
        raise NotImplementedError

    def _predict_quality(self, emb):
        raise NotImplementedError


@register
class KNNQualityRouter(QualityRouter):
    """Each model's quality = mean score on the k nearest training queries."""

    name = "knn_quality"
    SEARCH_SPACE = {"k": [10, 20, 50, 100], "last_block": [True, False]}

    def __init__(self, k: int = 50, last_block: bool = True, embedder: str = "minilm-l6",
                 strong: str | None = None, weak: str | None = None):
        self.k, self.last_block, self.embedder, self.strong, self.weak = k, last_block, embedder, strong, weak

    def _fit_quality(self, emb, S):
        self.X_, self.S_ = emb.astype(np.float32), np.nan_to_num(S).astype(np.float32)

    def _predict_quality(self, emb):
        k = min(self.k, len(self.X_))
        out = np.empty((len(emb), self.S_.shape[1]))
        for c in range(0, len(emb), 1024):
            sim = emb[c:c + 1024] @ self.X_.T
            idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            out[c:c + 1024] = self.S_[idx].mean(1)
        return out

    def _state(self):
        return {"X": self.X_, "S": self.S_, "cost": self.cost_, "models": np.array(self.models_, dtype=str)}

    def _set_state(self, s, folder):
        self.X_, self.S_, self.cost_, self.models_ = s["X"], s["S"], s["cost"], s["models"].tolist()


@register
class LinearQualityRouter(QualityRouter):
    """Ridge regression of each model's score on the query embedding."""

    name = "linear_quality"
    SEARCH_SPACE = {"alpha": ("loguniform", 1e-2, 1e3), "last_block": [True, False]}

    def __init__(self, alpha: float = 10.0, last_block: bool = True, embedder: str = "minilm-l6",
                 strong: str | None = None, weak: str | None = None):
        self.alpha, self.last_block, self.embedder, self.strong, self.weak = alpha, last_block, embedder, strong, weak

    def _fit_quality(self, emb, S):
        X = np.hstack([emb, np.ones((len(emb), 1))]).astype(np.float64)
        reg = self.alpha * np.eye(X.shape[1])
        reg[-1, -1] = 0.0
        self.B_ = np.linalg.solve(X.T @ X + reg, X.T @ np.nan_to_num(S))

    def _predict_quality(self, emb):
        return np.hstack([emb, np.ones((len(emb), 1))]) @ self.B_

    def _state(self):
        return {"B": self.B_, "cost": self.cost_, "models": np.array(self.models_, dtype=str)}

    def _set_state(self, s, folder):
        self.B_, self.cost_, self.models_ = s["B"], s["cost"], s["models"].tolist()
