"""Routing data: RouteLLM/RouterBench loaders, battles JSONL, eval-output integration, io."""

import json

import numpy as np
import pandas as pd
import pytest

from rayeval.data.schema import DataValidationError
from rayeval.prefs.outcomes import (ROUTELLM_STRONG, ROUTELLM_WEAK, Outcomes, Preferences, load_battles_jsonl,
                                 load_routellm, load_routerbench, outcomes_from_eval)


@pytest.mark.parametrize("bench,n,n_raw,q_strong,q_weak", [
    ("mmlu", 14037, 14042, 0.806, 0.681),
    ("gsm8k", 1307, 1319, 0.858, 0.637),
    ("mt_bench", 72, 80, 9.21, 8.28),
])
def test_routellm_contaminated_prompts_dropped(bench, n, n_raw, q_strong, q_weak):
    o = load_routellm(bench)
    assert len(o) == n and o.meta["n_raw"] == n_raw
    assert o.models[:2] == [ROUTELLM_STRONG, ROUTELLM_WEAK]
    m = o.mean_scores()
    assert m[ROUTELLM_STRONG] == pytest.approx(q_strong, abs=0.005)
    assert m[ROUTELLM_WEAK] == pytest.approx(q_weak, abs=0.005)
    assert o.strong_weak() == (ROUTELLM_STRONG, ROUTELLM_WEAK)
    assert not o.scores.isna().any().any()


def test_routellm_keep_contaminated_and_mmlu_groups():
    o = load_routellm("gsm8k", drop_contaminated=False)
    assert len(o) == 1319
    mm = load_routellm("mmlu")
    assert len(set(mm.groups)) == 57 and "anatomy" in set(mm.groups)
    t1 = load_routellm("mt_bench", mt_bench_turns=(1,))
    assert t1.mean_scores()[ROUTELLM_STRONG] == pytest.approx(9.38, abs=0.01)


def test_routellm_bad_cell_reports_file_line_field(tmp_path):
    d = tmp_path / "mmlu" / "responses"
    d.mkdir(parents=True)
    pd.DataFrame({"prompt": ["q1", "q2", "q3"], ROUTELLM_WEAK: ["True", "maybe", "False"],
                  ROUTELLM_STRONG: ["True", "True", "False"]}).to_csv(d / "mmlu_x.csv", index=False)
    with pytest.raises(DataValidationError) as e:
        load_routellm("mmlu", root=tmp_path)
    msg = str(e.value)
    assert "mmlu_x.csv:3" in msg and ROUTELLM_WEAK in msg and "maybe" in msg


def test_routerbench_models_costs():
    o = load_routerbench("mbpp", "test")
    assert len(o) == 128 and len(o.models) == 11
    assert o.costs is not None and (o.costs.to_numpy() > 0).all()
    best = o.mean_scores().idxmax()
    assert o.costs[best].mean() > o.costs.mean().min()
    arc = load_routerbench("arc_challenge", "train")
    assert arc.meta["n_raw"] == 1039 and len(arc) == 1039 - arc.meta["n_dropped"] and arc.meta["n_dropped"] > 0
    assert not arc.texts[0].startswith("['")


def _eval_rows():
    rows = []
    corr = {"big": [1, 1, 1, 0, 1], "mid": [1, 0, 1, 0, 1], "small": [0, 0, 1, 1, 0]}
    for m, cs in corr.items():
        for i, c in enumerate(cs):
            rows.append({"model": m, "item_id": f"it{i}", "question": f"question {i}?", "subject": "s" + str(i % 2),
                         "correct": bool(c), "cost": {"big": 3.0, "mid": 2.0, "small": 1.0}[m]})
    return pd.DataFrame(rows)


def test_outcomes_from_eval_parquet_and_pairwise(tmp_path):
    p = tmp_path / "eval.parquet"
    _eval_rows().sample(frac=1, random_state=0).to_parquet(p)
    o = outcomes_from_eval(p)
    assert len(o) == 5 and sorted(o.models) == ["big", "mid", "small"]
    assert o.strong_weak() == ("big", "small")
    assert o.scores.loc[o.queries.query_id == "it3", "small"].item() == 1.0
    assert o.costs["big"].eq(3.0).all()
    prefs = o.to_preferences()
    assert len(prefs) == 15  # 3 pairs x 5 items
    lab = prefs.strong_labels("big", "small").set_index("query_id")
    assert lab.loc["it0", "y"] == 1.0 and lab.loc["it2", "y"] == 0.5 and lab.loc["it3", "y"] == 0.0
    # io round trips
    o2 = Outcomes.load(o.save(tmp_path / "o.parquet"))
    pd.testing.assert_frame_equal(o.scores, o2.scores)
    pd.testing.assert_frame_equal(o.costs, o2.costs)
    p2 = Preferences.load(prefs.save(tmp_path / "p.parquet"))
    pd.testing.assert_frame_equal(prefs.df, p2.df)


def test_outcomes_from_eval_rejects_duplicates_and_bad_scores():
    df = _eval_rows()
    with pytest.raises(DataValidationError, match="duplicate"):
        outcomes_from_eval(pd.concat([df, df.iloc[:1]]))
    bad = df.copy()
    bad["correct"] = bad["correct"].astype(object)
    bad.loc[2, "correct"] = "perhaps"
    with pytest.raises(DataValidationError, match=r"<dataframe>:3: field 'correct'"):
        outcomes_from_eval(bad)
    with pytest.raises(ValueError, match="question"):
        outcomes_from_eval(df.drop(columns=["question"]))


def test_battles_jsonl(tmp_path):
    p = tmp_path / "b.jsonl"
    rows = [
        {"question": "hi", "model_a": "gpt", "model_b": "llama", "winner": "model_a"},
        {"prompt": [{"role": "user", "content": "sum 2+2"}], "model_a": "llama", "model_b": "gpt", "winner": "tie (bothbad)"},
        {"question": "hi", "model_a": "llama", "model_b": "gpt", "winner": "model_b"},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prefs = load_battles_jsonl(p)
    assert prefs.df["winner"].tolist() == ["a", "tie", "b"]
    assert prefs.df["query"].tolist()[1] == "sum 2+2"
    lab = prefs.strong_labels("gpt", "llama")
    assert dict(zip(lab["query"], lab["y"])) == {"hi": 1.0, "sum 2+2": 0.5}
    assert lab.set_index("query").loc["hi", "n"] == 2
    rows.append({"question": "x", "model_a": "a", "model_b": "b", "winner": "model_c"})
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataValidationError, match=r"b\.jsonl:4: field 'winner'"):
        load_battles_jsonl(p)


def _tied_outcomes():
    # Both models right on 2 of 4 items, on different items: same mean, real disagreements.
    q = pd.DataFrame({"query_id": [f"q{i}" for i in range(4)], "query": [f"question {i}" for i in range(4)]})
    return Outcomes(q, pd.DataFrame({"m1": [1, 1, 0, 0], "m2": [0, 1, 1, 0]}), name="tied")


def test_strong_weak_tie_is_an_error_or_broken_by_declared_order():
    o = _tied_outcomes()
    with pytest.raises(ValueError, match=r"cannot tell strong from weak.*mean score 0\.5 \(m1, m2\)"):
        o.strong_weak()
    with pytest.raises(ValueError, match="cannot tell strong from weak"):
        o.pair_arrays()  # what the routers and APGR use when no pair is given
    assert o.strong_weak(order=["m2", "m1"]) == ("m2", "m1")
    assert o.strong_weak(order=["m1", "other", "m2"]) == ("m1", "m2")
    with pytest.raises(ValueError, match="cannot tell"):  # an order naming one of them does not decide
        o.strong_weak(order=["m1"])
    # A gap decides without any order; one model is never a pair.
    o.scores.loc[2, "m1"] = 1.0
    assert o.strong_weak() == ("m1", "m2")
    with pytest.raises(ValueError, match="needs two models"):
        o.select_models(["m1"]).strong_weak()


def test_declared_pair_is_checked_and_kept_by_subsets():
    o = _tied_outcomes().with_pair("m2", "m1")
    assert o.strong_weak() == ("m2", "m1")
    assert o.subset([0, 1]).strong_weak() == ("m2", "m1")  # cross-fitted folds keep the pair
    s, w = o.pair_arrays()
    assert s.tolist() == [0, 1, 1, 0] and w.tolist() == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="strong and weak are the same model 'm1'"):
        _tied_outcomes().with_pair("m1", "m1")
    with pytest.raises(ValueError, match=r"model\(s\) \['m3'\] of the pair"):
        _tied_outcomes().with_pair("m3", "m1")
    with pytest.raises(ValueError, match="same model"):
        _tied_outcomes().pair_arrays("m2", "m2")
