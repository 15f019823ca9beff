"""The whole pipeline wired end to end (fake engine for speed; the real engines are exercised by
test_pipeline / test_serve): eval rows become gold preference data, a router trains on them, its
thresholds are calibrated, and one report ties it together."""

import json

import pytest
from typer.testing import CliRunner

from rayeval.cli import app
from rayeval.route.routers import load_router
from rayeval.workflow import WorkflowConfig, load_workflow_config, run_workflow


@pytest.mark.ray
def test_workflow_fake_engine_no_serve(tmp_path):
    cfg = load_workflow_config(None)
    assert isinstance(cfg, WorkflowConfig) and cfg.router["name"] == "knn"
    res = run_workflow(cfg, tmp_path, serve=False, engine={"kind": "fake"})
    rep = (tmp_path / "report.md").read_text()
    for section in ("Benchmark sensitivity", "Gold preference data", "Routers"):
        assert section in rep
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
