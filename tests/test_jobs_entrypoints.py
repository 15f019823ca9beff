"""jobs/*.py build argv for the real `rayeval` CLI (parsed here by the CLI's own click commands,
without running them), and jobs/runtime_env*.yaml are valid Ray runtime envs."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib

import pytest
import yaml
from typer.main import get_command

from rayeval.config import REPO_ROOT

JOBS = REPO_ROOT / "jobs"
STAGES = ["eval", "prefs", "train_router", "tune", "serve_deploy", "pipeline"]


def load_job(stage: str):
    if str(JOBS) not in sys.path:
        sys.path.insert(0, str(JOBS))
    spec = importlib.util.spec_from_file_location(f"rayeval_job_{stage}", JOBS / f"{stage}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_cli(argv: list[str]) -> tuple[str, dict]:
    """Resolve argv through the real CLI's click groups; returns (command path, its parameters)."""
    from rayeval.cli import app

    cmd = get_command(app)  # typer's (vendored) click classes: duck-typed below
    ctx = cmd.make_context("rayeval", list(argv), resilient_parsing=False)
    path = ["rayeval"]
    while hasattr(cmd, "resolve_command"):
        rest = ctx._protected_args + ctx.args if hasattr(ctx, "_protected_args") else ctx.protected_args + ctx.args
        if not rest:  # a group whose callback is the command (e.g. `rayeval tune CONFIG`)
            break
        name, sub, rest = cmd.resolve_command(ctx, rest)
        path.append(name)
        ctx = sub.make_context(name, rest, parent=ctx)
        cmd = sub
    return " ".join(path), ctx.params


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_a_working_help(stage):
    r = subprocess.run([sys.executable, str(JOBS / f"{stage}.py"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--config" in r.stdout


def test_eval_job_maps_onto_rayeval_eval():
    job = load_job("eval")
    a = job.build_parser().parse_args(["--config", "eval_small", "--out", "/tmp/o", "--engine", "fake",
                                       "--actors", "3", "--no-resume"])
    path, params = parse_cli(job.argv(a))
    assert path == "rayeval eval"
    assert params["config"] == "eval_small" and str(params["out"]) == "/tmp/o"
    assert params["engine"] == "fake" and params["actors"] == 3 and params["resume"] is False


def test_pipeline_job_maps_onto_rayeval_pipeline():
    job = load_job("pipeline")
    a = job.build_parser().parse_args(["--config", "pipeline_small", "--out", "/tmp/p", "--no-serve"])
    path, params = parse_cli(job.argv(a))
    assert path == "rayeval pipeline"
    assert params["config"] == "pipeline_small" and params["serve"] is False


def test_tune_job_maps_onto_rayeval_tune():
    pytest.importorskip("rayeval.tune")
    job = load_job("tune")
    a = job.build_parser().parse_args(["--config", "tune_small", "--out", "/tmp/t", "--resume"])
    path, params = parse_cli(job.argv(a))
    assert path == "rayeval tune"
    assert params["config"] == "tune_small" and params["resume"] is True and str(params["out"]) == "/tmp/t"


def test_prefs_job_reads_yaml_and_flags_override(tmp_path):
    pytest.importorskip("rayeval.route.cli")
    cfg = tmp_path / "prefs.yaml"
    cfg.write_text(yaml.safe_dump({"source": "routellm:mmlu", "out": "/tmp/a.parquet", "pairwise": True}))
    job = load_job("prefs")
    a = job.build_parser().parse_args(["--config", str(cfg), "--out", "/tmp/b.parquet"])
    path, params = parse_cli(job.argv(a))
    assert path == "rayeval route prefs"
    assert params["source"] == "routellm:mmlu" and str(params["out"]) == "/tmp/b.parquet"
    assert params["pairwise"] is True
    with pytest.raises(SystemExit):
        job.argv(job.build_parser().parse_args(["--out", "x.parquet"]))


def test_train_router_job_trains_then_calibrates(tmp_path):
    pytest.importorskip("rayeval.route.cli")
    from rayeval.route.cli import _params
    from rayeval.route.routers import make_router

    cfg = tmp_path / "router.yaml"
    cfg.write_text(yaml.safe_dump({"router": "knn", "data": "routellm:mmlu", "out": "/tmp/r",
                                   "params": {"k": 10, "weighting": "similarity"},
                                   "calibrate": {"targets": [0.25, 0.5]}}))
    job = load_job("train_router")
    train, cal = job.commands(job.build_parser().parse_args(["--config", str(cfg), "-p", "shrinkage=5.0"]))
    path, params = parse_cli(train)
    assert path == "rayeval route train"
    assert params["router"] == "knn" and params["param"] == ["k=10", 'weighting="similarity"', "shrinkage=5.0"]
    # what `rayeval route train` builds from the parsed argv: a real kNN router with those parameters
    r = make_router(params["router"], **_params(params["param"]))
    assert (r.k, r.weighting, r.shrinkage) == (10, "similarity", 5.0)
    path, params = parse_cli(cal)
    assert path == "rayeval route calibrate"
    assert str(params["out"]) == "/tmp/r/thresholds.json" and params["target"] == [0.25, 0.5]


@pytest.mark.parametrize("params,flags,msg", [
    ({"k": 10, "weights": "distance"}, [], r"params: knn has no parameter\(s\) \['weights'\]; it takes \[.*'weighting'"),
    ({"k": 10}, ["-p", 'k="ten"'], r"params\.k: expected int, got 'ten'"),
])
def test_train_router_job_rejects_parameters_the_router_does_not_take(tmp_path, params, flags, msg):
    """The real job would raise TypeError inside `route train`; it stops before that, naming the field."""
    cfg = tmp_path / "router.yaml"
    cfg.write_text(yaml.safe_dump({"router": "knn", "data": "routellm:mmlu", "out": "/tmp/r", "params": params}))
    job = load_job("train_router")
    with pytest.raises(SystemExit, match=msg) as e:
        job.commands(job.build_parser().parse_args(["--config", str(cfg), *flags]))
    assert str(cfg) in str(e.value) and len(str(e.value).splitlines()) == 1
    with pytest.raises(SystemExit, match=r"router: unknown router 'knnn'"):
        job.commands(job.build_parser().parse_args(["--router", "knnn", "--data", "d", "--out", "o"]))


def test_run_cli_passes_exit_codes_through(tmp_path):
    load_job("eval")  # puts jobs/ on sys.path
    from _common import run_cli

    assert run_cli(["eval", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert run_cli(["no-such-command"]) == 2  # click usage error


def test_serve_deploy_validates_with_serve_schema_and_applies_overrides(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((REPO_ROOT / "k8s" / "rayservice.yaml").read_text())
    f = tmp_path / "serve.yaml"
    f.write_text(doc["spec"]["serveConfigV2"])
    job = load_job("serve_deploy")
    cfg = job.load_deploy_config(str(f), ['routers={"knn": "/x/router"}', "default_router=knn"])
    assert isinstance(cfg, ServeDeploySchema)
    assert cfg.applications[0].args["routers"] == {"knn": "/x/router"}
    from rayeval.serve.app import parse_args

    assert parse_args(cfg.applications[0].args).routers == {"knn": "/x/router"}
    for name in ("gpu_cluster.yaml", "local_cpu.yaml"):  # the repo's Serve configs load too
        parse_args(job.load_deploy_config(str(REPO_ROOT / "serve_configs" / name), []).applications[0].args)
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: [{name: x}]\n")  # no import_path
    with pytest.raises(Exception):
        job.load_deploy_config(str(bad), [])


def test_runtime_envs_are_valid_ray_runtime_envs():
    from ray.runtime_env import RuntimeEnv

    for name in ("runtime_env.yaml", "runtime_env_pip.yaml"):
        env = yaml.safe_load((JOBS / name).read_text())
        assert env["working_dir"] == "."
        assert ".venv" in env["excludes"] and ".git" in env["excludes"]
        RuntimeEnv(**{**env, "working_dir": str(REPO_ROOT)})


def test_pip_runtime_env_matches_pyproject():
    """jobs/runtime_env_pip.yaml = pyproject's dependencies (Ray comes with the cluster) + gpu extra."""
    proj = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    want = [d for d in proj["dependencies"] if not re.match(r"^ray\b", d)] + proj["optional-dependencies"]["gpu"]
    env = yaml.safe_load((JOBS / "runtime_env_pip.yaml").read_text())
    assert sorted(env["pip"]["packages"]) == sorted(want)


def test_readme_documents_every_stage():
    text = (JOBS / "README.md").read_text()
    for stage in STAGES:
        assert f"python jobs/{stage}.py" in text, stage
    assert "--runtime-env jobs/runtime_env.yaml" in text


@pytest.mark.parametrize("stage,doc,msg", [
    ("prefs", {"source": "routellm:mmlu", "out": "o.parquet", "pairwize": True}, r"pairwize: Extra inputs"),
    ("prefs", {"source": "routellm:mmlu", "out": "o.parquet", "pairwise": "often"}, r"pairwise: Input should be a valid boolean"),
    ("train_router", {"router": "knn", "data": "d", "out": "o", "calibrate": {"target": [0.5]}}, r"calibrate\.target: Extra inputs"),
    ("train_router", {"router": "knn", "data": "d", "out": "o", "param": {"k": 3}}, r"param: Extra inputs"),
])
def test_job_yaml_typos_and_wrong_types_stop_the_job_naming_file_and_field(tmp_path, stage, doc, msg):
    cfg = tmp_path / f"{stage}.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    job = load_job(stage)
    run = job.argv if stage == "prefs" else job.commands
    with pytest.raises(SystemExit, match=msg) as e:
        run(job.build_parser().parse_args(["--config", str(cfg)]))
    assert str(e.value).startswith(f"{cfg}: ")


@pytest.mark.parametrize("stage", ["prefs", "train_router"])
def test_job_with_a_missing_config_file_stops(tmp_path, stage):
    job = load_job(stage)
    run = job.argv if stage == "prefs" else job.commands
    with pytest.raises(SystemExit, match="no such config file"):
        run(job.build_parser().parse_args(["--config", str(tmp_path / "nope.yaml")]))
