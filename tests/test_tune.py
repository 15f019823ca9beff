"""rayeval.tune: search spaces, a small real tuning run (ASHA), export, calibration, resume, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ray import tune as rtune

from rayeval import tune as T

SMALL = {
    "name": "tune_test",
    "data": {"source": "routellm:mmlu", "subsample": 2000, "seed": 0, "valid_fraction": 0.25, "test_fraction": 0.25},
    "search": {"type": "random", "seed": 0},
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "resources_per_trial": {"cpu": 1},
    "max_concurrent_trials": 1,  # sequential: ASHA's decisions do not depend on timing
    "routers": [
        {"name": "knn", "num_samples": 3},
        {"name": "mf", "num_samples": 6, "params": {"batch_size": 128},
         "space": {"dim": [16, 64], "lr": {"loguniform": [1e-4, 1e-2]}, "epochs": [4]}},
    ],
    "calibration": {"targets": [0.2, 0.5, 0.8], "budgets": [0.3]},
    "num_cpus": 2,
}


# -- no Ray ------------------------------------------------------------------------------------
def test_to_domain_translates_plain_values():
    from ray.tune.search.sample import Categorical, Float, Integer

    assert isinstance(T.to_domain([1, 2, 3]), Categorical)
    assert T.to_domain([1, 2], grid=True) == {"grid_search": [1, 2]}
    lu = T.to_domain(("loguniform", 1e-4, 1e-2))
    assert isinstance(lu, Float) and (lu.lower, lu.upper) == (1e-4, 1e-2)
    assert isinstance(T.to_domain({"uniform": [0, 1]}), Float)
    ri = T.to_domain(("randint", 1, 10))
    assert isinstance(ri, Integer) and (ri.lower, ri.upper) == (1, 10)
    assert T.to_domain({"grid": [1, 2]}) == {"grid_search": [1, 2]}
    assert T.to_domain(5) == 5 and T.to_domain("x") == "x"


def test_search_space_from_router_declaration():
    from rayeval.route.routers import ROUTERS

    sp = T.search_space("mf", {"epochs": [2, 4]}, {"batch_size": 64})
    assert set(ROUTERS["mf"].SEARCH_SPACE) <= set(sp)
    assert sp["router"] == "mf" and sp["batch_size"] == 64
    assert sp["epochs"].categories == [2, 4]
    assert T.max_epochs("mf", sp) == 4 and T.max_epochs("knn", T.search_space("knn")) == 1
    d = T.default_params("knn", T.search_space("knn"))
    assert d["k"] == 50  # constructor default of a searched parameter
    # every registered router's declared space translates
    for name in ROUTERS:
        T.search_space(name)


def test_epoch_points_follow_asha_rungs():
    assert T.epoch_points(8, 1, 2) == [1, 2, 4, 8]
    assert T.epoch_points(10, 2, 3) == [2, 6, 10]
    assert T.epoch_points(5, every=True) == [1, 2, 3, 4, 5]
    assert T.epoch_points(1) == [1]


def test_config_validation(tmp_path):
    cfg = T.TuneConfig.from_yaml("tune_small")
    assert {r.name for r in cfg.routers} >= {"knn", "mf"}
    with pytest.raises(ValueError, match="unknown router"):
        T.TuneConfig.from_dict({"routers": [{"name": "nope"}]})
    with pytest.raises(ValueError, match="no parameter"):
        T.TuneConfig.from_dict({"routers": [{"name": "knn", "space": {"kk": [1]}}]})
    with pytest.raises(ValueError, match="unknown key"):
        T.TuneConfig.from_dict({"scheduler": {"grace": 1}})
    c = T.CalibrationSpec(targets=[0.5], budgets=[0.25], cost_strong=1.0, cost_weak=0.0)
    assert [t["target_share"] for t in T.calibration_targets(c)] == [0.5, 0.25]


# -- a real tuning run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from rayeval.cluster import init_ray

    ray.shutdown()  # a cluster left by earlier tests may have fewer CPUs than the trials need
    init_ray(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def small_run(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    return T.run(SMALL, out=out), out


@pytest.mark.ray
def test_small_run_asha_and_best_beats_default(small_run):
    s, out = small_run
    trials = pd.read_csv(out / "trials.csv")
    assert s["trials_per_router"] == {"knn": 3, "mf": 6}
    assert trials["error"].isna().all()
    assert s["n_stopped_early"] >= 1  # ASHA stopped at least one MF trial before its last epoch
    stopped = trials[trials["stopped_early"]]
    assert (stopped["epoch"] < stopped["epochs"]).all()
    best, default = s["best"], s["defaults"][s["best"]["router"]]
    assert best["valid"]["apgr"] >= default["valid"]["apgr"] - 1e-9
    assert best["test"]["apgr"] >= default["test"]["apgr"]
    assert (out / "experiments" / "mf").is_dir() and rtune.Tuner.can_restore(str(out / "experiments" / "mf"))


@pytest.mark.ray
def test_export_loads_and_reproduces_apgr(small_run):
    from rayeval.route.routers import Router

    s, out = small_run
    router, doc = T.load_tuned(out / "best")
    assert isinstance(Router.load(out / "best"), type(router))
    assert doc["router"] == router.name and doc["params"] == json.loads(json.dumps(router.get_params()))
    data = T.prepare_data(T.TuneConfig.from_dict(SMALL).data)
    assert T.evaluate_router(router, data, "valid")["apgr"] == pytest.approx(doc["valid_apgr"])
    assert T.evaluate_router(router, data, "test")["apgr"] == pytest.approx(doc["test_apgr"])
    trials = pd.read_csv(out / "trials.csv")
    assert doc["valid_apgr"] == pytest.approx(trials["valid_apgr"].max())
    # refitting the exported configuration from scratch gives the same router
    again = type(router)(**router.get_params()).fit(data.train, T._train_embeddings(router, data))
    p1 = router.win_probability(data.test.texts, data.embeddings("test", router.embedder), groups=data.test.groups)
    p2 = again.win_probability(data.test.texts, data.embeddings("test", router.embedder), groups=data.test.groups)
    np.testing.assert_allclose(p1, p2, atol=1e-6)
    # thresholds: one per target share and budget, achieved shares near the targets
    assert set(doc["thresholds"]) == {"0.2", "0.5", "0.8", "0.3"}
    for row in doc["calibration"]:
        assert abs(row["achieved_share"] - row["target_share"]) < 0.1
    p = router.win_probability(data.test.texts, data.embeddings("test", router.embedder), groups=data.test.groups)
    assert (p >= doc["thresholds"]["0.5"]).mean() == pytest.approx(
        next(r["achieved_share"] for r in doc["calibration"] if r["target_share"] == 0.5))


@pytest.mark.ray
def test_interrupted_run_resumes_from_checkpoints(ray_cluster, tmp_path):
    """A trial crashes (after its first checkpoint); the run stops with an error; `--resume`
    restores the experiments (Tuner.restore), continues the crashed trial from its checkpoint and
    completes every trial."""
    from typer.testing import CliRunner

    marker = tmp_path / "fail-once"
    marker.write_text("x")
    cfg = {**SMALL, "routers": [{"name": "mf", "num_samples": 3, "include_default": False,
                                 "params": {"batch_size": 128}, "space": {"dim": [16], "epochs": [4]}}],
           "scheduler": {"type": "fifo"}, "max_failures": 0, "fail_once_marker": str(marker),
           "calibration": {"targets": [0.5]}}
    path = tmp_path / "cfg.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    runner = CliRunner()
    r1 = runner.invoke(T.app, [str(path), "--out", str(out)])
    assert r1.exit_code == 3, r1.output
    assert "--resume" in r1.output and not marker.exists()
    assert not (out / "best").exists()
    r2 = runner.invoke(T.app, [str(path), "--out", str(out), "--resume"])
    assert r2.exit_code == 0, r2.output
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 3 and trials["error"].isna().all()
    assert (trials["epoch"] == 4).all() and not trials["stopped_early"].any()
    # every trial reported each epoch point once: the crashed one resumed after epoch 1
    for p in trials["path"]:
        prog = pd.read_csv(Path(p) / "progress.csv")
        assert sorted(prog["epoch"].tolist()) == [1, 2, 4], p
    assert (out / "best" / "thresholds.json").exists()


def test_cli_mounts_as_rayeval_tune(monkeypatch):
    """``rayeval tune CONFIG [--out DIR] [--resume]`` reaches ``run`` (mounted with add_typer)."""
    import typer
    from typer.testing import CliRunner

    seen = {}

    def fake_run(config, out, resume, log=print):
        seen.update(config=config, out=out, resume=resume)
        return {"best_dir": "b", "best": {}, "n_trials": 0, "n_stopped_early": 0, "seconds": 0}

    monkeypatch.setattr("rayeval.tune.cli.run", fake_run)  # the command calls rayeval.tune.run
    root = typer.Typer()
    root.add_typer(T.app, name="tune")

    @root.command()
    def other():  # a second command, as in rayeval's real CLI
        pass

    r = CliRunner().invoke(root, ["tune", "tune_small", "--out", "x", "--resume"])
    assert r.exit_code == 0, r.output
    assert seen == {"config": "tune_small", "out": Path("x"), "resume": True}
    r = CliRunner().invoke(T.app, ["tune_small"])
    assert r.exit_code == 0 and seen["resume"] is False and seen["out"] is None


def test_interrupted_search_is_not_exported():
    """After Ctrl-C ``Tuner.fit`` returns normally with trials left RUNNING/PENDING."""

    class Grid(list):
        def __init__(self, n, terminated, errors=0):
            super().__init__(range(n))
            self.num_terminated, self.num_errors = terminated, errors

    T._check_complete(Grid(4, 3, 1), 4, "x")  # all finished (one errored: TrialsFailed is raised elsewhere)
    with pytest.raises(T.Interrupted, match="--resume"):
        T._check_complete(Grid(4, 2), 4, "x")  # two trials still running
    with pytest.raises(T.Interrupted):
        T._check_complete(Grid(3, 3), 5, "x")  # searcher had not created every trial yet
    assert T._grid_size(T.search_space("random", {"seed": [0, 1, 2]}, grid=True)) == 3
    assert T._grid_size({"a": 1}) == 1
