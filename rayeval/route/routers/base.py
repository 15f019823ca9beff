"""The router contract: a small class mapping queries to P(strong model wins).

scikit-learn's estimator contract (``sklearn.base.BaseEstimator``: ``get_params``/``set_params``
from the constructor's signature): hyperparameters are constructor arguments (and nothing else
is), ``fit`` learns state (trailing ``_``), ``win_probability`` predicts, ``save``/``load``
round-trip through a folder (``router.json`` + ``state.npz`` + optional extra files).

``fit`` is one template for every router: it fixes the strong/weak pair (the ``strong``/``weak``
constructor arguments every router takes, else the best/worst model of the data), builds the
per-query training set, embeds the data's texts once when the router needs embeddings, sets
the thread policy, and calls the router's ``_fit(ts, emb, fit)``; no router overrides ``fit``.

``SEARCH_SPACE`` declares Tune ranges over constructor arguments with plain values:
``[a, b, c]`` = choice, ``("loguniform", lo, hi)``, ``("uniform", lo, hi)``, ``("randint", lo, hi)``.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from rayeval.prefs.outcomes import Outcomes, Preferences

ROUTERS: dict[str, type["Router"]] = {}


def register(cls: type["Router"]) -> type["Router"]:
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a class attribute 'name'")
    ROUTERS[cls.name] = cls
    return cls


@dataclass
class TrainSet:
    """Per-query binary training target: y = mean strong-vs-weak outcome (1 win, .5 tie, 0 loss)."""

    texts: list[str]
    y: np.ndarray  # float in [0, 1]
    n: np.ndarray  # number of battles behind y (weights)
    groups: np.ndarray  # str
    query_ids: np.ndarray
    strong: str
    weak: str


def resolve_pair(data: Outcomes | Preferences, strong: str | None, weak: str | None) -> tuple[str, str]:
    if strong and weak:
        return strong, weak
    if isinstance(data, Outcomes):
        s, w = data.strong_weak()
    else:  # preferences: rank by overall win rate
        d = data.df
        wins = pd.concat([d.loc[d.winner == "a", "model_a"], d.loc[d.winner == "b", "model_b"]]).value_counts()
        games = pd.concat([d["model_a"], d["model_b"]]).value_counts()
        rate = (wins.reindex(games.index).fillna(0) / games).sort_values()
        s, w = str(rate.index[-1]), str(rate.index[0])
    return strong or s, weak or w


def training_set(data: Outcomes | Preferences, strong: str | None = None, weak: str | None = None) -> TrainSet:
    strong, weak = resolve_pair(data, strong, weak)
    if isinstance(data, Outcomes):
        s, w = data.pair_arrays(strong, weak)
        ok = ~(np.isnan(s) | np.isnan(w))
        y = np.where(s > w, 1.0, np.where(s < w, 0.0, 0.5))[ok]
        q = data.queries[ok]
        return TrainSet(q["query"].astype(str).tolist(), y, np.ones(len(y)), q["group"].astype(str).to_numpy(),
                        q["query_id"].astype(str).to_numpy(), strong, weak)
    lab = data.strong_labels(strong, weak)
    return TrainSet(lab["query"].astype(str).tolist(), lab["y"].to_numpy(float), lab["n"].to_numpy(float),
                    lab["group"].astype(str).to_numpy(), lab["query_id"].astype(str).to_numpy(), strong, weak)


@dataclass
class FitInput:
    """What ``Router.fit`` hands to ``_fit`` besides the per-query training set: the data itself,
    its texts, query ids and groups (``data_texts`` order) and, for routers that need them, the
    embeddings of those texts (computed once).  Routers that learn from battles or per-model
    scores (pairwise, N-way) read these; per-query routers need only ``ts`` and ``emb``."""

    data: Outcomes | Preferences
    texts: list[str]
    query_ids: np.ndarray
    groups: np.ndarray
    embeddings: np.ndarray | None

    def rows(self, query_ids: Sequence[str]) -> np.ndarray:
        """Positions in ``texts`` of ``query_ids`` (first occurrence)."""
        pos = pd.Series(np.arange(len(self.query_ids)), index=self.query_ids)
        return pos[~pos.index.duplicated()].loc[list(query_ids)].to_numpy()


def data_texts(data: Outcomes | Preferences) -> tuple[list[str], np.ndarray]:
    """The texts (and query_ids) that ``fit``'s ``embeddings`` argument must align with:
    Outcomes rows, or Preferences' unique queries in first-seen order."""
    q = data.queries if isinstance(data, Outcomes) else data.unique_queries()
    return q["query"].astype(str).tolist(), q["query_id"].astype(str).to_numpy()


def data_groups(data: Outcomes | Preferences) -> np.ndarray:
    """The groups (subject/task) aligned with :func:`data_texts`."""
    q = data.queries if isinstance(data, Outcomes) else data.unique_queries()
    return q["group"].astype(str).to_numpy()


class SideFeatures:
    """Query features beside the embedding, shared by the learned routers: a one-hot of the query's
    group (MMLU subject, MT-Bench category; unknown groups -> all zeros) and its standardised log
    character length.  ``fit`` learns the group list and length scale on the training queries."""

    def __init__(self, use_groups: bool = False, use_length: bool = False):
        self.use_groups, self.use_length = use_groups, use_length
        self.groups_: list[str] = []
        self.len_mu_, self.len_sd_ = 0.0, 1.0

    def fit(self, texts: Sequence[str], groups: Sequence[str]) -> "SideFeatures":
        self.groups_ = sorted(set(np.asarray(groups, dtype=object).astype(str).tolist())) if self.use_groups else []
        L = np.log1p(np.array([len(t) for t in texts], float))
        self.len_mu_, self.len_sd_ = float(L.mean()), float(L.std() or 1.0)
        return self

    @property
    def dim(self) -> int:
        """Number of side columns ``__call__`` appends."""
        return len(self.groups_) * self.use_groups + int(self.use_length)

    def __call__(self, texts: Sequence[str], emb: np.ndarray, groups: Sequence[str]) -> np.ndarray:
        parts = [np.asarray(emb)]
        if self.use_groups:
            oh = np.zeros((len(emb), len(self.groups_)), np.float32)
            pos = {g: i for i, g in enumerate(self.groups_)}
            for i, g in enumerate(np.asarray(groups, dtype=object).astype(str)):
                if g in pos:
                    oh[i, pos[g]] = 1.0
            parts.append(oh)
        if self.use_length:
            L = np.log1p(np.array([len(t) for t in texts], float))[:, None]
            parts.append((L - self.len_mu_) / self.len_sd_)
        return np.hstack(parts) if len(parts) > 1 else parts[0]

    def state(self) -> dict[str, np.ndarray]:
        return {"groups": np.array(self.groups_, dtype=str), "len": np.array([self.len_mu_, self.len_sd_])}

    def set_state(self, s: dict[str, np.ndarray]) -> "SideFeatures":
        """Restore what ``fit`` learned; a state saved before side features existed has none."""
        if "len" in s:
            self.groups_ = s["groups"].tolist()
            self.len_mu_, self.len_sd_ = (float(v) for v in s["len"])
        return self


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


class torch_threads:
    """Context: run torch with ``n`` threads (default ``$RAYEVAL_TORCH_THREADS`` or 1) and restore
    the caller's setting.  Small models on a shared, busy CPU run many times faster single-
    threaded (measured: MiniLM training steps 6x faster at load 40 on 2 cores)."""

    def __init__(self, n: int | None = None):
        import os

        self.n = n or int(os.environ.get("RAYEVAL_TORCH_THREADS", "1") or 1)

    def __enter__(self):
        import torch

        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.old)


class Router(BaseEstimator):
    """Base class.  Subclasses set ``name``, define ``__init__`` with keyword hyperparameters
    (stored as same-named attributes; ``strong``/``weak`` among them), and implement ``_fit`` and
    ``_predict``."""

    name: ClassVar[str] = ""
    needs_embeddings: ClassVar[bool] = False
    SEARCH_SPACE: ClassVar[dict[str, Any]] = {}

    strong: str | None = None
    weak: str | None = None
    embedder: str = "minilm-l6"

    # -- sklearn-style params --------------------------------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        """The constructor's parameters, in signature order (sklearn's ``_get_param_names`` sorts)."""
        sig = inspect.signature(cls.__init__)
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [n for n, p in sig.parameters.items() if n != "self" and p.kind in kinds]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """sklearn's ``get_params`` (routers hold no nested estimators), in signature order."""
        params = super().get_params(deep=False)
        return {p: params[p] for p in self.param_names()}

    def clone(self) -> "Router":
        """An unfitted copy with the same hyperparameters."""
        return type(self)(**self.get_params())

    @classmethod
    def search_space(cls) -> dict[str, Any]:
        return dict(cls.SEARCH_SPACE)

    # -- embeddings ------------------------------------------------------------------------------
    def _embed(self, texts: Sequence[str], embeddings: np.ndarray | None) -> np.ndarray:
        if embeddings is not None:
            embeddings = np.asarray(embeddings, np.float32)
            if len(embeddings) != len(texts):
                raise ValueError(f"{len(embeddings)} embeddings for {len(texts)} texts")
            return embeddings
        from rayeval.route.embed import embed

        return embed(list(texts), self.embedder, use_cache=len(texts) >= 64)

    # -- public API ------------------------------------------------------------------------------
    def fit(self, data: Outcomes | Preferences, embeddings: np.ndarray | None = None) -> "Router":
        """Learn from Outcomes or Preferences.  ``embeddings`` (optional, else computed) align
        with ``data_texts(data)``.  The strong/weak pair is ``self.strong``/``self.weak`` when
        set, else the best/worst model of ``data``."""
        self._check_data(data)
        ts = training_set(data, self.strong, self.weak)
        self.strong_, self.weak_ = ts.strong, ts.weak
        texts, qids = data_texts(data)
        fit = FitInput(data, texts, qids, data_groups(data),
                       self._embed(texts, embeddings) if self.needs_embeddings else None)
        emb = None if fit.embeddings is None else fit.embeddings[fit.rows(ts.query_ids)]
        with torch_threads():
            self._fit(ts, emb, fit)
        self.fitted_ = True
        return self

    def win_probability(self, queries: str | Sequence[str], embeddings: np.ndarray | None = None,
                        groups: Sequence[str] | None = None) -> np.ndarray:
        """P(strong wins) for each query, shape (n,).  ``groups`` (subject/task) is used only by
        routers that learned group effects; unknown or missing groups fall back to the global prior."""
        if not getattr(self, "fitted_", False):
            raise RuntimeError(f"{self.name} router is not fitted")
        if isinstance(queries, str):
            queries = [queries]
        queries = [str(q) for q in queries]
        emb = self._embed(queries, embeddings) if self.needs_embeddings else None
        g = np.asarray(groups if groups is not None else [""] * len(queries), dtype=object).astype(str)
        with torch_threads():
            p = np.asarray(self._predict(queries, emb, g), float)
        return p

    def __call__(self, query: str) -> float:
        return float(self.win_probability([query])[0])

    # -- subclass hooks --------------------------------------------------------------------------
    def _check_data(self, data: Outcomes | Preferences) -> None:
        """Refuse data this router cannot learn from (before any work)."""

    def _fit(self, ts: TrainSet, emb: np.ndarray | None, fit: FitInput) -> None:
        """Learn from ``ts`` (one row per query: y = P(strong wins), n battles behind it) and
        ``emb`` (its rows' embeddings, or None); ``fit`` has the data and all its texts."""
        raise NotImplementedError

    def _predict(self, texts: list[str], emb: np.ndarray | None, groups: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _state(self) -> dict[str, np.ndarray]:
        """Learned arrays to save (np.savez)."""
        return {}

    def _set_state(self, state: dict[str, np.ndarray], folder: Path) -> None:
        pass

    def _save_extra(self, folder: Path) -> None:
        """Extra files (e.g. torch weights)."""

    # -- persistence -----------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        if not getattr(self, "fitted_", False):
            raise RuntimeError("save a fitted router")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"router": self.name, "params": self.get_params(), "strong": self.strong_, "weak": self.weak_}
        (folder / "router.json").write_text(json.dumps(meta, indent=2, default=_json_default))
        np.savez(folder / "state.npz", **self._state())
        self._save_extra(folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Router":
        folder = Path(folder)
        meta = json.loads((folder / "router.json").read_text())
        kind = ROUTERS.get(meta["router"])
        if kind is None:
            raise ValueError(f"{folder}: unknown router {meta['router']!r}; known: {sorted(ROUTERS)}")
        if cls is not Router and not issubclass(kind, cls):
            raise TypeError(f"{folder} holds a {kind.__name__}, not a {cls.__name__}")
        r = kind(**meta["params"])
        r.strong_, r.weak_ = meta["strong"], meta["weak"]
        with np.load(folder / "state.npz", allow_pickle=False) as z:
            state = {k: z[k] for k in z.files}
        r._set_state(state, folder)
        r.fitted_ = True
        return r


def make_router(name: str, **params) -> Router:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; known: {sorted(ROUTERS)}")
    return ROUTERS[name](**params)


def load_router(folder: str | Path) -> Router:
    return Router.load(folder)
