"""Scoring methods: requests built, results reduced, and the expand -> engine -> reduce loop."""

import math

import pytest

from rayeval.data.schema import MCQItem
from rayeval.eval.engines import FakeEngine, ScoreResult
from rayeval.eval.prompts import build_prompt
from rayeval.eval.scoring import ROW_COLUMNS, Scoring, expand, expand_item, get_scoring, reduce

ITEM = MCQItem(id="t1", subject="anatomy", question="Q?", choices=("short", "much longer text", "é", "mid"), gold=1)


def test_symbol_one_request_with_symbols():
    p = build_prompt(ITEM)
    reqs = Scoring("symbol").build_requests(p)
    assert len(reqs) == 1 and reqs[0].symbols == ("A", "B", "C", "D") and reqs[0].prompt == p.text
    assert reqs[0].prompt.endswith("Answer:") and reqs[0].continuations is None
    out = Scoring("symbol").reduce(p, [ScoreResult(symbol_logprobs=[-2.0, -0.5, -3.0, -1.0])])
    assert out["prediction"] == 1 and out["correct"] is True
    assert out["per_option_scores"] == [-2.0, -0.5, -3.0, -1.0]


def test_hybrid_and_cloze_prompts():
    p = build_prompt(ITEM)
    h = Scoring("hybrid").build_requests(p)[0]
    c = Scoring("cloze").build_requests(p)[0]
    assert h.prompt == p.text and "A. short" in h.prompt
    assert c.prompt == p.cloze_text and "A. short" not in c.prompt and c.prompt.endswith("Q?\nAnswer:")
    assert h.continuations == c.continuations == (" short", " much longer text", " é", " mid")


def test_normalisations_hand_computed():
    p = build_prompt(ITEM)
    res = [ScoreResult(continuation_logprobs=[-2.0, -6.0, -4.0, -3.0], continuation_tokens=[1, 3, 2, 1])]
    out = Scoring("hybrid").reduce(p, res)
    assert out["per_option_raw_logprob"] == [-2.0, -6.0, -4.0, -3.0]
    assert out["per_option_score_tokens"] == [-2.0, -2.0, -2.0, -3.0]
    assert out["chars"] == [5, 16, 1, 3] and out["bytes"] == [5, 16, 2, 3]
    assert out["per_option_score_chars"] == pytest.approx([-0.4, -6 / 16, -4.0, -1.0])
    assert out["per_option_score_bytes"] == pytest.approx([-0.4, -6 / 16, -2.0, -1.0])
    assert out["normalize"] == "tokens" and out["prediction"] == 0  # ties -> first
    assert out["pred_chars"] == 1 and out["pred_none"] == 0 and out["pred_bytes"] == 1
    by_chars = Scoring("hybrid", normalize="chars").reduce(p, res)
    assert by_chars["prediction"] == 1 and by_chars["correct"] is True
    assert Scoring("cloze", normalize="none").reduce(p, res)["per_option_scores"] == [-2.0, -6.0, -4.0, -3.0]


def test_reduce_checks_shapes():
    p = build_prompt(ITEM)
    with pytest.raises(ValueError, match="4 options"):
        Scoring("symbol").reduce(p, [ScoreResult(symbol_logprobs=[-1.0, -2.0])])
    out = Scoring("symbol").reduce(p, [ScoreResult(symbol_logprobs=[float("nan"), -2.0, -3.0, -4.0])])
    assert out["per_option_raw_logprob"][0] == -math.inf and out["prediction"] == 1


def test_get_scoring_errors():
    assert get_scoring({"name": "cloze", "normalize": "bytes"}).label == "cloze/bytes"
    with pytest.raises(ValueError, match="unknown method"):
        get_scoring("likelihood")
    with pytest.raises(ValueError, match="normalize"):
        get_scoring({"name": "hybrid", "normalize": "words"})


def test_expand_reduce_loop_with_fake_engine():
    items = [ITEM.replace(id=f"i{k}", gold=k % 4) for k in range(6)]
    cfg = {"seed": 1, "scorings": ["symbol", "hybrid", "cloze"],
           "settings": [{"name": "baseline"}, {"name": "rare", "perturbations": [{"name": "symbols", "set": "rare"}]},
                        {"name": "circ", "cyclic": 1.0}]}
    works = expand(items, [], cfg, dataset="toy")
    assert len(works) == 6 * 3 + 6 * 3 + 6 * 4 * 3 - 6 * 3  # no cloze for rotations 1..3
    eng = FakeEngine(bias=[1.0, 0, 0, 0])
    rows = [reduce(w, eng.score(w.requests), model=eng.name) for w in works]
    assert set(ROW_COLUMNS) == set(rows[0])
    rare = [r for r in rows if r["setting"] == "rare" and r["scoring"] == "symbol"]
    assert all(r["symbols"] == ["œ", "§", "З", "ü"] for r in rare)
    circ = [r for r in rows if r["setting"] == "circ" and r["item_id"] == "i0" and r["scoring"] == "symbol"]
    assert sorted(r["rotation"] for r in circ) == [0, 1, 2, 3]
    assert sorted(r["gold"] for r in circ) == [0, 1, 2, 3]
    # same seed, same requests (deterministic, order-free)
    again = expand(list(reversed(items)), [], cfg, dataset="toy")
    key = lambda w: w.key
    assert [w.requests for w in sorted(works, key=key)] == [w.requests for w in sorted(again, key=key)]


def test_partial_cyclic_share():
    items = [ITEM.replace(id=f"i{k}") for k in range(400)]
    setting = {"name": "pride", "cyclic": 0.05}
    n_rot = sum(len({w.rotation for w in expand_item(it, setting, ["symbol"])}) > 1 for it in items)
    assert 5 <= n_rot <= 40


def test_flatten_and_reduce_all_match_the_per_work_loop():
    from rayeval.eval.scoring import flatten, reduce_all

    items = [ITEM.replace(id=f"i{k}", gold=k % 4) for k in range(5)]
    works = expand(items, [], {"scorings": ["symbol", "cloze"], "settings": [{"name": "b", "cyclic": 0.5}]})
    eng = FakeEngine(bias=[0.3])
    loop = [reduce(w, eng.score(w.requests), "fake") for w in works]
    assert reduce_all(works, eng.score(flatten(works)), "fake") == loop
    with pytest.raises(ValueError, match="expected"):
        reduce_all(works, [], "fake")
