"""Text classifiers as routers (RouteLLM's BERT and causal-LLM classifiers, CPU-sized).

* ``bert``: a small local encoder (MiniLM-L6 by default) + a linear head on L2-normalised
  mean-pooled tokens, trained LP-FT: a logistic probe on the frozen encoder (C by inner CV),
  then soft-BCE fine-tuning on P(strong wins).  ``max_train`` caps the fine-tuning examples so
  a fit stays within minutes on CPU.
* ``causal_llm``: SmolLM2-135M-Instruct, truncated to its first ``num_layers`` blocks.  With
  ``train_layers=0`` (default) the backbone is frozen: pooled hidden states are computed once
  per text (cached on disk) and a logistic head is trained on them, so cross-fitting is cheap.
  With ``train_layers>0`` the top blocks are fine-tuned end to end (slow: small data only).

Both heads can also see the query's group one-hot and log length (``use_groups``/``use_length``,
:class:`~rayeval.route.routers.base.SideFeatures`), as the logistic and MF routers can.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.special import expit

from rayeval.config import cache_dir
from rayeval.route.routers.base import Router, SideFeatures, register


def _torch():
    import torch

    return torch


def _soft_targets(ts, max_train: int | None, seed: int):
    idx = np.arange(len(ts.texts))
    if max_train and len(idx) > max_train:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_train, replace=False))
    return ([ts.texts[i] for i in idx], ts.y[idx].astype(np.float32), ts.n[idx].astype(np.float32),
            np.asarray(ts.groups)[idx])


def _side(side: SideFeatures, texts, groups) -> np.ndarray:
    """Side features alone, (n, k) float32 (k = 0 when neither is on)."""
    return side(texts, np.zeros((len(texts), 0), np.float32), groups).astype(np.float32)


def _mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def _pooled_rows(pool, texts, batch: int) -> np.ndarray:
    """``pool`` (list of texts -> (b, d) tensor) over length-sorted batches, without gradients;
    rows come back in input order."""
    torch = _torch()
    texts = list(texts)
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((0, 0), np.float32)
    with torch.no_grad():
        for s in range(0, len(texts), batch):
            b = order[s:s + batch]
            v = pool([texts[i] for i in b]).float().numpy()
            if s == 0:
                out = np.empty((len(texts), v.shape[1]), np.float32)
            out[b] = v
    return out


def _probe(Z: np.ndarray, y: np.ndarray, n: np.ndarray, C: float) -> tuple[np.ndarray, np.float32]:
    """Logistic head on fixed features with soft targets (``simple._soft_logistic``: each row a
    positive with weight y*n and a negative with weight (1-y)*n).  Returns (w, b) in float32."""
    from rayeval.route.routers.simple import _soft_logistic

    w, b = _soft_logistic(Z, y, n, C, max_iter=3000)
    return w.astype(np.float32), np.float32(b)


def _choose_C(Z: np.ndarray, y: np.ndarray, n: np.ndarray, grid: Sequence[float], k: int = 3, seed: int = 0) -> float:
    """The C of ``grid`` with the lowest k-fold (over queries) weighted soft log-loss: chosen on
    the training queries alone, so cross-fitted scores stay honest."""
    fold = np.random.default_rng(seed).permutation(len(Z)) % k
    loss = []
    for C in grid:
        total = 0.0
        for f in range(k):
            tr, te = fold != f, fold == f
            w, b = _probe(Z[tr], y[tr], n[tr], C)
            p = np.clip(expit(Z[te] @ w + b), 1e-9, 1 - 1e-9)
            total -= float(np.sum(n[te] * (y[te] * np.log(p) + (1 - y[te]) * np.log(1 - p))))
        loss.append(total)
    return float(grid[int(np.argmin(loss))])


class FeatureCache:
    """Per-text feature vectors on disk: ``cache_dir()/features/<key>/*.npz`` shards of
    (sha1 of text -> vector).  Lets cross-fitting reuse a frozen backbone's features."""

    def __init__(self, key: str):
        self.dir = cache_dir() / "features" / key
        self.mem: dict[str, np.ndarray] = {}
        if self.dir.is_dir():
            for f in sorted(self.dir.glob("*.npz")):
                with np.load(f) as z:
                    self.mem.update(zip(z["keys"].tolist(), z["vals"]))

    @staticmethod
    def h(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()

    def get_many(self, texts, compute) -> np.ndarray:
        hs = [self.h(t) for t in texts]
        todo = sorted({h: t for h, t in zip(hs, texts) if h not in self.mem}.items())
        if todo:
            vals = compute([t for _, t in todo])
            new = dict(zip([h for h, _ in todo], vals))
            self.mem.update(new)
            self.dir.mkdir(parents=True, exist_ok=True)
            name = hashlib.sha1("".join(new).encode()).hexdigest()[:16]
            tmp = self.dir / f".{name}.{os.getpid()}.tmp.npz"
            np.savez(tmp, keys=np.array(list(new), dtype=str), vals=np.stack(list(new.values())))
            os.replace(tmp, self.dir / f"{name}.npz")
        return np.stack([self.mem[h] for h in hs]) if hs else np.zeros((0, 0), np.float32)


@register
class BertClassifierRouter(Router):
    """Fine-tuned small encoder + linear head on the L2-normalised mean-pooled tokens (the
    sentence-transformers pooling of all-MiniLM-L6-v2).  LP-FT: with ``probe_C`` the head starts
    as a logistic probe on the frozen encoder (``"cv"``: C picked from ``PROBE_GRID`` by inner
    cross-validation on the training queries; ``None``: a random head); ``epochs=0`` keeps the probe."""

    name = "bert"
    PROBE_GRID = (0.03, 0.1, 0.3, 1.0)
    SEARCH_SPACE = {"probe_C": ("loguniform", 0.01, 3.0), "lr": ("loguniform", 5e-6, 5e-5), "epochs": [0, 1, 2],
                    "max_train": [1000, 2000, 4000]}

    def __init__(self, model: str = "minilm-l6", epochs: int = 1, lr: float = 1e-5, head_lr: float = 1e-5,
                 batch_size: int = 16, max_length: int = 128, max_train: int | None = 2000, seed: int = 0,
                 probe_C: float | str | None = "cv", use_groups: bool = False, use_length: bool = False,
                 strong: str | None = None, weak: str | None = None):
        self.model, self.epochs, self.lr, self.head_lr, self.probe_C = model, epochs, lr, head_lr, probe_C
        self.batch_size, self.max_length, self.max_train, self.seed = batch_size, max_length, max_train, seed
        self.use_groups, self.use_length = use_groups, use_length
        self.strong, self.weak = strong, weak

    def _backbone(self, path):
        from transformers import AutoModel, AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path)), AutoModel.from_pretrained(str(path))

    def _fit(self, ts, emb, data):
        torch = _torch()
        from rayeval.route.embed import resolve_embedder

        torch.manual_seed(self.seed)
        self.tok_, self.enc_ = self._backbone(resolve_embedder(self.model))
        self.side_ = SideFeatures(self.use_groups, self.use_length).fit(ts.texts, ts.groups)
        self.head_ = torch.nn.Linear(self.enc_.config.hidden_size + self.side_.dim, 1)
        if self.probe_C:  # the probe sees every training text (frozen features are cheap)
            self._linear_probe(ts.texts, ts.y.astype(np.float32), ts.n.astype(np.float32),
                               _side(self.side_, ts.texts, ts.groups))
        texts, y, n, groups = _soft_targets(ts, self.max_train, self.seed)  # fine-tuning: capped
        side = _side(self.side_, texts, groups)
        opt = torch.optim.AdamW([{"params": self.enc_.parameters(), "lr": self.lr},
                                 {"params": self.head_.parameters(), "lr": self.head_lr}], weight_decay=0.01)
        rng = np.random.default_rng(self.seed)
        steps = self.epochs * int(np.ceil(len(texts) / self.batch_size))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / max(steps, 1)))
        self.enc_.train()
        for _ in range(self.epochs):
            perm = rng.permutation(len(texts))
            for s in range(0, len(texts), self.batch_size):
                b = perm[s:s + self.batch_size]
                logit = self._logits([texts[i] for i in b], side[b])
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logit, torch.tensor(y[b]), weight=torch.tensor(n[b]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        self.enc_.eval()

    def _linear_probe(self, texts, y, n, side):
        """LP-FT (Kumar et al. 2022): start fine-tuning from a logistic head fitted on the frozen
        encoder's pooled features, so the encoder is not pulled around by a random head."""
        torch = _torch()
        self.enc_.eval()
        key = "bert_" + hashlib.sha1(json.dumps([self.model, self.max_length, "l2"]).encode()).hexdigest()[:16]
        compute = lambda tt: _pooled_rows(self._pooled, tt, 64)  # noqa: E731
        Z = np.hstack([FeatureCache(key).get_many(list(texts), compute), side])  # frozen: shared by all folds
        C = _choose_C(Z, y, n, self.PROBE_GRID, seed=self.seed) if self.probe_C == "cv" else float(self.probe_C)
        w, b = _probe(Z, y, n, C)
        with torch.no_grad():
            self.head_.weight.copy_(torch.from_numpy(w[None, :]))
            self.head_.bias.fill_(float(b))

    def _pooled(self, texts):
        x = self.tok_(list(texts), truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        h = _mean_pool(self.enc_(**x).last_hidden_state, x["attention_mask"])
        return _torch().nn.functional.normalize(h, dim=-1)

    def _logits(self, texts, side: np.ndarray):
        torch = _torch()
        return self.head_(torch.cat([self._pooled(texts), torch.from_numpy(side)], 1)).squeeze(-1)

    def _predict(self, texts, emb, groups):
        torch = _torch()
        side = _side(self.side_, texts, groups)
        out = []
        with torch.no_grad():
            for s in range(0, len(texts), 64):
                out.append(torch.sigmoid(self._logits(texts[s:s + 64], side[s:s + 64])).numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def _state(self):
        return {"head_w": self.head_.weight.detach().numpy(), "head_b": self.head_.bias.detach().numpy(),
                **self.side_.state()}

    def _save_extra(self, folder: Path):
        self.enc_.save_pretrained(folder / "encoder")
        self.tok_.save_pretrained(folder / "encoder")

    def _set_state(self, s, folder):
        torch = _torch()
        self.tok_, self.enc_ = self._backbone(folder / "encoder")
        self.enc_.eval()
        self.side_ = SideFeatures(self.use_groups, self.use_length).set_state(s)
        self.head_ = torch.nn.Linear(s["head_w"].shape[1], 1)
        with torch.no_grad():
            self.head_.weight.copy_(torch.tensor(s["head_w"]))
            self.head_.bias.copy_(torch.tensor(s["head_b"]))


@register
class CausalLMClassifierRouter(Router):
    """SmolLM2-135M (first ``num_layers`` blocks) + a head on the pooled last hidden state."""

    name = "causal_llm"
    SEARCH_SPACE = {"num_layers": [8, 12, 20, 30], "C": ("loguniform", 1e-4, 1.0), "pool": ["mean", "last"]}

    def __init__(self, model: str = "smollm2-135m", num_layers: int = 12, pool: str = "mean",
                 max_length: int = 128, train_layers: int = 0, C: float = 0.005, epochs: int = 1,
                 lr: float = 5e-5, batch_size: int = 8, max_train: int | None = 2000, seed: int = 0,
                 use_groups: bool = False, use_length: bool = False,
                 strong: str | None = None, weak: str | None = None):
        if train_layers and (use_groups or use_length):
            raise ValueError("causal_llm: use_groups/use_length need the frozen backbone (train_layers=0)")
        self.use_groups, self.use_length = use_groups, use_length
        self.model, self.num_layers, self.pool, self.max_length = model, num_layers, pool, max_length
        self.train_layers, self.C, self.epochs, self.lr = train_layers, C, epochs, lr
        self.batch_size, self.max_train, self.seed, self.strong, self.weak = batch_size, max_train, seed, strong, weak

    # -- backbone ------------------------------------------------------------------------------
    def _load(self):
        if getattr(self, "lm_", None) is not None:
            return
        torch = _torch()
        from transformers import AutoModel, AutoTokenizer

        from rayeval.models import resolve_model

        path = resolve_model(self.model)
        tok = AutoTokenizer.from_pretrained(str(path))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
        lm = AutoModel.from_pretrained(str(path), dtype=torch.float32)
        if self.num_layers and self.num_layers < len(lm.layers):
            lm.layers = lm.layers[: self.num_layers]
            lm.config.num_hidden_layers = self.num_layers
            if hasattr(lm.config, "layer_types") and lm.config.layer_types:
                lm.config.layer_types = lm.config.layer_types[: self.num_layers]
        for p in lm.parameters():
            p.requires_grad_(False)
        if self.train_layers:
            for blk in lm.layers[-self.train_layers:]:
                for p in blk.parameters():
                    p.requires_grad_(True)
            for p in lm.norm.parameters():
                p.requires_grad_(True)
        lm.eval()
        self.tok_, self.lm_ = tok, lm

    def _pooled(self, texts):
        x = self.tok_(list(texts), truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        h = self.lm_(**x).last_hidden_state
        if self.pool == "last":
            last = x["attention_mask"].sum(1) - 1
            return h[_torch().arange(len(h)), last]
        return _mean_pool(h, x["attention_mask"])

    def _cache_key(self) -> str:
        d = json.dumps([self.model, self.num_layers, self.pool, self.max_length])
        return "causal_" + hashlib.sha1(d.encode()).hexdigest()[:16]

    def features(self, texts) -> np.ndarray:
        """Frozen-backbone pooled features (cached per text)."""
        self._load()
        return FeatureCache(self._cache_key()).get_many(list(texts), lambda tt: _pooled_rows(self._pooled, tt, 16))

    # -- fit/predict -----------------------------------------------------------------------------
    def _fit(self, ts, emb, data):
        texts, y, n, groups = _soft_targets(ts, self.max_train, self.seed)
        self.side_ = SideFeatures(self.use_groups, self.use_length).fit(ts.texts, ts.groups)
        if not self.train_layers:
            F = self.features(texts)
            self.mu_, self.sd_ = F.mean(0), F.std(0) + 1e-6
            Z = np.hstack([(F - self.mu_) / self.sd_, _side(self.side_, texts, groups)])
            self.head_w_, self.head_b_ = _probe(Z, y, n, self.C)
            return
        torch = _torch()
        torch.manual_seed(self.seed)
        self._load()
        hdim = self.lm_.config.hidden_size
        head = torch.nn.Linear(hdim, 1)
        params = [p for p in self.lm_.parameters() if p.requires_grad] + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)
        rng = np.random.default_rng(self.seed)
        self.lm_.train()
        for _ in range(self.epochs):
            perm = rng.permutation(len(texts))
            for s in range(0, len(texts), self.batch_size):
                b = perm[s:s + self.batch_size]
                logit = head(self._pooled([texts[i] for i in b])).squeeze(-1)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logit, torch.tensor(y[b]), weight=torch.tensor(n[b]))
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.lm_.eval()
        self.mu_, self.sd_ = np.zeros(hdim, np.float32), np.ones(hdim, np.float32)
        self.head_w_ = head.weight.detach().numpy()[0]
        self.head_b_ = np.float32(head.bias.detach().numpy()[0])

    def _predict(self, texts, emb, groups):
        if not self.train_layers:
            F = self.features(texts)
        else:
            self._load()
            F = _pooled_rows(self._pooled, texts, 16)
        Z = np.hstack([(F - self.mu_) / self.sd_, _side(self.side_, texts, groups)])
        z = Z @ self.head_w_ + self.head_b_
        return expit(z)

    def _state(self):
        st = {"mu": self.mu_, "sd": self.sd_, "head_w": self.head_w_, "head_b": np.array(self.head_b_),
              **self.side_.state()}
        if self.train_layers:
            for k, v in self.lm_.state_dict().items():
                if any(k.startswith(f"layers.{i}.") for i in range(len(self.lm_.layers) - self.train_layers,
                                                                      len(self.lm_.layers))) or k.startswith("norm."):
                    st["lm::" + k] = v.numpy()
        return st

    def _set_state(self, s, folder):
        self.mu_, self.sd_, self.head_w_, self.head_b_ = s["mu"], s["sd"], s["head_w"], np.float32(s["head_b"])
        self.side_ = SideFeatures(self.use_groups, self.use_length).set_state(s)
        self.lm_ = None
        if self.train_layers:
            torch = _torch()
            self._load()
            sd = {k[4:]: torch.tensor(v) for k, v in s.items() if k.startswith("lm::")}
            self.lm_.load_state_dict(sd, strict=False)
