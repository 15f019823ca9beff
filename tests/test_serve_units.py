"""Fast checks of the gateway's pure logic (no Ray, no engines): model-name parsing, request
validation, argument validation, the embedder's cache, and config files that `serve` accepts."""

from __future__ import annotations

import os
import types

import pytest

from rayeval.config import REPO_ROOT
from rayeval.serve.app import AppArgs, BadRequest, Ingress, app_args_for, parse_args, parse_model


def test_parse_model():
    assert parse_model("router-knn-0.5") == ("router", "knn", 0.5)
    assert parse_model("router-knn-1.01") == ("router", "knn", 1.01)
    assert parse_model("router-knn") == ("router", "knn", None)
    assert parse_model("router-sw-ranking-0.3") == ("router", "sw-ranking", 0.3)
    assert parse_model("router-sw-ranking") == ("router", "sw-ranking", None)
    assert parse_model("router") == ("router", None, None)
    assert parse_model("auto") == ("router", None, None)
    assert parse_model("smollm2-135m") == ("direct", "smollm2-135m", None)
    with pytest.raises(BadRequest):
        parse_model("router-knn-nan")


def _fake_ingress():
    s = {k: getattr(AppArgs(), k) for k in ("max_prompt_chars", "max_tokens_limit", "default_max_tokens")}
    return types.SimpleNamespace(s=s, llms={"smollm2-135m": None, "gemma3-270m": None})


def _v(body):
    return Ingress.func_or_class._validate(_fake_ingress(), body)


def test_validate_ok_and_normalises():
    v = _v({"model": "router-knn-0.2", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_tokens": 5, "stop": "x"})
    assert v["kind"] == "router" and v["name"] == "knn" and v["threshold"] == 0.2
    assert v["req"]["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert v["req"]["max_tokens"] == 5 and v["req"]["stop"] == ["x"]
    assert _v({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]})["req"]["max_tokens"] == 128


@pytest.mark.parametrize("body,code", [
    ([], "invalid_request"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "missing_model"),
    ({"model": "smollm2-135m"}, "empty_messages"),
    ({"model": "smollm2-135m", "messages": []}, "empty_messages"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "  "}]}, "empty_messages"),
    ({"model": "smollm2-135m", "messages": ["hi"]}, "invalid_message"),
    ({"model": "smollm2-135m", "messages": [{"role": "tool", "content": "hi"}]}, "invalid_role"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "invalid_content"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, "model_not_found"),
    ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "x" * 40000}]}, "prompt_too_long"),
    ({"model": "smollm2-135m", "max_tokens": True, "messages": [{"role": "user", "content": "hi"}]}, "invalid_max_tokens"),
    ({"model": "smollm2-135m", "max_tokens": 5000, "messages": [{"role": "user", "content": "hi"}]}, "invalid_max_tokens"),
    ({"model": "smollm2-135m", "temperature": 3, "messages": [{"role": "user", "content": "hi"}]}, "invalid_temperature"),
    ({"model": "smollm2-135m", "top_p": 0, "messages": [{"role": "user", "content": "hi"}]}, "invalid_top_p"),
    ({"model": "smollm2-135m", "stream": 1, "messages": [{"role": "user", "content": "hi"}]}, "invalid_stream"),
    ({"model": "smollm2-135m", "n": 3, "messages": [{"role": "user", "content": "hi"}]}, "invalid_n"),
    ({"model": "smollm2-135m", "stop": [1], "messages": [{"role": "user", "content": "hi"}]}, "invalid_stop"),
    ({"model": "smollm2-135m", "seed": "x", "messages": [{"role": "user", "content": "hi"}]}, "invalid_seed"),
])
def test_validate_rejects(body, code):
    with pytest.raises(BadRequest) as e:
        _v(body)
    assert e.value.code == code and e.value.status == 400 and e.value.message


def test_args_validation():
    parse_args({})
    with pytest.raises(ValueError, match="unknown key"):
        parse_args({"bogus": 1})
    with pytest.raises(ValueError, match="strong_model"):
        parse_args({"strong_model": "gpt-4"})
    with pytest.raises(ValueError, match="default_router"):
        parse_args({"routers": {"length": None}, "default_router": "knn"})
    with pytest.raises(ValueError, match="clashes"):
        parse_args({"llms": {"router-x": {}, "smollm2-135m": {}, "gemma3-270m": {}}})
    a = app_args_for({}, "trained", "/tmp/r", 0.3, "gemma3-270m", "smollm2-135m")
    assert a["default_router"] == "trained" and a["thresholds"]["trained"] == 0.3
    assert parse_args(a).routers["trained"] == "/tmp/r"


@pytest.mark.parametrize("name", ["local_cpu.yaml", "gpu_cluster.yaml"])
def test_configs_validate(name):
    from ray.serve.schema import ServeDeploySchema

    from rayeval.serve.deploy import app_config, load_config, set_user_config

    cfg = load_config(REPO_ROOT / "serve_configs" / name)
    ServeDeploySchema.model_validate(cfg)
    app = app_config(cfg)
    assert app["import_path"] == "rayeval.serve.app:build_app"
    parse_args(app["args"])
    hot = set_user_config(cfg, "Router", {"thresholds": {"knn": 0.9}})
    assert app_config(hot)["deployments"][0]["user_config"] == {"thresholds": {"knn": 0.9}}
    assert app_config(cfg)["deployments"][0]["user_config"] != {"thresholds": {"knn": 0.9}}


def test_lru():
    from rayeval.serve.routing import LRU

    c = LRU(2)
    c.put("a", 1), c.put("b", 2), c.get("a"), c.put("c", 3)
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3


class _Resp:
    """Stands in for a DeploymentResponse: awaitable, cancellable."""

    def __init__(self, value=None, exc=None, delay=0.0):
        self.value, self.exc, self.delay, self.cancelled = value, exc, delay, False

    def __await__(self):
        async def f():
            import asyncio

            await asyncio.sleep(self.delay)
            if self.exc:
                raise self.exc
            return self.value
        return f().__await__()

    def cancel(self):
        self.cancelled = True


class _Metrics:
    """Stands in for ``ray.util.metrics``: records every inc / observe per metric name."""

    def __init__(self):
        self.calls: dict[str, list] = {}

    def _metric(self, name, *a, **k):
        rec = self.calls.setdefault(name, [])
        return types.SimpleNamespace(inc=lambda *a, **k: rec.append(k), observe=lambda v, **k: rec.append(k))

    Counter = Histogram = _metric


def _routing_ingress(resp):
    from rayeval.serve.stats import GatewayStats

    cls = Ingress.func_or_class
    metrics = _Metrics()
    ns = types.SimpleNamespace(
        router=types.SimpleNamespace(route=types.SimpleNamespace(remote=lambda *a: resp)),
        s={"route_timeout_s": 0.2}, fallback="smollm2-135m", llms={"smollm2-135m": None, "gemma3-270m": None},
        stats=GatewayStats(metrics=metrics), metrics=metrics)
    ns._fallback = lambda reason, router: cls._fallback(ns, reason, router)
    return ns, cls


@pytest.mark.parametrize("resp,reason", [
    (_Resp(exc=RuntimeError("embedder died")), "RuntimeError"),
    (_Resp(value={"router": "knn", "p": 0.9}, delay=1.0), "timeout"),
    (_Resp(value={"router": "knn", "p": 0.9, "threshold": 0.5, "tier": "strong", "model": "gpt-4"}), "unserved_model"),
])
def test_routing_failure_falls_back_and_counts(resp, reason):
    import asyncio

    ns, cls = _routing_ingress(resp)
    d = asyncio.run(cls._route(ns, "hello", "knn", 0.5))
    assert d["model"] == "smollm2-135m" and d["tier"] == "fallback" and d["fallback"] == reason
    view = ns.stats.snapshot(lambda xs: len(xs))
    assert view["fallbacks"] == 1 and view["fallback_reasons"] == {reason: 1}
    # the same event went to Ray's metric, with its tags
    assert ns.metrics.calls["rayeval_routing_fallbacks_total"] == [{"tags": {"reason": reason}}]
    if reason == "timeout":
        assert resp.cancelled


def test_routing_ok_and_unknown_router():
    import asyncio

    ok = {"router": "knn", "p": 0.7, "threshold": 0.5, "tier": "strong", "model": "gemma3-270m"}
    ns, cls = _routing_ingress(_Resp(value=ok))
    assert asyncio.run(cls._route(ns, "hello", "knn", 0.5)) == ok
    view = ns.stats.snapshot(lambda xs: len(xs))
    assert view["decisions"] == {"knn:strong": 1} and view["fallbacks"] == 0 and view["routing_latency"] == 1
    assert ns.metrics.calls["rayeval_routing_decisions_total"] == [{"tags": {"router": "knn", "tier": "strong"}}]
    ns, cls = _routing_ingress(_Resp(value={"error": "unknown router 'x'"}))
    with pytest.raises(BadRequest) as e:
        asyncio.run(cls._route(ns, "hello", "x", 0.5))
    assert e.value.code == "model_not_found"


@pytest.mark.parametrize("embedder, needs_deployment", [("minilm-l6-static", False), ("minilm-l6", True), (None, False)])
def test_app_args_for_only_serves_the_trained_router(tmp_path, embedder, needs_deployment):
    """The workflow's demo deploys its trained router alone: no build-time default routers, and
    no Embedder deployment unless that router needs a transformer encode."""
    import numpy as np
    import pandas as pd

    from rayeval.prefs.outcomes import Outcomes
    from rayeval.route.routers import make_router

    rng = np.random.default_rng(0)
    texts = [f"question {i}" for i in range(20)]
    o = Outcomes(pd.DataFrame({"query_id": [str(i) for i in range(20)], "query": texts, "group": "g"}),
                 pd.DataFrame({"strong": rng.integers(0, 2, 20).astype(float), "weak": rng.integers(0, 2, 20).astype(float)}))
    if embedder is None:
        r = make_router("length").fit(o)
    else:
        r = make_router("knn", k=3, strong="strong", weak="weak", embedder=embedder).fit(o, rng.normal(size=(20, 8)))
    r.save(tmp_path / "r")
    base = {"routers": {"knn": None, "length": None}, "thresholds": {"knn": 0.5, "length": 0.5}}
    a = app_args_for(base, "trained", str(tmp_path / "r"), 0.4, only=True)
    assert a["routers"] == {"trained": str(tmp_path / "r")} and a["thresholds"] == {"trained": 0.4}
    assert ("embedder" not in a) == needs_deployment and (a.get("embedder", {}) is None) != needs_deployment
    assert parse_args(a).embedder is None or needs_deployment
    full = app_args_for(base, "trained", str(tmp_path / "r"), 0.4)  # default: the config's routers stay
    assert set(full["routers"]) == {"knn", "length", "trained"} and "embedder" not in full


def test_validation_errors_name_the_field_and_unused_openai_fields_pass():
    cases = [({"role": "tool", "content": "hi"}, "messages.0.role: "),
             ({"role": "user", "content": 5}, "messages.0.content: "),
             ({"role": "user"}, "messages.0.content: ")]
    for msg, prefix in cases:
        with pytest.raises(BadRequest) as e:
            _v({"model": "smollm2-135m", "messages": [msg]})
        assert e.value.message.startswith(prefix), e.value.message
    with pytest.raises(BadRequest) as e:
        _v({"model": "smollm2-135m", "temperature": "hot", "messages": [{"role": "user", "content": "hi"}]})
    assert e.value.message.startswith("temperature: ") and e.value.code == "invalid_temperature"
    # fields OpenAI clients send that the gateway does not use are ignored, not rejected
    v = _v({"model": "smollm2-135m", "user": "u-1", "logprobs": False, "frequency_penalty": 0,
            "max_completion_tokens": 7, "max_tokens": 99, "messages": [{"role": "user", "content": "hi"}]})
    assert v["req"]["max_tokens"] == 7


def test_one_vllm_engine_assembly_for_scoring_generation_and_serving(monkeypatch):
    """``vllm_engine_args``: the same arguments for ``vllm.LLM`` (scoring, generation) and the Serve
    deployment's ``AsyncLLM``; the caller's options win; pinning and in-process mode via the env."""
    import rayeval.models as models
    from rayeval.eval import engines

    monkeypatch.setattr(models, "resolve_model", lambda m: f"/models/{m}")
    monkeypatch.setattr(engines, "on_cpu", lambda: True)
    for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.setenv(k, "")  # recorded, so the test's own settings are undone afterwards
        monkeypatch.delenv(k)
    path, score = engines.vllm_engine_args("smollm2-135m", {"max_num_seqs": 4}, "1")
    assert str(path) == "/models/smollm2-135m"
    assert score["seed"] == 0 and score["max_model_len"] == 2048 and score["max_num_seqs"] == 4
    assert {k: score[k] for k in engines.vllm_cpu_defaults()} == engines.vllm_cpu_defaults()
    assert "distributed_executor_backend" not in score and "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "1" and os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    _, served = engines.vllm_engine_args("smollm2-135m", {"dtype": "bfloat16"}, None, max_model_len=1024,
                                         in_process=True)
    assert served["distributed_executor_backend"] == "uni" and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert served["dtype"] == "bfloat16" and served["max_model_len"] == 1024  # the caller's options win
    assert {k: v for k, v in served.items() if k not in ("distributed_executor_backend", "dtype", "max_model_len")} == \
        {k: v for k, v in score.items() if k not in ("dtype", "max_model_len", "max_num_seqs")}
