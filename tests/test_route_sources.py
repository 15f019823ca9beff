"""One parser and loader for routing data sources (``rayeval.prefs.sources``), used by the CLI,
Tune, the gateway's default routers, generation prompts and ``rayeval check``."""

from __future__ import annotations

import pytest

from rayeval.prefs.outcomes import Outcomes, Preferences
from rayeval.prefs.sources import Source, load_outcomes, load_source, parse_source


def test_parse_every_form():
    assert parse_source("routellm:mmlu") == Source("routellm", "mmlu")
    assert parse_source("routerbench:arc_challenge") == Source("routerbench", "arc_challenge", "train")
    assert parse_source("routerbench:arc_challenge:test") == Source("routerbench", "arc_challenge", "test")
    assert parse_source("battles:/x/b.jsonl").path.name == "b.jsonl"
    assert parse_source("eval:runs/a").kind == "eval"
    assert parse_source("runs/outcomes.parquet") == Source("file", "runs/outcomes.parquet")
    for bad, msg in [("mmlu", "unknown source 'mmlu'"), ("routellm:", "needs a name"), ("", "expected a data source"),
                     ("x.csv", "unknown source")]:
        with pytest.raises(ValueError, match=msg):
            parse_source(bad)


def test_load_kinds_and_saved_tables_round_trip(tmp_path):
    oc = load_source("routellm:mmlu")
    assert isinstance(oc, Outcomes) and len(oc) > 1000
    small = oc.subset(range(50))
    small.save(tmp_path / "o.parquet")
    back = load_source(str(tmp_path / "o.parquet"))
    assert isinstance(back, Outcomes) and back.texts == small.texts
    prefs = small.to_preferences()
    prefs.save(tmp_path / "p.parquet")
    assert isinstance(load_source(str(tmp_path / "p.parquet")), Preferences)
    with pytest.raises(ValueError, match="tuning needs per-query outcomes"):
        load_outcomes(str(tmp_path / "p.parquet"), "tuning")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_source(str(tmp_path / "missing.parquet"))
