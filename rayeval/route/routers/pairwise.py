"""Routers learned from pairwise battles (RouteLLM): similarity-weighted Bradley-Terry ranking
and matrix factorisation.  Both use every model in the battles, and answer P(strong beats weak)."""

from __future__ import annotations

import numpy as np
from scipy.special import expit
import pandas as pd

from rayeval.prefs.outcomes import Outcomes, Preferences
from rayeval.route.routers.base import Router, SideFeatures, register


def battles(data: Outcomes | Preferences, tie_eps: float = 0.0):
    """(unique query_ids, per-battle query index, model_a idx, model_b idx, outcome for a, models)."""
    prefs = data.to_preferences(tie_eps) if isinstance(data, Outcomes) else data
    d = prefs.df
    uq = prefs.unique_queries()["query_id"].astype(str).to_numpy()
    qpos = pd.Series(np.arange(len(uq)), index=uq)
    models = prefs.models
    mpos = {m: i for i, m in enumerate(models)}
    qi = qpos.loc[d["query_id"].astype(str)].to_numpy()
    a = d["model_a"].map(mpos).to_numpy()
    b = d["model_b"].map(mpos).to_numpy()
    y = np.where(d["winner"] == "a", 1.0, np.where(d["winner"] == "b", 0.0, 0.5))
    return uq, qi, a, b, y, models


@register
class SWRankingRouter(Router):
    """Similarity-weighted Bradley-Terry (RouteLLM's sw_ranking).  For a query q, every training
    battle gets weight gamma^(1 + S), S = cos(q, q_i) / max_j cos(q, q_j); a BT model is fitted
    on the weighted battles (ties count half a win each way) and P(strong beats weak) returned.
    The BT fit is exact (closed form) for two models and MM iterations otherwise.
    ``group_weight`` / ``length_weight`` > 0 (beyond RouteLLM) measure similarity on [embedding,
    group_weight x group one-hot, length_weight x standardised log length], renormalised: queries
    of the same subject/category, or of similar length, count as closer."""

    name = "sw_ranking"
    needs_embeddings = True
    SEARCH_SPACE = {"gamma": [2.0, 10.0, 100.0, 1000.0, 1e4], "group_weight": [0.0, 0.5, 1.0],
                    "length_weight": [0.0, 0.25, 0.5]}

    def __init__(self, gamma: float = 10.0, mm_iters: int = 100, group_weight: float = 0.0, length_weight: float = 0.0,
                 embedder: str = "minilm-l6", strong: str | None = None, weak: str | None = None):
        self.gamma, self.mm_iters, self.embedder, self.strong, self.weak = gamma, mm_iters, embedder, strong, weak
        self.group_weight, self.length_weight = group_weight, length_weight

    def _side(self):
        return SideFeatures(use_groups=bool(self.group_weight), use_length=bool(self.length_weight))

    def _space(self, texts, emb, groups) -> np.ndarray:
        """The vectors similarity is measured on (unit rows)."""
        if not (self.group_weight or self.length_weight):
            return np.asarray(emb, np.float32)
        F = self.side_(texts, emb, groups).astype(np.float32)
        d, ng = emb.shape[1], len(self.side_.groups_)
        F[:, d:d + ng] *= self.group_weight
        F[:, d + ng:] *= self.length_weight
        return F / np.maximum(np.linalg.norm(F, axis=1, keepdims=True), 1e-9)

    def _fit(self, ts, emb, fit):
        uq, qi, a, b, y, models = battles(fit.data)
        self.side_ = self._side().fit(fit.texts, fit.groups)
        pos = fit.rows(uq)
        self.X_ = self._space([fit.texts[i] for i in pos], fit.embeddings[pos], fit.groups[pos])
        self.models_ = models
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        y_lo = np.where(a < b, y, 1 - y)  # outcome for the lower-index model
        pairs = sorted(set(zip(lo.tolist(), hi.tolist())))
        ppos = {p: k for k, p in enumerate(pairs)}
        self.pairs_ = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        self.qi_, self.pi_ = qi.astype(np.int64), np.array([ppos[p] for p in zip(lo.tolist(), hi.tolist())], np.int64)
        self.ylo_ = y_lo.astype(np.float32)

    def _predict(self, texts, emb, groups):
        s, w = self.models_.index(self.strong_), self.models_.index(self.weak_)
        m, P = len(self.models_), len(self.pairs_)
        out = np.empty(len(texts))
        emb = self._space(texts, emb, groups)
        for c in range(0, len(texts), 256):
            sim = emb[c:c + 256] @ self.X_.T  # (Q, U)
            mx = np.maximum(sim.max(1, keepdims=True), 1e-6)
            wq = self.gamma ** (1.0 + sim / mx)  # (Q, U)
            wb = wq[:, self.qi_]  # (Q, B)
            N = np.zeros((len(wb), P))
            A = np.zeros((len(wb), P))
            for k in range(P):  # few pairs; aggregate battles per pair
                mk = self.pi_ == k
                N[:, k] = wb[:, mk].sum(1)
                A[:, k] = wb[:, mk] @ self.ylo_[mk]
            out[c:c + 256] = self._bt(A, N, s, w, m)
        return out

    def _bt(self, A, N, s, w, m):
        if m == 2:
            p_lo = (A[:, 0] + 0.5) / (N[:, 0] + 1.0)  # tiny prior: one half-weight tie
            return p_lo if s < w else 1 - p_lo
        Q = len(A)
        wins = np.full((Q, m), 0.5)  # prior
        Nm = np.zeros((Q, m, m))
        for k, (i, j) in enumerate(self.pairs_):
            wins[:, i] += A[:, k]
            wins[:, j] += N[:, k] - A[:, k]
            Nm[:, i, j] += N[:, k]
            Nm[:, j, i] += N[:, k]
        Nm += 1.0 / m * (1 - np.eye(m))  # connect every pair weakly
        pi = np.ones((Q, m))
        for _ in range(self.mm_iters):
            denom = (Nm / (pi[:, :, None] + pi[:, None, :])).sum(2)
            pi = wins / denom
            pi /= pi.sum(1, keepdims=True)
        return pi[:, s] / (pi[:, s] + pi[:, w])

    def _state(self):
        return {"X": self.X_, "qi": self.qi_, "pi": self.pi_, "ylo": self.ylo_, "pairs": self.pairs_,
                "models": np.array(self.models_, dtype=str), **self.side_.state()}

    def _set_state(self, st, folder):
        self.X_, self.qi_, self.pi_, self.ylo_, self.pairs_ = st["X"], st["qi"], st["pi"], st["ylo"], st["pairs"]
        self.models_ = st["models"].tolist()
        self.side_ = self._side().set_state(st)


@register
class MFRouter(Router):
    """RouteLLM's matrix factorisation: s(m, q) = w2^T (v_m (.) (W1 q + b)), v_m L2-normalised.

    ``objective="pairwise"`` (RouteLLM): P(a beats b | q) = sigmoid(s(a, q) - s(b, q)), BCE on
    battles (ties as 0.5 targets, or dropped with ``tie_mode="drop"``); works from Preferences.
    ``objective="pointwise"`` (Outcomes only): sigmoid(s(m, q) + c_m) predicts model m's min-max
    scaled score on q, and P(strong wins) = (1 + p_strong - p_weak) / 2.
    ``use_groups`` / ``use_length`` (beyond RouteLLM) append the query's group one-hot and log
    length to q (:class:`SideFeatures`)."""

    name = "mf"
    needs_embeddings = True
    SEARCH_SPACE = {"dim": [16, 64, 128], "lr": ("loguniform", 1e-4, 1e-2),
                    "weight_decay": ("loguniform", 1e-6, 1e-1), "epochs": [5, 10, 30],
                    "objective": ["pairwise", "pointwise"], "use_groups": [False, True]}

    def __init__(self, dim: int = 64, lr: float = 3e-3, weight_decay: float = 1e-4, epochs: int = 30,
                 batch_size: int = 256, tie_mode: str = "half", objective: str = "pairwise", seed: int = 0,
                 use_groups: bool = False, use_length: bool = False,
                 embedder: str = "minilm-l6", strong: str | None = None, weak: str | None = None):
        self.dim, self.lr, self.weight_decay, self.epochs = dim, lr, weight_decay, epochs
        self.batch_size, self.tie_mode, self.objective, self.seed = batch_size, tie_mode, objective, seed
        self.use_groups, self.use_length = use_groups, use_length
        self.embedder, self.strong, self.weak = embedder, strong, weak

    def _examples(self, fit, emb_all):
        """(X per unique query, query idx, model idx a, model idx b or -1, target) arrays."""
        data = fit.data
        if self.objective == "pointwise":
            if not isinstance(data, Outcomes):
                raise ValueError("objective='pointwise' needs Outcomes (per-model scores)")
            S = data.scores.to_numpy(float)
            lo, hi = np.nanmin(S), np.nanmax(S)
            S = (S - lo) / max(hi - lo, 1e-12)
            qi, mi = np.nonzero(~np.isnan(S))
            return emb_all, qi, mi, np.full(len(qi), -1), S[qi, mi], data.models
        uq, qi, a, b, y, models = battles(data)
        if self.tie_mode == "drop":
            keep = y != 0.5
            qi, a, b, y = qi[keep], a[keep], b[keep], y[keep]
        return emb_all[fit.rows(uq)], qi, a, b, y, models

    def _fit(self, ts, emb, fit):
        import torch

        texts, groups = fit.texts, fit.groups
        self.side_ = SideFeatures(self.use_groups, self.use_length).fit(texts, groups)
        Xn, qi, a, b, y, models = self._examples(fit, self.side_(texts, fit.embeddings, groups))
        self.models_ = models
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        X = torch.tensor(np.asarray(Xn), dtype=torch.float32)
        m = len(models)
        W1 = torch.nn.Linear(X.shape[1], self.dim)
        V = torch.nn.Parameter(torch.randn(m, self.dim, generator=g) * 0.1)
        w2 = torch.nn.Linear(self.dim, 1, bias=False)
        cb = torch.nn.Parameter(torch.zeros(m))
        params = [*W1.parameters(), V, *w2.parameters(), cb]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        tq, ta, tb = (torch.tensor(v, dtype=torch.long) for v in (qi, a, b))
        ty = torch.tensor(y, dtype=torch.float32)
        n = len(ty)
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=g)
            for s in range(0, n, self.batch_size):
                idx = perm[s:s + self.batch_size]
                h = W1(X[tq[idx]])
                Vn = torch.nn.functional.normalize(V, dim=1)
                logit = w2(h * Vn[ta[idx]]).squeeze(-1)
                if self.objective == "pointwise":
                    logit = logit + cb[ta[idx]]
                else:
                    logit = logit - w2(h * Vn[tb[idx]]).squeeze(-1)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, ty[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            Vn = torch.nn.functional.normalize(V, dim=1)
            self.W_ = W1.weight.detach().numpy().astype(np.float64)
            self.b_ = W1.bias.detach().numpy().astype(np.float64)
            self.V_ = Vn.numpy().astype(np.float64)
            self.w2_ = w2.weight.detach().numpy()[0].astype(np.float64)
            self.c_ = cb.detach().numpy().astype(np.float64)

    def scores(self, emb: np.ndarray) -> np.ndarray:
        """s(m, q) for every model: (n, n_models)."""
        h = emb @ self.W_.T + self.b_
        return (h[:, None, :] * self.V_[None]) @ self.w2_

    def _predict(self, texts, emb, groups):
        s = self.scores(np.asarray(self.side_(texts, emb, groups), np.float64))
        i, j = self.models_.index(self.strong_), self.models_.index(self.weak_)
        if self.objective == "pointwise":
            p = expit(s + self.c_)
            return (1 + p[:, i] - p[:, j]) / 2
        return expit(s[:, i] - s[:, j])

    def _state(self):
        return {"W": self.W_, "b": self.b_, "V": self.V_, "w2": self.w2_, "c": self.c_,
                "models": np.array(self.models_, dtype=str), **self.side_.state()}

    def _set_state(self, st, folder):
        self.W_, self.b_, self.V_, self.w2_, self.c_ = st["W"], st["b"], st["V"], st["w2"], st["c"]
        self.models_ = st["models"].tolist()
        self.side_ = SideFeatures(self.use_groups, self.use_length).set_state(st)
