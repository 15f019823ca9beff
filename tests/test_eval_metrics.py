"""Metrics against hand-computed values, and PriDe on a synthetic position-biased model."""

import hashlib
import math

import numpy as np
import pandas as pd
import pytest

from rayeval.data.schema import MCQItem
from rayeval.eval import metrics as M
from rayeval.eval.engines import ScoreResult
from rayeval.eval.scoring import expand, reduce


def row(model, setting, item, gold, pred, scoring="symbol", rotation=0, n=4, scores=None, dataset="d"):
    return dict(model=model, dataset=dataset, setting=setting, scoring=scoring, item_id=item, gold=gold,
                prediction=pred, correct=gold == pred, rotation=rotation, n_options=n,
                per_option_scores=scores if scores is not None else [0.0] * n, forced_gold=-1)


def rstd_rows():
    # recall by gold position: 0 -> 3/4, 1 -> 1/4, 2 -> 1/2, 3 -> 2/2
    spec = [(0, [1, 1, 1, 0]), (1, [1, 0, 0, 0]), (2, [1, 0]), (3, [1, 1])]
    rows, k = [], 0
    for gold, oks in spec:
        for ok in oks:
            rows.append(row("m", "baseline", f"i{k}", gold, gold if ok else (gold + 1) % 4))
            k += 1
    return rows


def test_recall_and_rstd_hand_computed():
    rec = M.recall_by_gold(rstd_rows())
    assert rec["recall"].tolist() == [75.0, 25.0, 50.0, 100.0]
    assert rec["n"].tolist() == [4, 4, 2, 2]
    r = M.rstd(rstd_rows())["rstd"].iloc[0]
    assert r == pytest.approx(math.sqrt(781.25))  # population std of (75, 25, 50, 100)


def test_accuracy_bootstrap_ci_seeded():
    a = M.accuracy(rstd_rows(), n_boot=2000, seed=3)
    b = M.accuracy(list(reversed(rstd_rows())), n_boot=2000, seed=3)
    assert a["acc"].iloc[0] == pytest.approx(700 / 12) and a["n"].iloc[0] == 12
    assert a["acc_lo"].iloc[0] < a["acc"].iloc[0] < a["acc_hi"].iloc[0]
    assert a.equals(b)
    # bootstrap sd of a proportion ~ sqrt(p(1-p)/n): the 95% interval is about +-28 points here
    assert 40 < a["acc_hi"].iloc[0] - a["acc_lo"].iloc[0] < 70
    big = [row("m", "s", f"i{k}", 0, 0 if k % 5 < 3 else 1) for k in range(1003)]
    c1, c2 = M.accuracy(big, n_boot=500, seed=1), M.accuracy(big, n_boot=500, seed=2)
    assert (c1["acc_lo"].iloc[0], c1["acc_hi"].iloc[0]) != (c2["acc_lo"].iloc[0], c2["acc_hi"].iloc[0])
    assert c1["acc_lo"].iloc[0] == pytest.approx(60 - 1.96 * math.sqrt(0.24 / 1003) * 100, abs=0.8)


def ranking_table():
    accs = {"baseline": [80, 70, 60, 50], "swapped": [70, 80, 60, 50], "reversed": [50, 60, 70, 80]}
    return pd.DataFrame([dict(model=f"m{i + 1}", dataset="d", setting=s, scoring="symbol", acc=float(a))
                         for s, v in accs.items() for i, a in enumerate(v)])


def test_kendall_tau_hand_computed():
    k = M.kendall(ranking_table(), ("baseline", "symbol")).set_index("setting")
    assert k.loc["baseline", "tau"] == pytest.approx(1.0)
    assert k.loc["swapped", "tau"] == pytest.approx(4 / 6)  # one discordant pair of six
    assert k.loc["swapped", "tau01"] == pytest.approx(5 / 6)
    assert k.loc["reversed", "tau"] == pytest.approx(-1.0) and k.loc["reversed", "tau01"] == pytest.approx(0.0)


def test_rank_shift_and_delta():
    t = ranking_table()
    rs = M.rank_shift(t, ("baseline", "symbol")).set_index(["setting", "model"])
    assert rs.loc[("swapped", "m1"), "rank"] == 2 and rs.loc[("swapped", "m1"), "shift"] == -1
    assert rs.loc[("swapped", "m2"), "shift"] == 1 and rs.loc[("reversed", "m4"), "shift"] == 3
    d = M.delta_vs_baseline(t, "acc", ("baseline", "symbol"))
    assert d[t["setting"] == "reversed"].tolist() == [-30, -10, 10, 30]


def test_circular_and_permutation_average():
    rows = [row("m", "c", "a", g, g, rotation=r) for r, g in enumerate([0, 1, 2, 3])]
    rows += [row("m", "c", "b", g, g if r else 0 if g else 1, rotation=r) for r, g in enumerate([2, 3, 0, 1])]
    rows += [row("m", "c", "x", 1, 1)]  # only rotation 0: not part of CircularEval
    c = M.circular(rows).iloc[0]
    assert c["n_items"] == 2 and c["circular_acc"] == 50.0 and c["perm_avg_acc"] == 87.5 and c["acc_plain"] == 50.0


def test_pride_prior_recovers_exact_prior():
    prior = np.array([0.55, 0.25, 0.15, 0.05])
    rng = np.random.default_rng(0)
    rows = []
    for it in range(5):
        content = rng.normal(size=4)
        for r in range(4):
            shown = [(i - r) % 4 for i in range(4)]  # position i shows option (i - r) mod 4
            scores = np.log(prior) + content[shown]
            rows.append(row("m", "s", f"i{it}", 0, 0, rotation=r, scores=scores.tolist()))
    est = M.pride_prior(pd.DataFrame(rows))
    assert est[4] == pytest.approx(prior, abs=1e-9)


class BiasedOracle:
    """Knows the right answers; adds a strong bias toward the first position (symbol scoring)."""

    name = "biased"

    def __init__(self, golds, signal=2.0, bias=(3.0, 0.0, 0.0, 0.0)):
        self.golds, self.signal, self.bias = golds, signal, bias

    def _noise(self, *parts):
        h = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
        return float(np.random.default_rng(int.from_bytes(h, "little")).normal())

    def score(self, requests):
        out = []
        for r in requests:
            last = r.prompt.rsplit("\n\n", 1)[-1].splitlines()
            q, opts = last[0], [ln.split(". ", 1)[1] for ln in last[1:-1]]
            lp = [self.signal * (o == self.golds[q]) + self.bias[i] + self._noise(r.prompt, o)
                  for i, o in enumerate(opts)]
            out.append(ScoreResult(symbol_logprobs=lp))
        return out


def test_pride_on_biased_model_raises_accuracy_and_lowers_rstd():
    items = [MCQItem(id=f"q{k}", subject="s", question=f"Question {k}?", choices=tuple(f"o{k}-{j}" for j in range(4)),
                     gold=k % 4) for k in range(400)]
    eng = BiasedOracle({it.question: it.choices[it.gold] for it in items})
    cfg = {"seed": 0, "scorings": ["symbol"], "settings": [{"name": "baseline", "cyclic": 0.1}]}
    rows = [reduce(w, eng.score(w.requests), model=eng.name) for w in expand(items, [], cfg)]
    s, per_item = M.pride(rows, fraction=0.1, seed=0)
    s = s.iloc[0]
    assert 20 <= s["n_calib"] <= 70 and s["n_eval"] == 400 - s["n_calib"]
    assert s["prior"][4][0] > 0.6  # found the bias toward the first position
    assert s["acc_pride"] > s["acc"] + 15
    assert s["rstd_pride"] < s["rstd"] / 2
    assert set(per_item["item_id"]).isdisjoint(
        {r["item_id"] for r in rows if r["rotation"] > 0})  # calibration items are not scored


def test_compute_all_tables():
    rows = rstd_rows() + [dict(r, model="m2", correct=True, prediction=r["gold"]) for r in rstd_rows()]
    t = M.compute_all(rows, ("baseline", "symbol"), n_boot=200)
    assert {"summary", "recall", "kendall", "rank_shift", "forced_gold", "circular", "pride"} <= set(t)
    s = t["summary"].set_index("model")
    assert s.loc["m2", "rank"] == 1 and s.loc["m", "rank"] == 2 and s.loc["m2", "rstd"] == 0.0


def test_per_dataset_baseline():
    t = pd.concat([ranking_table(), ranking_table().assign(dataset="arc")])
    t.loc[(t.dataset == "arc") & (t.setting == "reversed"), "scoring"] = "cloze"
    base = {"*": ("baseline", "symbol"), "arc": ("reversed", "cloze")}
    k = M.kendall(t, base).set_index(["dataset", "setting"])
    assert k.loc[("d", "reversed"), "tau"] == pytest.approx(-1.0)
    assert k.loc[("arc", "reversed"), "tau"] == pytest.approx(1.0)
    assert k.loc[("arc", "baseline"), "tau"] == pytest.approx(-1.0)
    d = M.delta_vs_baseline(t, "acc", base)
    assert d[(t.dataset == "arc") & (t.setting == "baseline")].tolist() == [30, 10, -10, -30]
    with pytest.raises(ValueError, match="no baseline for dataset"):
        M.baseline_for({"d": ("b", "s")}, "arc")
