"""`ray job submit` for real: a head node started with `ray start --head` (token auth on, its own
token, temp dir and ports, so it never meets the other Ray clusters on this machine), the
jobs/eval.py entrypoint submitted with JobSubmissionClient and jobs/runtime_env.yaml, and the
evaluation it wrote read back.  A client without the token is refused."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import requests
import yaml

from rayeval.config import REPO_ROOT, data_root

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

RAY = Path(sys.executable).parent / "ray"


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class Head:
    def __init__(self, proc: subprocess.Popen, dashboard: str, token: str, base: Path, log: Path):
        self.proc, self.dashboard, self.token, self.base, self.log = proc, dashboard, token, base, log

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, headers: dict | None = None):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard, headers=self.headers if headers is None else headers)


def _stop(proc: subprocess.Popen) -> None:
    """Stop this head only: its `ray start --block` process group (ours, by id), never `ray stop`."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def head():
    # Short base path: Ray's unix sockets live under it (107-byte limit).
    base = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    token = secrets.token_hex(32)
    gcs, dash, client_port, agent_http, agent_grpc, rt_agent, metrics, nm, om = free_ports(9)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    # RAY_memory_monitor_refresh_ms=0: Ray's own OOM killer off for this head.  Other engineers'
    # clusters share this machine's memory; their usage must not get our job supervisor killed.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_TMPDIR=str(base),
               RAY_memory_monitor_refresh_ms="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    cmd = [str(RAY), "start", "--head", "--block", f"--temp-dir={base / 'ray'}", f"--port={gcs}",
           "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={client_port}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={rt_agent}", f"--metrics-export-port={metrics}",
           f"--node-manager-port={nm}", f"--object-manager-port={om}", "--object-store-memory=200000000",
           "--disable-usage-stats"]
    log = base / "head.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    h = Head(proc, url, token, base, log)
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                r = requests.get(url + "/api/version", headers=h.headers, timeout=2)
                if r.status_code == 200:
                    # the job API is served by the dashboard's job module; wait for it too
                    if requests.get(url + "/api/jobs/", headers=h.headers, timeout=2).status_code == 200:
                        break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                pytest.fail(f"head not up after 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield h
    finally:
        _stop(proc)
        shutil.rmtree(base, ignore_errors=True)


def submit(client, timeout: float = 120, **kw) -> str:
    """submit_job, retried while the head's job agent is still starting (HTTP 500 "No available
    agent"): the dashboard answers before its agent on a loaded machine."""
    deadline = time.time() + timeout
    while True:
        try:
            return client.submit_job(**kw)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def wait_job(client, job_id: str, timeout: float = 300):
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        st = client.get_job_status(job_id)
        if st in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return st
        time.sleep(1)
    client.stop_job(job_id)
    raise AssertionError(f"job {job_id} still {st} after {timeout}s:\n{client.get_job_logs(job_id)[-3000:]}")


def runtime_env(extra_env: dict | None = None) -> dict:
    env = yaml.safe_load((REPO_ROOT / "jobs" / "runtime_env.yaml").read_text())
    env["working_dir"] = str(REPO_ROOT)  # "." is the repo root when submitting from it
    env["env_vars"] = {**env.get("env_vars", {}), "RAYEVAL_DATA": str(data_root()), **(extra_env or {})}
    return env


def test_token_auth_is_on(head):
    from ray.exceptions import AuthenticationError

    url = head.dashboard + "/api/jobs/"
    assert requests.get(url, timeout=5).status_code == 401                  # no token
    bad = {"Authorization": f"Bearer {secrets.token_hex(32)}"}
    assert requests.get(url, headers=bad, timeout=5).status_code == 403     # wrong token
    assert requests.get(url, headers=head.headers, timeout=5).status_code == 200
    with pytest.raises(AuthenticationError):
        head.client(headers=bad).list_jobs()
    with pytest.raises((AuthenticationError, RuntimeError)):
        head.client(headers={}).submit_job(entrypoint="echo never runs")


def run_job(client, entrypoint: str, timeout: float = 300, **kw) -> tuple[str, str]:
    """Submit, wait, and assert SUCCEEDED; returns (job id, driver logs)."""
    job_id = submit(client, entrypoint=entrypoint, runtime_env=runtime_env(), **kw)
    status = wait_job(client, job_id, timeout=timeout)
    logs = client.get_job_logs(job_id)
    assert str(status) == "SUCCEEDED", logs[-4000:]
    return job_id, logs


def eval_yaml(tmp_path: Path, limit: int, engine: dict) -> Path:
    """A one-setting eval config on ``limit`` real MMLU marketing items."""
    cfg = tmp_path / "eval_job.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "job_eval", "models": ["smollm2-135m"], "batch_size": 10,
        "datasets": [{"name": "mmlu", "split": "test", "subjects": ["marketing"], "limit": limit}],
        "settings": [{"name": "baseline"}], "scorings": ["symbol"], "engine": engine, "metrics": {"n_boot": 50}}))
    return cfg


def test_eval_job_runs_on_the_cluster(head, shared_data, tmp_path):
    """jobs/eval.py as a Ray job: 20 real MMLU items through Ray Data on the head node's cluster."""
    cfg, out, client = eval_yaml(tmp_path, 20, {"num_cpus": 0.5}), tmp_path / "out", head.client()
    job_id, logs = run_job(client, f"python jobs/eval.py --config {cfg} --out {out} --engine fake --actors 1",
                           metadata={"test": "rayeval"})
    # the driver ran the jobs/ entrypoint from the uploaded working dir, connected to this head
    assert "[jobs] rayeval eval" in logs
    info = client.get_job_info(job_id)
    assert info.runtime_env["working_dir"].startswith("gcs://")
    rows = pd.read_parquet(out / "rows.parquet")
    assert len(rows) == 20 and rows["item_id"].nunique() == 20
    assert set(rows["dataset"]) == {"mmlu"} and set(rows["subject"]) == {"marketing"}
    assert rows["question"].str.len().min() > 0
    assert (out / "report.md").exists() and (out / "metrics.json").exists()


@pytest.mark.engine
def test_eval_job_on_a_real_vllm_engine(head, shared_data, tmp_path):
    """jobs/eval.py as a Ray job with a real vLLM engine in its actor: 4 MMLU items, real scores."""
    cfg = eval_yaml(tmp_path, 4, {"num_cpus": 1, "max_model_len": 1024, "cache": False})
    out = tmp_path / "out"
    run_job(head.client(), f"python jobs/eval.py --config {cfg} --out {out} --engine vllm --actors 1", timeout=600)
    rows = pd.read_parquet(out / "rows.parquet")
    assert len(rows) == 4
    assert rows.per_option_raw_logprob.map(lambda xs: len(xs) == 4 and all(-1e8 < x < 0 for x in xs)).all()


def test_routing_jobs_prefs_train_router_and_tune_run_on_the_cluster(head, shared_data, tmp_path):
    """jobs/prefs.py -> jobs/train_router.py (+ calibration) -> jobs/tune.py as Ray jobs on the
    token-auth head, each reading the previous one's output; their outputs load and make sense."""
    from rayeval.prefs.outcomes import Outcomes
    from rayeval.route.routers import load_router

    client = head.client()

    def run(entrypoint: str, timeout: float = 300) -> str:
        return run_job(client, entrypoint, timeout)[1]

    oc = tmp_path / "outcomes.parquet"
    logs = run(f"python jobs/prefs.py --source routellm:mmlu --out {oc}")
    assert "[jobs] rayeval route prefs routellm:mmlu" in logs
    data = Outcomes.load(oc)
    assert len(data) > 1000 and len(data.models) >= 2

    router_yaml = tmp_path / "router.yaml"
    router_dir = tmp_path / "router"
    router_yaml.write_text(yaml.safe_dump({"router": "group", "data": str(oc), "out": str(router_dir),
                                           "params": {"shrinkage": 5.0}, "calibrate": {"targets": [0.5]}}))
    run(f"python jobs/train_router.py --config {router_yaml}")
    r = load_router(router_dir)
    assert r.name == "group" and r.shrinkage == 5.0 and (r.strong_, r.weak_) == data.strong_weak()
    thresholds = json.loads((router_dir / "thresholds.json").read_text())
    assert thresholds, thresholds

    tune_yaml = tmp_path / "tune.yaml"
    tune_yaml.write_text(yaml.safe_dump({
        "name": "jobs_tune", "data": {"source": str(oc), "subsample": 800, "embedders": []},
        "routers": [{"name": "group", "num_samples": 3}], "search": {"type": "random", "seed": 0},
        "scheduler": {"type": "fifo"}, "resources_per_trial": {"cpu": 1}, "max_concurrent_trials": 1,
        "calibration": {"targets": [0.5]}}))
    run(f"python jobs/tune.py --config {tune_yaml} --out {tmp_path / 'tune'}", timeout=600)
    summary = json.loads((tmp_path / "tune" / "summary.json").read_text())
    assert summary["best"]["router"] == "group" and summary["trials_per_router"] == {"group": summary["n_trials"]}
    assert load_router(tmp_path / "tune" / "best").name == "group"


def test_pipeline_job_runs_on_the_cluster(head, shared_data, tmp_path):
    """jobs/pipeline.py as a Ray job (the packaged pipeline on the fake engine, no Serve stage):
    evaluation -> gold preference data -> router + thresholds -> report, on the head's cluster."""
    from rayeval.route.routers import load_router

    out = tmp_path / "main"
    _, logs = run_job(head.client(), f"python jobs/pipeline.py --out {out} --engine fake --no-serve", timeout=600)
    assert "[jobs] rayeval pipeline --out" in logs
    rep = (out / "report.md").read_text()
    assert "Benchmark sensitivity" in rep and "Routers" in rep
    thr = json.loads((out / "router" / "thresholds.json").read_text())["thresholds"]
    assert thr and load_router(out / "router").fitted_


def test_failing_job_reports_failed(head, tmp_path):
    client = head.client()
    job_id = submit(
        client, entrypoint=f"python jobs/eval.py --config {tmp_path / 'missing.yaml'} --out {tmp_path / 'o'}",
        runtime_env=runtime_env())
    assert str(wait_job(client, job_id, timeout=120)) == "FAILED"
    assert "No such file or directory" in client.get_job_logs(job_id)


HELLO_APP = '''
from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Hello:
    def __init__(self, greeting: str):
        self.greeting = greeting

    async def __call__(self, request) -> str:
        return self.greeting


def build(args: dict):
    return Hello.bind(args.get("greeting", "hi"))
'''


def test_serve_deploy_job_brings_an_app_to_running(head, tmp_path):
    """jobs/serve_deploy.py as a Ray job: a Serve config deployed, RUNNING, answering HTTP after
    the job has exited (the app is a stand-in; the rayeval gateway needs real engines)."""
    from ray.serve.schema import ServeDeploySchema

    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "hello_app.py").write_text(HELLO_APP)
    (port,) = free_ports(1)
    cfg = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": "hello", "route_prefix": "/hello", "import_path": "hello_app:build",
                             "args": {"greeting": "from the job"},
                             "runtime_env": {"env_vars": {"PYTHONPATH": str(mod_dir)}}}]}
    ServeDeploySchema.model_validate(cfg)
    f = tmp_path / "serve.yaml"
    f.write_text(yaml.safe_dump(cfg))
    client = head.client()
    job_id = submit(client, entrypoint=f"python jobs/serve_deploy.py --config {f} --timeout 240",
                               runtime_env=runtime_env())
    status = wait_job(client, job_id, timeout=300)
    logs = client.get_job_logs(job_id)
    assert str(status) == "SUCCEEDED", logs[-4000:]
    assert '"hello": "ApplicationStatus.RUNNING"' in logs or '"hello": "RUNNING"' in logs, logs[-2000:]
    r = requests.get(f"http://127.0.0.1:{port}/hello", timeout=30)
    assert r.status_code == 200 and r.text == "from the job"
