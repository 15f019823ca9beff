"""The Ray Data evaluation pipeline: outputs, resume, and a crashed engine actor."""

import json

import pandas as pd
import pytest

from rayeval.eval.config import EvalConfig
from rayeval.eval.pipeline import run_eval

KEY = ["model", "dataset", "setting", "scoring", "item_id", "rotation"]


def small_config(**over) -> EvalConfig:
    d = {
        "name": "pipe_test",
        "models": ["model-a", "model-b"],
        "batch_size": 8,
        "datasets": [{"name": "mmlu", "split": "test", "subjects": ["marketing", "anatomy"], "limit": 6},
                     {"name": "arc_challenge", "split": "test", "limit": 5, "template": "arc"}],
        "scorings": ["symbol", {"name": "hybrid"}, {"name": "cloze"}],
        "settings": [{"name": "baseline", "cyclic": 0.5},
                     {"name": "gold_B", "perturbations": [{"name": "fix_gold", "position": 1}], "scorings": ["symbol"]},
                     {"name": "rare", "perturbations": [{"name": "symbols", "set": "rare"}], "scorings": ["symbol"]}],
        "metrics": {"n_boot": 50},
    }
    d.update(over)
    return EvalConfig.from_dict(d)


def _rows(out):
    return pd.read_parquet(out / "rows.parquet").sort_values(KEY, ignore_index=True)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    res = run_eval(small_config(), out, engine={"kind": "fake"})
    return out, res


@pytest.mark.ray
def test_clean_run_outputs(clean_run):
    out, res = clean_run
    assert res["complete"] and (out / "report.md").exists() and (out / "metrics.json").exists()
    rows = _rows(out)
    # every (model, work unit) exactly once
    assert not rows.duplicated(KEY).any()
    per_model = rows.groupby("model").size()
    assert set(per_model.index) == {"model-a", "model-b"} and per_model.nunique() == 1
    assert res["rows"] == len(rows)
    gb = rows[rows.setting == "gold_B"]
    assert (gb.gold == 1).all()
    rare = rows[rows.setting == "rare"]
    assert all(list(s)[:4] == ["œ", "§", "З", "ü"] for s in rare.symbols)
    assert set(rows.scoring) == {"symbol", "hybrid", "cloze"}
    assert (rows.correct == (rows.prediction == rows.gold)).all()
    m = json.loads((out / "metrics.json").read_text())
    assert {"summary", "kendall", "rank_shift", "pride", "circular"} <= set(m["tables"])
    # accounting: each model's engine start (its actor's imports and engines) beside its compute time
    acct = json.loads((out / "run.json").read_text())["accounting"]["models"]
    assert set(acct) == {"model-a", "model-b"} and all(a["engine_start_s"] >= 0 for a in acct.values())
    assert "engine start s" in (out / "report.md").read_text()


@pytest.mark.ray
def test_resume_recomputes_only_missing_shards(clean_run, tmp_path):
    out, res = clean_run
    part = run_eval(small_config(), tmp_path, engine={"kind": "fake"}, stop_after=2, report=False)
    assert not part["complete"]
    n_before = len(list((tmp_path / "shards").glob("part-*.parquet")))
    assert 2 <= n_before < res["shards"]
    again = run_eval(small_config(), tmp_path, engine={"kind": "fake"}, report=False)
    assert again["complete"] and again["written"] == res["shards"] - n_before
    pd.testing.assert_frame_equal(_rows(tmp_path), _rows(out))


def _score_actors() -> set[str]:
    from ray._private.state import actors

    return {k for k, a in actors().items() if "ScoreActor" in a["ActorClassName"]}


@pytest.mark.ray
def test_an_actor_pool_per_model_or_one_shared_pool_same_rows(clean_run, tmp_path):
    """``pools: model`` (the default: clean_run) runs an actor per model, each hosting that model's
    engine; ``pools: shared`` one actor hosting both.  The rows are the same."""
    out, res = clean_run
    before = _score_actors()
    run_eval(small_config(), tmp_path / "model", engine={"kind": "fake"}, report=False)
    per_model = _score_actors() - before
    run_eval(small_config(), tmp_path / "shared", engine={"kind": "fake", "pools": "shared"}, report=False)
    shared = _score_actors() - before - per_model
    assert (len(per_model), len(shared)) == (2, 1)
    pd.testing.assert_frame_equal(_rows(tmp_path / "model"), _rows(out))
    pd.testing.assert_frame_equal(_rows(tmp_path / "shared"), _rows(out))


@pytest.mark.ray
def test_resume_refuses_other_config(clean_run):
    out, _ = clean_run
    with pytest.raises(ValueError, match="different config"):
        run_eval(small_config(seed=7), out, engine={"kind": "fake"})


@pytest.mark.ray
def test_crashed_actor_is_restarted_and_rows_exactly_once(clean_run, tmp_path):
    out, res = clean_run
    marker = tmp_path / "crashed"
    got = run_eval(small_config(), tmp_path / "run", engine={"kind": "fake", "fault": {"crash_on_shard": 1, "marker": str(marker)}})
    assert marker.exists(), "the fault hook never fired"
    assert got["complete"] and got["rows"] == res["rows"]
    pd.testing.assert_frame_equal(_rows(tmp_path / "run"), _rows(out))


@pytest.mark.engine
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_vllm_engine_core_killed_mid_eval_is_retried_rows_exactly_once(tmp_path):
    """The OOM killer takes a vLLM engine-core process while its actor is scoring a shard: the
    call fails instead of hanging, the actor exits, Ray restarts it, the shard is retried, and
    the rows are those of an undisturbed run, each once."""
    cfg = small_config(name="core_kill", models=["smollm2-135m"], batch_size=4, scorings=["symbol"],
                       datasets=[{"name": "mmlu", "split": "test", "subjects": ["marketing"], "limit": 6}],
                       settings=[{"name": "baseline"},
                                 {"name": "gold_B", "perturbations": [{"name": "fix_gold", "position": 1}],
                                  "scorings": ["symbol"]}],
                       engine={"max_model_len": 1024})
    clean = run_eval(cfg, tmp_path / "clean", engine={"kind": "vllm", "cache": False}, report=False)
    marker = tmp_path / "killed"
    got = run_eval(cfg, tmp_path / "run", report=False, engine={
        "kind": "vllm", "cache": False, "fault": {"kill_engine_core_on_shard": 1, "marker": str(marker)}})
    assert marker.exists() and json.loads(marker.read_text()), "no engine-core process was killed"
    assert clean["shards"] >= 3 and got["complete"] and got["rows"] == clean["rows"]
    rows = _rows(tmp_path / "run")
    assert not rows.duplicated(KEY).any()
    pd.testing.assert_frame_equal(rows, _rows(tmp_path / "clean"))


@pytest.mark.engine
@pytest.mark.ray
def test_real_vllm_pipeline_both_models(tmp_path):
    """Both packaged models through Ray Data + real vLLM engines: every perturbation family,
    all three scorings, real MMLU and ARC items; then the rows train a router as gold data."""
    cfg = small_config(
        name="real_small", models=["smollm2-135m", "gemma3-270m"], batch_size=16,
        datasets=[{"name": "mmlu", "split": "test", "subjects": ["marketing"], "limit": 4},
                  {"name": "arc_challenge", "split": "test", "limit": 3, "template": "arc"}],
        settings=[{"name": "baseline"},
                  {"name": "derange", "perturbations": ["derange"], "scorings": ["symbol"]},
                  {"name": "gold_C", "perturbations": [{"name": "fix_gold", "position": 2}], "scorings": ["symbol"]},
                  {"name": "rare", "perturbations": [{"name": "symbols", "set": "rare"}], "scorings": ["symbol"]},
                  {"name": "shot1", "shots": {"k": 1, "source": "dev"}, "scorings": ["symbol"]}],
        engine={"max_model_len": 1024})
    res = run_eval(cfg, tmp_path, engine={"kind": "vllm"})
    rows = _rows(tmp_path)
    assert res["complete"] and not rows.duplicated(KEY).any()
    assert set(rows.model) == {"smollm2-135m", "gemma3-270m"}
    assert set(rows.scoring) == {"symbol", "hybrid", "cloze"}
    assert len(rows) == 2 * (7 * 3 + 4 * 7)
    finite = rows.per_option_raw_logprob.map(lambda xs: all(-1e8 < x < 0 for x in xs))
    assert finite.all(), rows[~finite][["model", "setting", "scoring", "per_option_raw_logprob"]]
    # two different real models do not produce identical scores
    a = rows[rows.model == "smollm2-135m"].per_option_raw_logprob.map(tuple).tolist()
    b = rows[rows.model == "gemma3-270m"].per_option_raw_logprob.map(tuple).tolist()
    assert a != b
    assert (tmp_path / "report.md").read_text().count("smollm2-135m") >= 1
    # a real engine's start (vLLM's engine core, model load) is told per model in run.json
    assert all(a["engine_start_s"] > 1 for a in res["accounting"]["models"].values())

    from rayeval.prefs.outcomes import outcomes_from_eval
    from rayeval.route.routers import ROUTERS

    gold = rows[(rows.setting == "baseline") & (rows.scoring == "symbol") & (rows.rotation == 0)]
    # 7 items: the two models may tie, so the pair is declared (a tie without one is an error)
    outcomes = outcomes_from_eval(gold).with_pair("smollm2-135m", "gemma3-270m")
    assert len(outcomes.queries) == 7 and outcomes.strong_weak() == ("smollm2-135m", "gemma3-270m")
    router = ROUTERS["length"]().fit(outcomes)
    p = router.win_probability(gold.question.unique().tolist())
    assert p.shape == (7,) and ((p >= 0) & (p <= 1)).all()
