"""The whole pipeline wired end to end (fake engine for speed; the real engines are exercised by
test_pipeline / test_serve): eval rows become gold preference data, a router trains on them, its
thresholds are calibrated, and one report ties it together."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from rayeval.cli import app
from rayeval.route.routers import load_router
from rayeval.workflow import (WorkflowConfig, declare_pair, demo_threshold, gold_outcomes, load_workflow_config,
                              pair_gap, rank_uncertainty, run_workflow)


@pytest.mark.ray
def test_workflow_fake_engine_no_serve(tmp_path):
    cfg = load_workflow_config(None)
    assert isinstance(cfg, WorkflowConfig) and cfg.router["name"] == "knn"
    res = run_workflow(cfg, tmp_path, serve=False, engine={"kind": "fake"})
    rep = (tmp_path / "report.md").read_text()
    for section in ("Benchmark sensitivity", "Gold preference data", "Routers"):
        assert section in rep
    assert len(set(res["pair"])) == 2 and "Gap strong - weak:" in rep and "acc_95ci" in rep
    assert "Rank changes beyond noise" in rep
    g = res["gap"]
    assert g["gap_lo"] <= g["gap"] <= g["gap_hi"]
    if g["gap_lo"] <= 0 <= g["gap_hi"]:  # within noise: the report says so and shows RouteLLM's pair
        assert "**The gap is within noise**" in rep and "The same routers on routellm:mmlu" in rep
    ref = rep.split("The same routers on routellm:mmlu")[-1]
    apgr = [float(line.split("|")[2]) for line in ref.splitlines() if line.startswith("| knn")]
    assert apgr and all(0.3 < a < 1 for a in apgr)  # finite, measured on a real strong/weak pair
    thr = json.loads((tmp_path / "router" / "thresholds.json").read_text())["thresholds"]
    assert [float(k) for k in thr] == cfg.targets
    assert thr["0.25"] >= thr["0.5"] >= thr["0.75"]  # more strong calls need a lower threshold
    router = load_router(tmp_path / "router")
    p = router.win_probability(["What is the capital of France?", "Integrate x^2 from 0 to 1."])
    assert p.shape == (2,) and ((0 <= p) & (p <= 1)).all()
    assert res["timings_s"]["total"] > 0


def test_workflow_config_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\nrouterr: {name: knn}\n")
    r = CliRunner().invoke(app, ["pipeline", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown key(s) ['routerr']" in r.stderr


# ----------------------------------------------------------------------------- the pair, the gap, ranks


def _rows(correct: dict, dataset="mmlu", setting="baseline", scoring="symbol"):
    return pd.DataFrame([{"model": m, "dataset": dataset, "setting": setting, "scoring": scoring, "rotation": 0,
                          "item_id": f"i{i}", "subject": "s", "question": f"question {i}?", "correct": bool(c)}
                         for m, cs in correct.items() for i, c in enumerate(cs)])


def test_gold_pair_tie_is_an_error_and_the_config_can_name_the_pair():
    tied = gold_outcomes(_rows({"a": [1, 0, 1, 0], "b": [0, 1, 1, 0]}), {"setting": "baseline", "scoring": "symbol"})
    with pytest.raises(ValueError, match=r"cannot tell strong from weak.*set `pair: \[strong, weak\]`"):
        declare_pair(tied, None)
    o = declare_pair(tied, ["b", "a"])
    assert o.strong_weak() == ("b", "a") and o.subset([0, 1]).strong_weak() == ("b", "a")
    with pytest.raises(ValueError, match=r"pair: .*model\(s\) \['c'\]"):
        declare_pair(tied, ["c", "a"])
    gap = pair_gap(o, n_boot=200)
    assert gap["gap"] == 0 and gap["within_noise"] and gap["ties"] == 0.5


def test_pair_gap_ci_excludes_zero_for_a_real_gap():
    rng = np.random.default_rng(0)
    s, w = rng.random(300) < 0.7, rng.random(300) < 0.3
    o = declare_pair(gold_outcomes(_rows({"s": s, "w": w}), {"setting": "baseline", "scoring": "symbol"}), None)
    g = pair_gap(o, n_boot=300)
    assert (g["strong"], g["weak"]) == ("s", "w") and not g["within_noise"]
    assert g["gap"] == pytest.approx(s.mean() - w.mean()) and 0 < g["gap_lo"] < g["gap"] < g["gap_hi"]


def test_gold_rows_can_use_another_scoring_per_dataset():
    rows = pd.concat([_rows({"a": [1, 0], "b": [0, 0]}, "mmlu", scoring="hybrid"),
                      _rows({"a": [1, 1], "b": [0, 1]}, "arc", scoring="cloze"),
                      _rows({"a": [0, 0], "b": [1, 1]}, "arc", scoring="hybrid")])
    o = gold_outcomes(rows, {"setting": "baseline", "scoring": "hybrid", "datasets": {"arc": {"scoring": "cloze"}}})
    assert len(o) == 4 and o.mean_scores().to_dict() == {"a": 0.75, "b": 0.25}
    with pytest.raises(ValueError, match=r"no eval rows of dataset 'arc' for setting='baseline' scoring='symbol'"):
        gold_outcomes(rows, {"setting": "baseline", "scoring": "symbol", "datasets": {"mmlu": {"scoring": "hybrid"}}})


@pytest.mark.parametrize("patch,msg", [
    ({"pair": ["gemma3-270m", "gemma3-270m"]}, "pair: strong and weak are the same model"),
    ({"pair": ["gemma3-270m"]}, r"pair: expected \[strong, weak\]"),
    ({"reference": {"when": "sometimes"}}, "reference.when: 'sometimes' is not one of"),
    ({"reference": {"limit": -1}}, "reference.limit: must be an integer >= 0"),
    ({"reference": {"limt": 5}}, r"reference: unknown key\(s\) \['limt'\]"),
    ({"gold": {"setting": "baseline"}}, "gold: needs a 'scoring' string"),
    ({"serve": {"target_share": 1.5}}, r"serve.target_share: 1.5 is not in \(0, 1\)"),
])
def test_workflow_config_errors_name_the_key(tmp_path, patch, msg):
    import yaml

    from rayeval.config import CONFIG_DIR

    d = yaml.safe_load((CONFIG_DIR / "pipeline_small.yaml").read_text())
    d.update(patch)
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ValueError, match=msg):
        load_workflow_config(p)


def test_demo_threshold_shows_both_paths():
    assert demo_threshold([0.2, 0.6, 0.4, 0.8], 0.5) == (0.5, "calibrated")
    thr, how = demo_threshold([0.6, 0.7, 0.9, 0.7], 0.5)  # calibrated: all strong
    p = np.array([0.6, 0.7, 0.9, 0.7])
    assert thr == 0.7 and (p >= thr).any() and (p < thr).any() and "median split" in how
    thr, how = demo_threshold([0.3, 0.3], 0.5)
    assert thr == 0.5 and "all go weak" in how


def test_rank_table_carries_intervals_and_names_the_changes_beyond_noise():
    from rayeval.eval.metrics import compute_all

    rng = np.random.default_rng(1)
    n = 300
    base = {"a": rng.random(n) < 0.7, "b": rng.random(n) < 0.3}          # a clearly ahead
    flip = {"a": rng.random(n) < 0.2, "b": rng.random(n) < 0.8}          # b clearly ahead: a real swap
    noise = {"a": rng.random(n) < 0.47, "b": rng.random(n) < 0.53}       # a coin flip
    rows = pd.concat([_rows(base), _rows(flip, setting="flip"), _rows(noise, setting="noise")], ignore_index=True)
    rows["prediction"], rows["gold"], rows["n_options"] = np.where(rows.correct, 0, 1), 0, 2
    m = compute_all(rows, ("baseline", "symbol"), n_boot=300)
    summ = m["summary"]
    moved = summ[summ["shift"] != 0]
    assert set(moved.setting) == {"flip", "noise"}, "fixture: both settings must swap the two models"
    t, lines, n_changes = rank_uncertainty(summ, m["rank_shift"])
    assert n_changes == 4 and len(lines) == 2  # a and b in "flip"; the coin flip is within noise
    assert all("flip/symbol" in x for x in lines) and not any("noise" in x for x in lines)
    r = t[(t.model == "a") & (t.setting == "flip")].iloc[0]
    assert r.rank_95ci == "[2, 2]" and r.shift_95ci == "[-1, -1]"
    assert r.acc_95ci == f"[{r.acc_lo:.1f}, {r.acc_hi:.1f}]"
    noisy = t[(t.setting == "noise") & (t["rank"] == 2)].iloc[0]
    assert noisy.rank_95ci == "[1, 2]" and not noisy.shift_significant  # the interval spans both ranks
