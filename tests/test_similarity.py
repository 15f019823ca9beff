"""Benchmark-to-training-data similarity (RouteLLM's score)."""

import math

import numpy as np
import pytest

from rayeval.prefs.similarity import (best_similarities, query_set, similarity_markdown, similarity_score,
                                      similarity_study)


def test_hand_computed_example():
    # training queries: the two axes; evaluation queries: on an axis, at 45 degrees, opposite.
    train = np.array([[1.0, 0.0], [0.0, 1.0]])
    ev = np.array([[2.0, 0.0],      # cos 1 with t0                 -> best 1
                   [1.0, 1.0],      # cos 1/sqrt2 with both          -> best 0.7071
                   [-1.0, 0.0],     # cos -1 with t0, 0 with t1      -> best 0
                   [3.0, -4.0]])    # cos 0.6 with t0, -0.8 with t1  -> best 0.6
    best = best_similarities(ev, train)
    np.testing.assert_allclose(best, [1.0, 1 / math.sqrt(2), 0.0, 0.6], atol=1e-12)
    assert similarity_score(ev, train) == pytest.approx((1 + 1 / math.sqrt(2) + 0 + 0.6) / 4)
    # the score is asymmetric: the mean is over the EVALUATION set
    assert similarity_score(train, ev) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)


def test_leave_one_out_and_exclusion_mask():
    x = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    assert similarity_score(x, x) == pytest.approx(1.0)
    # without its own copy: nearest other rows are 0.8, max(0.8, 0.6) = 0.8, 0.6
    assert similarity_score(x, x, leave_one_out=True) == pytest.approx((0.8 + 0.8 + 0.6) / 3)
    mask = np.zeros((3, 3), bool)
    mask[1, 0] = True  # also hide row 0 from query 1 -> its best is row 2 (0.6) ... or itself (1.0)
    np.testing.assert_allclose(best_similarities(x, x, exclude=mask), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(best_similarities(x, x, exclude=mask, exclude_identical=True), [0.8, 0.6, 0.6])
    with pytest.raises(ValueError, match="no training query left"):
        best_similarities(x[:1], x[:1], exclude_identical=True)
    with pytest.raises(ValueError, match="sizes differ"):
        best_similarities(x, np.ones((2, 3)))


def test_texts_use_the_router_embedder():
    a = ["What is the capital of France?", "Write a haiku about autumn leaves."]
    assert similarity_score(a, a) == pytest.approx(1.0, abs=1e-5)
    s_close = similarity_score(["Which city is the capital of France?"], a)
    s_far = similarity_score(["Solve for x: 3x + 5 = 20."], a)
    assert 0 < s_far < s_close < 1


def test_query_sets_and_study(shared_data):
    t1, t2 = query_set("mt_bench"), query_set("mt_bench_turn2")
    assert len(t1) == 80 and len(t2) == 80
    assert set(t1["id"]) == set(t2["id"])  # the two turns of a conversation share its id
    both = query_set("mt_bench+mt_bench_turn2")
    assert len(both) == 160
    assert len(query_set("gsm8k", sample=50, seed=1)) == 50
    res = similarity_study(["mt_bench+mt_bench_turn2"], ["mt_bench", "gsm8k"], sample=60)
    rows = {r["bench"]: r for r in res["rows"]}
    # MT-Bench queries whose conversation (either turn) is in the pool have it held out
    pool, ev = query_set("mt_bench+mt_bench_turn2", 60), query_set("mt_bench", 60)
    assert rows["mt_bench"]["held_out"] == int(ev["id"].isin(set(pool["id"])).sum()) > 0
    assert rows["gsm8k"]["held_out"] == 0
    assert all(0 < r["score"] < 1 for r in res["rows"])
    md = similarity_markdown(res)
    assert "| mt_bench+mt_bench_turn2 (n=60)" in md and "gsm8k" in md
