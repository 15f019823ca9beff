"""A content-addressed score cache: the value of a token job, keyed by what it depends on.

    cache = ScoreCache("~/.cache/rayeval/scores", identity)   # or s3://bucket/prefix, gs://...
    cache.get_many([job.key for job in jobs])                 # values, or None where missing
    cache.put_many(jobs, values)

``identity`` names the numbers' source: engine kind and version, dtype, and the model's weights
fingerprint (:func:`weights_fingerprint`, a hash of the files' bytes).  Each identity has its own
folder; values are appended as parquet parts (one per ``put_many``, written once, never edited),
so concurrent writers on many nodes never clash and a reader sees every finished part.  Keys are
:attr:`TokenJob.key` (the exact token ids, start and candidates), so a value is reused exactly
when the same model would compute the same thing: by another setting, another run, another user.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from rayeval.config import cache_dir


def default_cache_path() -> str:
    return str(cache_dir() / "scores")


def identity_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    p = Path(root).expanduser().resolve()
    return pafs.LocalFileSystem(), str(p)


def weights_fingerprint(path: str | Path) -> str:
    """sha256 over a model folder's config and weight files (name, size, bytes); a hub id (no
    local folder) is fingerprinted by its name.  Memoised per (file, size, mtime) in the cache
    folder, so a 500 MB model is hashed once."""
    p = Path(str(path)).expanduser()
    if not p.is_dir():
        return "hub:" + str(path)
    files = sorted(f for f in p.iterdir() if f.is_file() and (
        f.suffix in (".safetensors", ".bin", ".gguf", ".pt") or f.name in ("config.json", "tokenizer.json")))
    memo_file = cache_dir() / "fingerprints.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    h = hashlib.sha256()
    changed = False
    for f in files:
        st = f.stat()
        mk = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        digest = memo.get(mk)
        if digest is None:
            fh = hashlib.sha256()
            with open(f, "rb") as fp:
                for chunk in iter(lambda: fp.read(1 << 22), b""):
                    fh.update(chunk)
            digest = memo[mk] = fh.hexdigest()
            changed = True
        h.update(f"{f.name}\0{st.st_size}\0{digest}\n".encode())
    if changed:
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    return h.hexdigest()[:32]


SCHEMA = pa.schema([("key", pa.binary(16)), ("values", pa.list_(pa.float64())), ("n", pa.int32())])


class ScoreCache:
    """Values of token jobs for one identity (see the module docstring)."""

    def __init__(self, root: str | Path | None, identity: dict[str, Any]):
        root = str(root or default_cache_path())
        self.fs, base = _filesystem(root)
        self.identity = dict(identity)
        self.dir = f"{base.rstrip('/')}/{identity_key(self.identity)}"
        self.fs.create_dir(self.dir, recursive=True)
        ident = f"{self.dir}/identity.json"
        if self.fs.get_file_info(ident).type == pafs.FileType.NotFound:
            with self.fs.open_output_stream(ident) as f:
                f.write(json.dumps(self.identity, sort_keys=True, indent=1).encode())
        self._values: dict[bytes, Any] = {}
        self._seen: set[str] = set()
        self.refresh()

    def refresh(self) -> None:
        """Read parts written since the last look (by this or any other process)."""
        sel = pafs.FileSelector(self.dir, allow_not_found=True)
        for info in self.fs.get_file_info(sel):
            if not info.path.endswith(".parquet") or info.path in self._seen:
                continue
            t = pq.read_table(info.path, filesystem=self.fs)
            for k, v, n in zip(t.column("key").to_pylist(), t.column("values").to_pylist(), t.column("n").to_pylist()):
                self._values[k] = list(v) if n < 0 else (v[0], int(n))
            self._seen.add(info.path)

    def __len__(self) -> int:
        return len(self._values)

    def get_many(self, keys: Sequence[bytes]) -> list[Any]:
        return [self._values.get(k) for k in keys]

    def put_many(self, jobs: Sequence[Any], values: Sequence[Any]) -> None:
        keys, vals, ns = [], [], []
        for j, v in zip(jobs, values):
            k = j.key
            if k in self._values:
                continue
            self._values[k] = v
            keys.append(k)
            if j.next_token:
                vals.append([float(x) for x in v])
                ns.append(-1)
            else:
                vals.append([float(v[0])])
                ns.append(int(v[1]))
        if not keys:
            return
        table = pa.table({"key": keys, "values": vals, "n": ns}, schema=SCHEMA)
        name = f"{self.dir}/part-{uuid.uuid4().hex}"
        tmp, final = name + ".tmp", name + ".parquet"
        pq.write_table(table, tmp, filesystem=self.fs)
        self.fs.move(tmp, final)
        self._seen.add(final)
