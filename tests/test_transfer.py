"""Router transfer to new model pairs on RouterBench, and the issue-8 report section."""

import numpy as np
import pandas as pd
import pytest

from rayeval.prefs.outcomes import Outcomes, load_routerbench
from rayeval.route.transfer import (augment_markdown, rank_pairs, transfer_markdown, transfer_study, transfer_table,
                                    write_augment_report)


def test_rank_pairs(shared_data):
    tr = load_routerbench("mbpp", "train")
    order = tr.mean_scores().sort_values(ascending=False).index.tolist()
    pairs = rank_pairs(tr)
    assert pairs[0] == (order[0], order[-1]) and pairs[1] == (order[1], order[-2])
    assert len(pairs) == 4 and all(tr.mean_scores()[s] >= tr.mean_scores()[w] for s, w in pairs)
    with pytest.raises(ValueError, match="twice"):
        rank_pairs(tr, [(0, 0)])


def test_transfer_table_on_routerbench(shared_data):
    tab = transfer_study(["mbpp"], router="knn", params={"k": 20}, n_boot=30)
    assert len(tab) == 16  # 4 pairs x 4 pairs
    same = tab[tab.same_pair]
    assert len(same) == 4 and (same.delta == 0).all() and (same.apgr_same == same.apgr_transferred).all()
    off = tab[~tab.same_pair]
    assert off.delta_lo.notna().all() and (off.delta_lo <= off.delta_hi).all()
    assert np.allclose(off.delta, off.apgr_transferred - off.apgr_same)
    assert tab.apgr_same.between(0, 1).all() and (tab.n_test == len(load_routerbench("mbpp", "test"))).all()
    # a router fitted on its own pair beats random (0.5) on average on this task
    assert same.apgr_same.mean() > 0.55
    md = transfer_markdown(tab)
    assert md.count("\n| mbpp |") == 12 + 1 and "mean delta" in md


def test_pair_free_router_transfers_exactly():
    """A router that ignores the labels (prompt length) scores the same whatever pair it was fitted
    on, so transferred == same pair, to the last digit -- a check of the bookkeeping."""
    rng = np.random.default_rng(0)
    n = 200
    q = pd.DataFrame({"query_id": [f"q{i}" for i in range(n)], "query": ["x" * int(k) for k in rng.integers(1, 400, n)]})
    S = pd.DataFrame(rng.integers(0, 2, (n, 4)).astype(float), columns=["m0", "m1", "m2", "m3"])
    S["m0"] = np.maximum(S["m0"], S["m1"])  # make m0 the strongest
    oc = Outcomes(q, S)
    tab = transfer_table(oc.subset(np.arange(120)), oc.subset(np.arange(120, n)), [("m0", "m3"), ("m1", "m2")],
                         router="length", n_boot=0)
    assert np.allclose(tab.delta, 0) and tab.delta_lo.isna().all()
    with pytest.raises(KeyError):
        transfer_table(oc, oc, [("m0", "nope")], router="length")


def test_augment_report_files(tmp_path):
    tab = pd.DataFrame([{"task": "t", "router": "knn", "train_pair": "a / b", "test_pair": "c / d", "same_pair": False,
                         "n_test": 10, "gap": 0.2, "apgr_same": 0.7, "apgr_transferred": 0.6, "delta": -0.1,
                         "delta_lo": -0.2, "delta_hi": 0.05}])
    stats = {"judge": "j", "n_pairs": 2, "n_calls": 4, "position_bias_rate": 0.5, "first_position_both": 0.5,
             "second_position_both": 0.0, "first_position_share": 0.75, "second_position_share": 0.25,
             "tie_call_share": 0.0, "position_offset_nats": 1.0, "winner_shares_agree": {"a": 0.5, "b": 0, "tie": 0.5},
             "winner_shares_debiased": {"a": 1.0, "b": 0, "tie": 0}, "per_model": {"x": {"win": 0.5, "tie": 0.5}}}
    sim = {"rows": [{"train": "T", "bench": "B", "score": 0.5, "n_train": 3, "held_out": 0}], "embedder": "e",
           "sample": 10, "seed": 0}
    files = write_augment_report(tmp_path, transfer=tab, judge_stats=stats, similarity=sim)
    md = files["report"].read_text()
    assert md == augment_markdown(stats, sim, tab)
    assert "position-bias rate" in md and "| T (n=3) | 0.5000 |" in md and "| t | a / b | c / d | 0.700 | 0.600 |" in md
    assert (tmp_path / "transfer.csv").exists() and (tmp_path / "similarity.json").exists()
    # the routing report takes it as extra markdown
    from rayeval.route.evaluate import EvalResult, write_report

    assert "extra_md" in write_report.__code__.co_varnames and EvalResult


def test_fewshot_prompts_are_cut_to_their_final_question(shared_data):
    from rayeval.prefs.similarity import final_question
    from rayeval.route.transfer import routed_queries

    assert final_question("Q1\nA) x\nAnswer:\nA\n\nQ2\nA) y\nAnswer:") == "Q2\nA) y\nAnswer:"
    assert final_question("single block") == "single block"
    raw = load_routerbench("arc_challenge", "test")
    cut = routed_queries(raw)
    # the raw prompts share a long 5-shot prefix; the final questions are (nearly) all distinct
    assert cut.queries["query"].nunique() > 0.95 * len(cut)
    assert cut.queries["query"].str.len().mean() < 0.3 * raw.queries["query"].str.len().mean()
    assert (cut.scores.to_numpy() == raw.scores.to_numpy()).all()
