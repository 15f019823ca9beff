"""The main job's serve stage for real: the workflow trains its router, deploys the Serve graph
(real Ray Serve, real HTTP, real vLLM engines for both models), and sends the demo prompts.
Both routing paths must be used, and both models must answer in readable text: the instruct
model through its chat template, the base model completion-style, cut at its stop strings.

The evaluation stage runs on the fake engine here (its scores are hashes: the router it yields
is arbitrary, which is fine, the stage under test is the serving); test_pipeline and
test_models cover the real scoring engines."""

from __future__ import annotations

import json
import os
import re

import pandas as pd
import pytest

from rayeval.workflow import load_workflow_config, run_workflow

pytestmark = [pytest.mark.serve, pytest.mark.engine, pytest.mark.ray]


def _repeats(text: str) -> int:
    """Longest run of one word repeated back to back ("Answer: Answer: Answer:" -> 3)."""
    words, best, run = re.findall(r"\S+", text), 0, 0
    for i, w in enumerate(words):
        run = run + 1 if i and w == words[i - 1] else 1
        best = max(best, run)
    return best


def test_main_job_serves_both_tiers_with_readable_answers(tmp_path):
    from rayeval.cluster import shutdown

    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # shared box: see test_serve's gateway
    shutdown()
    cfg = load_workflow_config(None)
    cfg.reference = {**cfg.reference, "when": "never"}  # the reference router is not what is tested here
    try:
        res = run_workflow(cfg, tmp_path, serve=True, engine={"kind": "fake"})
    finally:
        shutdown()
    served = pd.read_csv(tmp_path / "served.csv", keep_default_na=False)
    pair = res["pair"]
    assert len(set(pair)) == 2
    assert (served.status == 200).all(), served.to_dict("records")
    assert set(served.tier) == {"strong", "weak"} and res["served_tiers"] == ["strong", "weak"]
    assert set(served.served_by) == set(pair)
    for r in served.itertuples():
        assert (r.tier == "strong") == (r.served_by == pair[0])
        assert (r.p_strong >= r.threshold) == (r.tier == "strong")
        text = str(r.text).strip()
        assert text, f"{r.served_by} gave an empty answer to {r.prompt!r}"
        assert _repeats(text) <= 3, f"{r.served_by} repeats itself: {text!r}"
        if r.served_by == "gemma3-270m":  # the base model stops at the end of its answer
            assert "Question:" not in text and "\n\n" not in text
    rep = (tmp_path / "report.md").read_text()
    assert "Tiers used: strong, weak." in rep
    assert json.loads((tmp_path / "pipeline.json").read_text())["served_tiers"] == ["strong", "weak"]
