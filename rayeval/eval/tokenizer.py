"""A model's tokenizer for scoring, without importing transformers where it can.

Every engine turns text into token ids through ``tokenizer.encode(text, add_special_tokens=...)``
(:mod:`rayeval.eval.engines`).  transformers' fast tokenizers do that in the Rust ``tokenizers``
backend loaded from the folder's ``tokenizer.json``; what transformers adds on top is its import
(~4 s here), its load of the same file (Gemma-3's 33 MB: ~3 s) and the chat template.  The
planner on the driver and each engine in its actor load a tokenizer per model, so on a short grid
that was ~10 s of a run's start.

:func:`load_tokenizer` loads the Rust backend alone (at its first ``encode``), but only for a folder whose transformers
tokenizer was checked to be that very backend: the first load of a folder (keyed by the contents
of its tokenizer files and the transformers version) loads both, compares the backends'
serialised forms, and records the result with the attributes the engines read (``bos_token_id``,
``pad_token_id``, ``add_bos_token``, ``chat_template``).  A folder that fails the check (transformers changed the
backend as it loaded it), or has no ``tokenizer.json``, gets transformers' tokenizer, as before.
Anything else (``apply_chat_template``, ``decode`` ...) loads transformers' tokenizer on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from rayeval.config import cache_dir, write_record

# The record's fields: 2 added ``pad_token_id`` (the HF engine reads it as it starts; from
# transformers' tokenizer that was a 3 s load of Gemma-3's)
RECORD_VERSION = 2
_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
          "chat_template.json")


def _hf(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _key(folder: Path) -> str:
    h = hashlib.sha256()
    for name in _FILES:
        p = folder / name
        h.update(name.encode() + b"\0")
        if p.exists():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    from rayeval.eval.engines import _dist_version

    h.update(f"{_dist_version('transformers')}\0{_dist_version('tokenizers')}".encode())
    return h.hexdigest()[:24]


def _record_dir() -> Path:
    return Path(os.environ.get("RAYEVAL_TOKENIZERS") or cache_dir() / "tokenizers").expanduser()


class BackendTokenizer:
    """``encode`` through the Rust backend; the attributes the engines read from the record of
    the check; anything else from transformers' tokenizer, loaded on first use."""

    def __init__(self, path: str, backend, record: dict[str, Any], hf=None):
        self.name_or_path = path
        self._backend = backend   # None: loaded from the folder's tokenizer.json at the first encode
        self.bos_token_id = record.get("bos_token_id")
        self.pad_token_id = record.get("pad_token_id")
        self.add_bos_token = bool(record.get("add_bos_token"))
        self.chat_template = record.get("chat_template")
        self._hf_tok = hf

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    @property
    def backend(self):
        """The Rust tokenizer, loaded on first use (Gemma-3's 33 MB ``tokenizer.json``: ~1.3 s; an
        engine scoring the token jobs of a plan never needs it)."""
        if self._backend is None:
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_file(str(Path(self.name_or_path) / "tokenizer.json"))
        return self._backend

    @property
    def hf(self):
        if self._hf_tok is None:
            self._hf_tok = _hf(self.name_or_path)
        return self._hf_tok

    def apply_chat_template(self, *args, **kwargs):
        if self.chat_template and not getattr(self.hf, "chat_template", None):
            kwargs.setdefault("chat_template", self.chat_template)  # one set on this object
        return self.hf.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.hf, name)


def check(folder: str | Path) -> tuple[dict[str, Any], Any]:
    """Load transformers' tokenizer of ``folder`` and the Rust backend of its ``tokenizer.json``:
    the record :func:`load_tokenizer` keeps (``same``: the backends serialise identically) and
    transformers' tokenizer."""
    from tokenizers import Tokenizer

    hf = _hf(str(folder))
    inner = getattr(hf, "_tokenizer", None) or getattr(hf, "backend_tokenizer", None)
    own = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    tmpl = getattr(hf, "chat_template", None)
    # a chat template other than one string (a dict of named templates) stays with transformers
    same = inner is not None and inner.to_str() == own.to_str() and (tmpl is None or isinstance(tmpl, str))
    return {"v": RECORD_VERSION, "same": bool(same), "bos_token_id": hf.bos_token_id, "pad_token_id": hf.pad_token_id,
            "add_bos_token": bool(getattr(hf, "add_bos_token", False)),
            "chat_template": tmpl if isinstance(tmpl, str) else None, "transformers_class": type(hf).__name__}, hf


def load_tokenizer(folder: str | Path):
    """The tokenizer of a model folder for scoring (see the module's docstring)."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").exists():
        return _hf(str(folder))
    rec_file = _record_dir() / f"{_key(folder)}.json"
    hf = None
    try:
        record = json.loads(rec_file.read_text())
        if record.get("v") != RECORD_VERSION:
            raise ValueError("an older record")
    except (OSError, ValueError):
        record, hf = check(folder)
        write_record(rec_file, record)  # a read-only cache: the check runs again next time
    if not record.get("same"):
        return hf if hf is not None else _hf(str(folder))
    return BackendTokenizer(str(folder), hf._tokenizer if hf is not None else None, record, hf)
