"""Routing metrics against hand-computed values and RouteLLM's published reference figures."""

import numpy as np
import pytest

from rayeval.route import metrics as M


def test_full_curve_groups_tied_scores():
    score = np.array([0.9, 0.5, 0.1, 0.5])
    s = np.array([1, 0, 1, 1.0])
    w = np.array([0, 0, 1, 0.0])
    c = M.full_curve(score, s, w)
    # thresholds can only split between distinct scores: shares 0, 1/4, 3/4, 1
    assert c["strong_share"].tolist() == [0, 0.25, 0.75, 1.0]
    assert np.allclose(c["quality"], [0.25, 0.5, 0.75, 0.75])


def _ten():
    score = np.arange(10, 0, -1) / 10.0  # 1.0 ... 0.1, distinct
    s = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0.0])  # the two top-scored queries gain 1
    w = np.zeros(10)
    return score, s, w


def test_routellm_curve_and_apgr_by_hand():
    score, s, w = _ten()
    c = M.routellm_curve(score, s, w)
    assert np.allclose(c["strong_share"], np.arange(11) / 10)
    assert np.allclose(c["quality"], [0, 0.1] + [0.2] * 9)
    # trapezoid: .005 + .015 + 8 * .02 = .18; normalised by (0.2 - 0) * 1
    assert M.apgr_routellm(score, s, w) == pytest.approx(0.9)


def test_apgr_paper_by_hand():
    score, s, w = _ten()
    # PGR at shares .1 .. 1.0 = .5, 1, 1, ... -> mean .95
    assert M.apgr_paper(score, s, w) == pytest.approx(0.95)


def test_apgr_reversed_router_is_low():
    score, s, w = _ten()
    assert M.apgr_routellm(-score, s, w) == pytest.approx(0.1)


def test_cpt_on_non_monotone_curve():
    # by score: q1 strong loses (gain -1), q2 and q3 strong wins (+1), q4 tie
    score = np.array([4, 3, 2, 1.0])
    s = np.array([0, 1, 1, 0.0])
    w = np.array([1, 0, 0, 0.0])
    c = M.full_curve(score, s, w)
    assert np.allclose(M.pgr(c["quality"], w.mean(), s.mean()), [0, -1, 0, 1, 1])
    assert M.cpt(score, s, w, 0.5) == pytest.approx(0.75)
    assert M.cpt(score, s, w, 0.0) == 0.0
    assert M.cpt(score, s, w, 1.0) == pytest.approx(0.75)


def test_cpt_smallest_share_not_first_crossing_after_dip():
    # PGR: 0 -> .54 -> .23 -> 1: CPT(50%) is the first point, 1/3, not after the dip
    score = np.array([3, 2, 1.0])
    s = np.array([1, 0, 1.0])
    w = np.array([0.3, 0.4, 0.0])
    c = M.full_curve(score, s, w)
    p = M.pgr(c["quality"], w.mean(), s.mean())
    assert p[1] > 0.5 and p[2] < 0.5
    assert M.cpt(score, s, w, 0.5) == pytest.approx(1 / 3)


def test_cost_saving_ratio():
    assert M.cost_saving_ratio(0.25) == pytest.approx(4.0)
    assert M.cost_saving_ratio(0.5, cost_strong=10, cost_weak=2) == pytest.approx(10 / 6)


def test_frontier_aiq_and_cost_to_reach():
    cost = [0, 1, 2, 0.5, 1.5, 3]
    qual = [0.5, 0.7, 0.8, 0.5, 0.6, 0.75]
    hx, hy = M.upper_frontier(cost, qual)
    assert hx.tolist() == [0, 1, 2] and np.allclose(hy, [0.5, 0.7, 0.8])
    # area (0.5+0.7)/2 + (0.7+0.8)/2 = 1.35 over width 2
    assert M.aiq(cost, qual, 0, 2) == pytest.approx(0.675, abs=1e-6)
    # flat at 0.8 beyond the best point
    assert M.aiq(cost, qual, 0, 3) == pytest.approx(2.15 / 3, abs=1e-6)
    assert M.cost_to_reach(cost, qual, 0.75) == pytest.approx(1.5)
    assert np.isnan(M.cost_to_reach(cost, qual, 0.9))


def test_nway_curve_endpoints():
    S = np.array([[1, 0], [1, 1], [0, 1.0]])
    C = np.array([[10, 1], [10, 1], [10, 1.0]])
    pred = S.copy()  # a perfect predictor
    curve = M.nway_curve(pred, S, C)
    assert curve["quality"].iloc[0] == pytest.approx(1.0)  # lam = 0: best per query
    assert curve["cost"].iloc[-1] == pytest.approx(1.0)  # huge lam: always the cheap model


def test_bootstrap_ci_brackets_point():
    rng = np.random.default_rng(0)
    x = rng.normal(size=500)
    ci = M.bootstrap(np.mean, x, n_boot=300)
    assert ci.lo < ci.value < ci.hi
    assert ci.hi - ci.lo == pytest.approx(2 * 1.96 / np.sqrt(500), rel=0.25)
    const = M.bootstrap(lambda a: 1.0, x, n_boot=20)
    assert const.lo == const.hi == 1.0


def test_reference_figures_length_router():
    """README reference: 'longer prompt goes strong' APGR .583 MMLU / .598 GSM8K, CPT(50%) 36.7% MMLU."""
    from rayeval.prefs.outcomes import load_routellm

    o = load_routellm("mmlu")
    s, w = o.pair_arrays()
    L = np.array([len(t) for t in o.texts], float)
    assert M.apgr_routellm(L, s, w) == pytest.approx(0.583, abs=0.0015)
    assert M.cpt_routellm(L, s, w, 0.5) == pytest.approx(0.367, abs=0.0015)
    g = load_routellm("gsm8k")
    s, w = g.pair_arrays()
    L = np.array([len(t) for t in g.texts], float)
    assert M.apgr_routellm(L, s, w) == pytest.approx(0.598, abs=0.0015)
    assert M.cpt_routellm(L, s, w, 0.5) == pytest.approx(0.369, abs=0.005)
    m = load_routellm("mt_bench")
    s, w = m.pair_arrays()
    L = np.array([len(t) for t in m.texts], float)
    assert M.apgr_routellm(L, s, w) == pytest.approx(0.556, abs=0.0015)
    assert M.cpt_routellm(L, s, w, 0.5) == pytest.approx(0.344, abs=0.0015)


def test_random_router_apgr_is_half():
    from rayeval.prefs.outcomes import load_routellm

    o = load_routellm("mmlu")
    s, w = o.pair_arrays()
    vals = [M.apgr_routellm(np.random.default_rng(i).random(len(s)), s, w) for i in range(30)]
    assert np.mean(vals) == pytest.approx(0.500, abs=0.005)  # sd .009 / sqrt(30)
    assert 0.004 < np.std(vals) < 0.016
    # the paper's 10-point right Riemann sum puts a random router near .55, not .5
    assert M.apgr_paper(np.random.default_rng(0).random(len(s)), s, w) == pytest.approx(0.55, abs=0.03)
