"""Paired statistics against hand-computed values and synthetic cases with a known truth."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kendalltau

from rayeval.eval import metrics as M
from rayeval.eval import stats as S
from rayeval.eval.report import write_report


def paired(both, only_a, only_b, neither):
    a = [1] * both + [1] * only_a + [0] * only_b + [0] * neither
    b = [1] * both + [0] * only_a + [1] * only_b + [0] * neither
    return np.array(a), np.array(b)


def test_mcnemar_exact_hand_computed():
    # 1 vs 6 discordant pairs: p = 2 * P(X <= 1), X ~ Bin(7, 1/2) = 2 * (1 + 7) / 128
    t = S.mcnemar(*paired(3, 1, 6, 2))
    assert (t["n_only_a"], t["n_only_b"]) == (1, 6)
    assert t["p_value"] == pytest.approx(16 / 128)
    # 2 vs 10: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096; concordant pairs do not matter
    assert S.mcnemar(*paired(50, 2, 10, 7))["p_value"] == pytest.approx(158 / 4096)
    assert S.mcnemar(*paired(0, 10, 2, 0))["p_value"] == pytest.approx(158 / 4096)
    assert S.mcnemar(*paired(5, 0, 0, 5))["p_value"] == 1.0
    with pytest.raises(ValueError, match="same items"):
        S.mcnemar([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="0/1"):
        S.mcnemar([1, 2], [1, 0])


def test_holm_and_bh_on_known_pvalues():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1 -> running max 0.06
    adj, rej = S.adjust_pvalues(p, "holm", 0.05)
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert rej.tolist() == [True, False, False, True]
    # BH: 0.005*4/1=0.02, 0.01*4/2=0.02, 0.03*4/3=0.04, 0.04*4/4=0.04 (step-up minimum)
    adj, rej = S.adjust_pvalues(p, "fdr_bh", 0.05)
    assert adj == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert rej.all()
    adj, rej = S.adjust_pvalues([0.01, np.nan], "holm")
    assert adj[0] == pytest.approx(0.01) and np.isnan(adj[1]) and rej.tolist() == [True, False]
    adj, rej = S.adjust_pvalues([0.04, np.nan, 0.02], "bonferroni")
    assert adj[[0, 2]] == pytest.approx([0.08, 0.04]) and rej.tolist() == [False, False, True]
    with pytest.raises(ValueError, match="correction"):
        S.adjust_pvalues(p, "sidak-ish")


def test_paired_bootstrap_covers_known_delta():
    # base ~ Bern(0.6); right->wrong w.p. 0.1, wrong->right w.p. 0.275: Δ = 0.4*0.275 - 0.6*0.1 = 0.05
    rng = np.random.default_rng(7)
    n, reps, true = 400, 200, 0.05
    var_d = (0.6 * 0.1 + 0.4 * 0.275) - true ** 2
    hits, widths = 0, []
    for r in range(reps):
        a = rng.random(n) < 0.6
        flip = np.where(a, rng.random(n) < 0.1, rng.random(n) < 0.275)
        b = a ^ flip
        d, lo, hi = S.paired_delta(a, b, n_boot=400, seed=r)
        assert d == pytest.approx(b.mean() - a.mean())
        hits += lo <= true <= hi
        widths.append(hi - lo)
    assert 0.90 <= hits / reps <= 0.99
    # a 95% interval is about 2 * 1.96 paired standard errors wide (an unpaired one would be ~1.7x wider)
    assert np.mean(widths) == pytest.approx(2 * 1.96 * np.sqrt(var_d / n), rel=0.1)


@pytest.mark.slow
def test_rank_intervals_contain_true_rank():
    # known gaps: 10 points between the first four, then a near tie (55 vs 54) at the bottom
    true_acc = np.array([0.85, 0.75, 0.65, 0.55, 0.54])
    names = ["m1", "m2", "m3", "m4", "m5"]
    rng = np.random.default_rng(11)
    covered = exact_top = bottom_wide = 0
    reps = 30
    for r in range(reps):
        C = rng.random((600, 5)) < true_acc
        per, _ = S.rank_stats(C, names, n_boot=300, seed=r)
        per = per.set_index("model")
        assert per["acc"].to_numpy() == pytest.approx(100 * C.mean(axis=0))
        for k, m in enumerate(names):
            covered += per.loc[m, "rank_lo"] <= k + 1 <= per.loc[m, "rank_hi"]
        exact_top += all(per.loc[m, "rank_lo"] == per.loc[m, "rank_hi"] == k + 1 for k, m in enumerate(names[:3]))
        bottom_wide += all(tuple(per.loc[m, ["rank_lo", "rank_hi"]]) == (4, 5) for m in ("m4", "m5"))
    assert covered / (5 * reps) >= 0.95
    # separated models get a one-rank interval: a 10-point gap is ~3.7 sd at n=600, so a pair's
    # interval stays exact unless its sample gap falls below ~1.96 sd (p ~ 0.05): ~0.86 for all three
    assert exact_top >= 0.7 * reps
    assert bottom_wide >= 0.75 * reps  # the near tie spans both ranks


def test_tied_groups_rule():
    acc = [0.9, 0.85, 0.8, 0.5]
    diff = np.zeros((4, 4), dtype=bool)
    for i, j in [(0, 2), (0, 3), (1, 3), (2, 3)]:
        diff[i, j] = diff[j, i] = True
    # 1 ties 0; 2 ties 1 but differs from 0 -> new group; 3 differs from 2 -> new group
    assert S.tied_groups(acc, diff).tolist() == [1, 1, 2, 3]
    assert S.tied_groups(acc, np.zeros((4, 4), dtype=bool)).tolist() == [1, 1, 1, 1]


def test_tied_groups_on_constructed_tie():
    n = 300
    top = np.arange(n) < 240                      # 80%
    near = top.copy()
    near[[0, 1, 2]] = False                       # 3 lost, 2 gained: 79.67%, McNemar p = 1
    near[[250, 251]] = True
    low = np.arange(n) < 150                      # 50%
    low2 = low.copy()
    low2[[10, 160]] = ~low2[[10, 160]]            # same accuracy, 2 discordant
    C = np.column_stack([low, top, low2, near])
    per, pw = S.rank_stats(C, ["low", "top", "low2", "near"], n_boot=300, seed=0)
    g = per.set_index("model")["group"]
    assert (g["top"], g["near"], g["low"], g["low2"]) == (1, 1, 2, 2)
    pw = pw.set_index(["model_a", "model_b"])
    assert pw.loc[("top", "near"), ["n_only_a", "n_only_b"]].tolist() == [3, 2]
    assert pw.loc[("top", "near"), "p_mcnemar"] == pytest.approx(1.0)
    assert bool(pw.loc[("top", "low"), "significant"]) and not bool(pw.loc[("top", "near"), "significant"])
    assert len(pw) == 6 and (pw["delta_acc"] >= 0).all()  # each pair is listed better model first
    assert per.set_index("model").loc["top", "rank"] == 1 and per.set_index("model").loc["low", "rank_hi"] == 4


def test_kendall_interval_identical_and_reversed():
    rng = np.random.default_rng(3)
    C = rng.random((500, 4)) < np.array([0.9, 0.7, 0.5, 0.3])
    tau, lo, hi, shifts = S.kendall_interval(C, C, n_boot=200, seed=1)
    assert (tau, lo, hi) == (1.0, 1.0, 1.0) and (shifts == 0).all()
    R = C[:, ::-1]
    tau, lo, hi, shifts = S.kendall_interval(C, R, n_boot=200, seed=1)
    assert tau == pytest.approx(kendalltau(C.mean(0), R.mean(0)).statistic) == pytest.approx(-1.0)
    assert (lo, hi) == (-1.0, -1.0)
    assert (shifts[:, 0] == -3).all() and (shifts[:, 3] == 3).all()


def test_vectorised_tau_b_equals_scipy():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 4, size=(200, 6)).astype(float)  # many ties, as bootstrap accuracies have
    y = rng.integers(0, 4, size=(200, 6)).astype(float)
    x[0] = 1.0                                            # a constant row: tau undefined
    want = np.array([kendalltau(a, b).statistic for a, b in zip(x, y)])
    got = S.kendall_tau_b(x, y)
    assert np.isnan(got[0]) and np.isnan(want[0])
    np.testing.assert_allclose(got, want, equal_nan=True)


def grid_rows():
    """Model a loses 10 of 40 items under 'perturbed'; model b loses one and gains one."""
    rows = []
    for k in range(40):
        for model, base, pert in (("a", True, k >= 10), ("b", k % 2 == 0, (k % 2 == 0) != (k in (0, 1)))):
            for setting, ok in (("baseline", base), ("perturbed", pert)):
                rows.append(dict(model=model, dataset="d", setting=setting, scoring="symbol", item_id=f"i{k}",
                                 gold=0, prediction=0 if ok else 1, correct=ok, rotation=0, n_options=4,
                                 forced_gold=-1))
    return rows


def test_paired_tests_grid_with_holm():
    t = M.paired_tests(grid_rows(), ("baseline", "symbol"), n_boot=300).set_index("model")
    assert t.loc["a", ["n_lost", "n_gained", "n_paired"]].tolist() == [10, 0, 40]
    assert t.loc["a", "delta_paired"] == pytest.approx(-25.0)
    assert t.loc["a", "p_mcnemar"] == pytest.approx(2 / 1024)
    assert t.loc["b", ["n_lost", "n_gained"]].tolist() == [1, 1] and t.loc["b", "p_mcnemar"] == 1.0
    assert t.loc["a", "p_adj"] == pytest.approx(4 / 1024)       # Holm over the 2 tests of the grid
    assert t["significant"].tolist() == [True, False]
    assert t.loc["a", "delta_lo"] < -25 < t.loc["a", "delta_hi"] < 0
    assert t.loc["b", "delta_lo"] < 0 < t.loc["b", "delta_hi"]
    s = M.compute_all(grid_rows(), ("baseline", "symbol"), n_boot=300)["summary"].set_index(["model", "setting"])
    assert bool(s.loc[("a", "perturbed"), "significant"]) and not bool(s.loc[("b", "perturbed"), "significant"])
    assert pd.isna(s.loc[("a", "baseline"), "p_adj"])


def swap_rows(n=400):
    """Three models, 'swap' exchanges the top two (a 30-point gap); 'nudge' exchanges two that are 1 item apart."""
    acc = {"x": 0.9, "y": 0.6, "z": 0.595}
    rows = []
    for k in range(n):
        for setting, order in (("baseline", "xyz"), ("swap", "yxz"), ("nudge", "xzy")):
            for model, share in zip(order, sorted(acc.values(), reverse=True)):
                ok = k < share * n
                rows.append(dict(model=model, dataset="d", setting=setting, scoring="symbol", item_id=f"i{k}",
                                 gold=0, prediction=0 if ok else 1, correct=ok, rotation=0, n_options=4,
                                 forced_gold=-1))
    return rows


def test_rank_shift_intervals_and_kendall_ci():
    t = M.compute_all(swap_rows(), ("baseline", "symbol"), n_boot=300)
    rs = t["rank_shift"].set_index(["setting", "model"])
    assert rs.loc[("swap", "y"), "shift"] == 1 and bool(rs.loc[("swap", "y"), "shift_significant"])
    assert rs.loc[("swap", "x"), ["shift_lo", "shift_hi"]].tolist() == [-1, -1]
    assert rs.loc[("nudge", "z"), "shift"] == 1 and not bool(rs.loc[("nudge", "z"), "shift_significant"])
    # y and z differ on 2 items; a resample without both (p ~ e^-2) ties them, and ties share the
    # better rank: z stays 2, y is 2 or 3
    assert rs.loc[("nudge", "z"), ["rank_lo", "rank_hi"]].tolist() == [2, 2]
    assert rs.loc[("nudge", "y"), ["rank_lo", "rank_hi"]].tolist() == [2, 3]
    k = t["kendall"].set_index("setting")
    assert k.loc["swap", "tau"] == k.loc["nudge", "tau"] == pytest.approx(1 / 3)
    # nudge: tau-b is 1/3, or 1 when the resample ties y and z in both conditions
    assert (k.loc["nudge", "tau_lo"], k.loc["nudge", "tau_hi"]) == pytest.approx((1 / 3, 1.0))
    # swap: 1/3, or with that tie (y=z in the baseline, x=z after the swap) -1/sqrt(2*2) = -0.5
    assert (k.loc["swap", "tau_lo"], k.loc["swap", "tau_hi"]) == pytest.approx((-0.5, 1 / 3))
    ri = t["rank_intervals"].set_index(["setting", "model"])
    assert ri.loc[("nudge", "y"), "group"] == ri.loc[("nudge", "z"), "group"] == 2
    assert ri.loc[("nudge", "x"), "group"] == 1


def test_report_marks_significance(tmp_path):
    write_report(grid_rows(), tmp_path, n_boot=200, pride_fraction=0.5, correction="fdr_bh", alpha=0.01)
    md = (tmp_path / "report.md").read_text()
    for heading in ("## Paired tests vs the baseline", "## Rank intervals and tied groups"):
        assert heading in md
    line_a = next(x for x in md.splitlines() if x.startswith("| a | d | perturbed | symbol |"))
    line_b = next(x for x in md.splitlines() if x.startswith("| b | d | perturbed | symbol |"))
    assert line_a.split("|")[13].strip() == "*" and line_b.split("|")[13].strip() == ""
    assert "fdr_bh" in md and "0.01" in md
    assert (tmp_path / "rank_shift_d.png").read_bytes()[:4] == b"\x89PNG"


CFG = {"name": "t", "models": ["m1"], "datasets": [{"name": "mmlu", "subjects": ["anatomy"], "limit": 3}],
       "settings": [{"name": "baseline"}]}


def test_config_carries_alpha_and_correction():
    from rayeval.eval.config import ConfigError, EvalConfig

    kw = EvalConfig.from_dict(dict(CFG, metrics={"alpha": 0.01, "correction": "fdr_bh"})).report_kwargs()
    assert (kw["alpha"], kw["correction"]) == (0.01, "fdr_bh")
    assert "alpha" not in EvalConfig.from_dict(CFG).report_kwargs()  # compute_all's default, 0.05 with Holm
    with pytest.raises(ConfigError, match=r"metrics\.correction: 'bh' is not one of"):
        EvalConfig.from_dict(dict(CFG, metrics={"correction": "bh"}))
    with pytest.raises(ConfigError, match=r"metrics\.alpha: expected a number in \(0, 1\), got 5"):
        EvalConfig.from_dict(dict(CFG, metrics={"alpha": 5}))
