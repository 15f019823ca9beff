"""The scoring tokenizer: the Rust backend alone where transformers' tokenizer was checked to be
that very backend, transformers' tokenizer otherwise; the same ids either way."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from rayeval.eval import tokenizer as T

TEXTS = ["hello world !", "world hello", "hello  !  world", "unknown words here"]


def _folder(path, same: bool):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    path.mkdir()
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "hello": 2, "world": 3, "!": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("[UNK]", special=True)])
    if same:  # what transformers sets on load; without it, its backend differs from the file's
        tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "unk_token": "[UNK]"}))
    return path


@pytest.fixture
def records(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYEVAL_TOKENIZERS", str(tmp_path / "records"))
    return tmp_path / "records"


def test_checked_backend_is_used_alone_and_encodes_as_transformers(tmp_path, records):
    from transformers import AutoTokenizer

    d = _folder(tmp_path / "tok", same=True)
    first = T.load_tokenizer(d)
    assert isinstance(first, T.BackendTokenizer)
    [rec] = list(records.glob("*.json"))
    assert json.loads(rec.read_text())["same"] is True
    again = T.load_tokenizer(d)                     # from the record: no transformers tokenizer loaded
    assert isinstance(again, T.BackendTokenizer)
    ids = (again.bos_token_id, again.pad_token_id, again.add_bos_token)  # what the engines read as they start
    assert again._hf_tok is None
    hf = AutoTokenizer.from_pretrained(str(d))
    assert ids == (hf.bos_token_id, hf.pad_token_id, hf.add_bos_token)
    for text in TEXTS:
        for special in (False, True):
            assert again.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special)
    assert again.bos_token_id == hf.bos_token_id == 1
    assert again.decode([2, 3]) == hf.decode([2, 3])   # anything else: transformers' tokenizer, loaded now
    assert again._hf_tok is not None


def test_backend_transformers_changed_falls_back_to_transformers(tmp_path, records):
    d = _folder(tmp_path / "tok", same=False)
    tok = T.load_tokenizer(d)
    assert not isinstance(tok, T.BackendTokenizer)
    assert json.loads(next(records.glob("*.json")).read_text())["same"] is False
    assert tok.encode("hello world !", add_special_tokens=False) == [2, 3, 4]
    assert not isinstance(T.load_tokenizer(d), T.BackendTokenizer)   # the record says so


def test_a_record_of_an_older_format_is_checked_again(tmp_path, records):
    d = _folder(tmp_path / "tok", same=True)
    T.load_tokenizer(d)
    [rec] = list(records.glob("*.json"))
    old = {k: v for k, v in json.loads(rec.read_text()).items() if k not in ("v", "pad_token_id")}
    rec.write_text(json.dumps(old))
    tok = T.load_tokenizer(d)
    assert tok._hf_tok is not None  # checked against transformers again, and recorded anew
    assert json.loads(rec.read_text())["v"] == T.RECORD_VERSION
    assert T.load_tokenizer(d)._hf_tok is None


def test_changed_tokenizer_file_is_checked_again(tmp_path, records):
    d = _folder(tmp_path / "tok", same=True)
    T.load_tokenizer(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 64}))
    T.load_tokenizer(d)
    assert len(list(records.glob("*.json"))) == 2


@pytest.mark.model
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_packaged_models_score_the_same_ids_without_transformers(model, tmp_path, records):
    """Both packaged models: the backend path is taken, gives transformers' ids on real prompts of
    every scoring (symbol, hybrid, cloze, few-shot, perturbed symbols), and a later process loads
    it without importing transformers."""
    from transformers import AutoTokenizer

    from rayeval.eval.engines import _expand
    from rayeval.eval.pipeline import build_work
    from rayeval.eval.config import load_eval_config
    from rayeval.models import get_spec, resolve_model

    path = resolve_model(model, prepare=False)
    tok = T.load_tokenizer(path)
    assert isinstance(tok, T.BackendTokenizer)
    hf = AutoTokenizer.from_pretrained(str(path))
    assert (tok.bos_token_id, tok.pad_token_id, tok.add_bos_token) == (hf.bos_token_id, hf.pad_token_id, hf.add_bos_token)
    cfg = load_eval_config("eval_paper_grid")
    cfg = dataclasses.replace(cfg, datasets=[dataclasses.replace(d, limit=2, subjects=d.subjects and d.subjects[:3])
                                             for d in cfg.datasets])
    works, _ = build_work(cfg)
    works = works[:: max(1, len(works) // 400)]
    add_bos = get_spec(model).add_bos
    for w in works:
        assert _expand(w.requests, tok, {}, add_bos) == _expand(w.requests, hf, {}, add_bos), w.key
    code = ("import sys; from rayeval.eval.tokenizer import load_tokenizer, BackendTokenizer; "
            f"t = load_tokenizer({str(path)!r}); print(isinstance(t, BackendTokenizer), 'transformers' in sys.modules, "
            "t.encode(' A', add_special_tokens=False))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(maxsplit=2)
    assert out[:2] == ["True", "False"]
    assert json.loads(out[2]) == hf.encode(" A", add_special_tokens=False)
