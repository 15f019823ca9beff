"""The Serve application: OpenAI-compatible ingress -> router (-> embedder) -> one LLM deployment per model.

    serve run serve_configs/local_cpu.yaml        # or: serve deploy serve_configs/local_cpu.yaml

``build_app(args)`` is the ``import_path`` target (``rayeval.serve.app:build_app``); ``args`` are
described by :class:`AppArgs`.  Model names on ``/v1/chat/completions``:

  * ``router-<router>-<threshold>`` (e.g. ``router-knn-0.5``): route with that router and threshold;
  * ``router-<router>``: that router with the threshold from the Router deployment's ``user_config``;
  * ``router`` / ``auto``: the configured default router and threshold;
  * a served model name (``smollm2-135m``): straight to that model.

The response's ``model`` field and the ``x-rayeval-served-by`` header name the model that answered.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from rayeval.serve.llm import LLMServer, check_llm_entry
from rayeval.serve.requests import ChatRequest, first_error
from rayeval.serve.stats import GatewayStats
from rayeval.serve.routing import Embedder, RouterServer, default_router_dir

log = logging.getLogger("ray.serve")


@dataclass
class AppArgs:
    # served name -> {model: registry name | HF folder | hub id, engine_kwargs: {...}, cpu_cores: "0",
    #                 chat_template: str, max_model_len: int, deployment: {serve.deployment options}}
    llms: dict[str, dict] = field(default_factory=lambda: {
        "smollm2-135m": {"cpu_cores": "0"}, "gemma3-270m": {"cpu_cores": "1"}})
    strong_model: str = "gemma3-270m"
    weak_model: str = "smollm2-135m"
    # router name -> trained router folder (``rayeval route train``), or null: train a small default
    # on ``default_router_data`` at build time (cached).
    # ``knn-static``: kNN on the static (token-table) featurizer, computed in the router replica.
    routers: dict[str, str | None] = field(default_factory=lambda: {"knn": None, "knn-static": None, "length": None})
    default_router: str = "knn"
    default_router_data: str = "routellm:mt_bench"
    thresholds: dict[str, float] = field(default_factory=lambda: {"knn": 0.5, "knn-static": 0.5, "length": 0.5})
    # null: no Embedder deployment (every router is featureless or uses a static featurizer,
    # which runs inside the router replica)
    embedder: dict | None = field(default_factory=lambda: {"model": "minilm-l6", "max_seq_length": 128})
    router_deployment: dict = field(default_factory=dict)
    ingress: dict = field(default_factory=lambda: {"max_ongoing_requests": 64, "max_queued_requests": 128})
    fallback_model: str | None = None          # when routing fails; default: weak_model
    api_key_env: str = "RAYEVAL_API_KEY"       # bearer token required when this env var is set
    max_prompt_chars: int = 32000
    max_tokens_limit: int = 1024
    default_max_tokens: int = 128
    route_timeout_s: float = 2.0

    def validate(self) -> "AppArgs":
        if not self.llms:
            raise ValueError("llms: give at least one model")
        for role in ("strong_model", "weak_model"):
            if getattr(self, role) not in self.llms:
                raise ValueError(f"{role}={getattr(self, role)!r} is not among llms {sorted(self.llms)}")
        if self.fallback_model and self.fallback_model not in self.llms:
            raise ValueError(f"fallback_model={self.fallback_model!r} is not among llms {sorted(self.llms)}")
        if self.routers and self.default_router not in self.routers:
            raise ValueError(f"default_router={self.default_router!r} is not among routers {sorted(self.routers)}")
        for n, entry in self.llms.items():
            if n.startswith("router") or n == "auto":
                raise ValueError(f"llm name {n!r} clashes with the router model names")
            check_llm_entry(n, entry)
        return self


def parse_args(args: dict | None) -> AppArgs:
    from rayeval.config import from_dict

    return from_dict(AppArgs, dict(args or {}), where="rayeval.serve.app args").validate()


def _replica_lost(e: BaseException) -> bool:
    """A Ray actor death or unavailability (the replica crashed or its node went away), or the
    replica's engine died."""
    from ray.exceptions import RayActorError  # ActorDiedError, ActorUnavailableError

    from rayeval.eval.engines import engine_died

    cause = getattr(e, "cause", None)  # a RayTaskError wraps what the replica raised
    return any(isinstance(x, RayActorError) or engine_died(x) for x in (e, cause) if x is not None)


def _deployment_name(model: str) -> str:
    return "llm-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in model)


# --------------------------------------------------------------------------------------------
# Ingress
# --------------------------------------------------------------------------------------------

api = FastAPI(title="rayeval routing gateway", version="1")


def _err(status: int, message: str, code: str, etype: str = "invalid_request_error", headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": etype, "code": code}}, status_code=status,
                        headers=headers)


class BadRequest(Exception):
    def __init__(self, message: str, code: str = "invalid_request", status: int = 400):
        super().__init__(message)
        self.message, self.code, self.status = message, code, status


async def _awaited(resp):
    return await resp


def parse_model(model: str) -> tuple[str, str | None, float | None]:
    """("direct", name, None) | ("router", router or None, threshold or None)."""
    if model in ("router", "auto"):
        return "router", None, None
    if model.startswith("router-"):
        rest = model[len("router-"):]
        name, sep, tail = rest.rpartition("-")
        if sep:
            try:
                thr = float(tail)
            except ValueError:
                return "router", rest, None
            if not math.isfinite(thr):
                raise BadRequest(f"model {model!r}: threshold must be a finite number", "invalid_threshold")
            if not name:
                raise BadRequest(f"model {model!r}: expected router-<router>-<threshold>", "model_not_found")
            return "router", name, thr
        return "router", rest, None
    return "direct", model, None


# NB: everything the ingress methods use must be defined above this class: Serve pickles the
# FastAPI-wrapped class (by value) when the decorator runs.
@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64, max_queued_requests=128,
                  health_check_timeout_s=60)
@serve.ingress(api)
class Ingress:
    def __init__(self, router, llms: dict, settings: dict):
        self.router, self.llms, self.s = router, llms, settings
        key_env = settings.get("api_key_env") or ""
        self.api_key = os.environ.get(key_env, "") if key_env else ""
        self.fallback = settings.get("fallback_model") or settings["weak_model"]
        self.stats = GatewayStats()  # Ray metrics and this replica's /stats view, one record per event

    # -- plumbing --------------------------------------------------------------------------------
    def _reject(self, status: int, message: str, code: str, etype: str = "invalid_request_error", headers=None):
        self.stats.count("rejected", status=status, code=code)
        return _err(status, message, code, etype, headers)

    def _auth(self, request: Request) -> JSONResponse | None:
        if not self.api_key:
            return None
        h = request.headers.get("authorization", "")
        scheme, _, tok = h.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(tok.strip().encode(), self.api_key.encode()):
            return self._reject(401, "missing or wrong bearer token", "invalid_api_key", "authentication_error",
                                headers={"WWW-Authenticate": "Bearer"})
        return None

    def _validate(self, body: Any) -> dict:
        """The request as :class:`rayeval.serve.requests.ChatRequest` declares it, then the limits
        of this deployment (prompt characters, max tokens) and the model name."""
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        try:
            r = ChatRequest.model_validate(body)
        except ValidationError as e:
            code, message = first_error(e)
            raise BadRequest(message, code) from None
        clean = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in r.messages]
        if not any(m["role"] == "user" and m["content"].strip() for m in clean):
            raise BadRequest("'messages' needs at least one non-empty user message", "empty_messages")
        chars = sum(len(m["content"]) for m in clean)
        if chars > self.s["max_prompt_chars"]:
            raise BadRequest(f"prompt is {chars} characters; the limit is {self.s['max_prompt_chars']}",
                             "prompt_too_long")
        mt = r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens
        mt = self.s["default_max_tokens"] if mt is None else mt
        if not 1 <= mt <= self.s["max_tokens_limit"]:
            raise BadRequest(f"max_tokens: must be an integer in [1, {self.s['max_tokens_limit']}]",
                             "invalid_max_tokens")
        kind, name, thr = parse_model(r.model)
        if kind == "direct" and name not in self.llms:
            raise BadRequest(f"unknown model {r.model!r}; serving {sorted(self.llms)} and router-<router>-<threshold>",
                             "model_not_found")
        so = r.stream_options or {}
        return {"model": r.model, "kind": kind, "name": name, "threshold": thr, "stream": r.stream,
                "include_usage": bool(so.get("include_usage")),
                "req": {"messages": clean, "max_tokens": mt, "temperature": float(r.temperature or 0.0),
                        "top_p": float(r.top_p or 1.0), "stop": [r.stop] if isinstance(r.stop, str) else r.stop,
                        "seed": r.seed}}

    async def _route(self, text: str, router: str | None, thr: float | None) -> dict:
        t0 = time.perf_counter()
        resp = self.router.route.remote(text, router, thr)
        try:
            d = await asyncio.wait_for(_awaited(resp), timeout=self.s["route_timeout_s"])
        except asyncio.TimeoutError:
            resp.cancel()
            return self._fallback("timeout", router)
        except Exception as e:  # router or embedder down / overloaded / crashed
            log.warning("routing failed, falling back to %s: %s", self.fallback, e)
            return self._fallback(type(e).__name__, router)
        if "error" in d:
            raise BadRequest(d["error"], "model_not_found")
        self.stats.observe("routing_latency", time.perf_counter() - t0, router=d["router"])
        self.stats.count("decision", router=d["router"], tier=d["tier"])
        if d.get("model") not in self.llms:
            return self._fallback("unserved_model", router)
        return d

    def _fallback(self, reason: str, router: str | None) -> dict:
        self.stats.count("fallback", reason=reason)
        return {"router": router, "p": None, "threshold": None, "tier": "fallback", "model": self.fallback,
                "fallback": reason}

    async def _target(self, v: dict) -> tuple[str, dict | None]:
        if v["kind"] == "direct":
            return v["name"], None
        text = next(m["content"] for m in reversed(v["req"]["messages"]) if m["role"] == "user")
        d = await self._route(text, v["name"], v["threshold"])
        return d["model"], d

    def _headers(self, model: str, d: dict | None) -> dict:
        h = {"x-rayeval-served-by": model}
        if d is not None:
            h["x-rayeval-router"] = str(d.get("router"))
            h["x-rayeval-tier"] = d["tier"]
            if d.get("p") is not None:
                h["x-rayeval-win-probability"] = f"{d['p']:.6f}"
                h["x-rayeval-threshold"] = f"{d['threshold']:.6f}"
        return h

    # -- endpoints ------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self):
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        if (r := self._auth(request)) is not None:
            return r
        info = await _awaited(self.router.describe.remote())
        ids = list(self.llms) + ["router"] + [f"router-{n}" for n in info["routers"]]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "rayeval"} for i in ids]}

    @api.get("/stats")
    async def get_stats(self, request: Request):
        if (r := self._auth(request)) is not None:
            return r
        import numpy as np

        def pct(xs):
            if not xs:
                return {}
            a = np.asarray(xs) * 1e3
            return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "n": len(a)}

        out = {"ingress": {"pid": os.getpid(), **self.stats.snapshot(pct)}}
        try:
            out["router"] = await asyncio.wait_for(_awaited(self.router.describe.remote()), 5)
        except Exception as e:
            out["router"] = {"error": repr(e)}
        llms = {}
        for n, h in self.llms.items():
            try:
                llms[n] = await asyncio.wait_for(_awaited(h.info.remote()), 5)
            except Exception as e:
                llms[n] = {"error": repr(e)}
        out["llms"] = llms
        return out

    @api.post("/v1/route")
    async def route_only(self, request: Request):
        """The routing decision alone (no generation): for benchmarks and debugging."""
        if (r := self._auth(request)) is not None:
            return r
        try:
            body = await request.json()
            v = self._validate({"max_tokens": 1, **body}) if isinstance(body, dict) else self._validate(body)
            if v["kind"] != "router":
                raise BadRequest("/v1/route needs a router model name (router-<router>[-<threshold>])", "not_a_router")
            model, d = await self._target(v)
        except json.JSONDecodeError as e:
            return self._reject(400, f"invalid JSON: {e}", "invalid_json")
        except BadRequest as e:
            return self._reject(e.status, e.message, e.code)
        return JSONResponse({"model": model, **{k: d.get(k) for k in ("router", "p", "threshold", "tier", "fallback")}},
                            headers=self._headers(model, d))

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        t0 = time.perf_counter()
        if (r := self._auth(request)) is not None:
            return r
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"invalid JSON body: {e}", "invalid_json")
            v = self._validate(body)
            model, d = await self._target(v)
        except BadRequest as e:
            return self._reject(e.status, e.message, e.code)
        self.stats.count("accepted", kind=v["kind"])
        headers = self._headers(model, d)
        handle = self.llms[model]
        try:
            if v["stream"]:
                gen = handle.options(stream=True).chat_stream.remote(v["req"])
                first = await gen.__anext__()
                if "error" in first:
                    return self._reject(first.get("status", 400), first["error"], "prompt_too_long")
                return StreamingResponse(self._sse(first, gen, model, v, t0), media_type="text/event-stream",
                                         headers=headers)
            out = await handle.chat.remote(v["req"])
        except Exception as e:
            return self._overloaded_or_500(e, model)
        if "error" in out:
            return self._reject(out.get("status", 400), out["error"], "prompt_too_long")
        self._served(model, v["kind"], t0)
        return JSONResponse(out, headers=headers)

    def _overloaded_or_500(self, e: Exception, model: str) -> JSONResponse:
        from ray.serve.exceptions import BackPressureError

        if isinstance(e, BackPressureError) or "BackPressureError" in type(e).__name__:
            return self._reject(503, f"{model} is overloaded; retry later", "overloaded", "server_error",
                                headers={"Retry-After": "1"})
        if _replica_lost(e):  # the replica died mid-request; Serve is starting a new one
            self.stats.count("replica_lost", model=model)
            return self._reject(503, f"{model} replica was lost ({type(e).__name__}); retry later", "unavailable",
                                "server_error", headers={"Retry-After": "5"})
        self.stats.count("error_5xx", model=model)
        return self._reject(500, f"{model} failed: {type(e).__name__}: {e}"[:500], "internal_error", "server_error")

    def _served(self, model: str, kind: str, t0: float):
        self.stats.observe("latency", time.perf_counter() - t0, model=model)
        self.stats.count("served", model=model, kind=kind)

    async def _sse(self, first: dict, gen, model: str, v: dict, t0: float):
        try:
            yield f"data: {json.dumps(first)}\n\n"
            async for chunk in gen:
                if "usage" in chunk and not chunk.get("choices"):
                    if not v["include_usage"]:
                        continue
                yield f"data: {json.dumps(chunk)}\n\n"
            self._served(model, v["kind"], t0)
        except Exception as e:  # mid-stream failure: tell the client in-band
            self.stats.count("error_5xx", model=model)
            yield f"data: {json.dumps({'error': {'message': f'{type(e).__name__}: {e}'[:300], 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"


# --------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------

def _opts(extra: dict | None) -> dict:
    o = dict(extra or {})
    if "num_replicas" in o and "autoscaling_config" not in o:
        o["autoscaling_config"] = None
    return o


def router_dirs(a: AppArgs) -> dict[str, str]:
    return {n: str(d) if d else str(default_router_dir(n, a.default_router_data)) for n, d in a.routers.items()}


def build_app(args: dict | None = None):
    """The whole graph from ``args`` (see :class:`AppArgs`); used by ``serve run``/``serve deploy``."""
    a = parse_args(args)
    embedder = None
    if a.embedder is not None:
        emb_kw = dict(a.embedder)
        emb_dep = _opts(emb_kw.pop("deployment", None))
        embedder = Embedder.options(name="Embedder", **emb_dep).bind(**emb_kw)
    defaults = {"routers": router_dirs(a), "default_router": a.default_router, "thresholds": a.thresholds,
                "strong_model": a.strong_model, "weak_model": a.weak_model}
    router = RouterServer.options(name="Router", **_opts(a.router_deployment)).bind(embedder, defaults)
    llms = {}
    for name, spec in a.llms.items():
        spec = dict(spec or {})
        dep = _opts(spec.pop("deployment", None))
        llms[name] = LLMServer.options(name=_deployment_name(name), **dep).bind(name=name, **spec)
    settings = {k: getattr(a, k) for k in ("api_key_env", "max_prompt_chars", "max_tokens_limit", "default_max_tokens",
                                           "route_timeout_s", "fallback_model", "weak_model", "strong_model")}
    return Ingress.options(name="Ingress", **_opts(a.ingress)).bind(router, llms, settings)


def app_args_for(args: dict, router_name: str, router_dir: str, threshold: float, strong: str | None = None,
                 weak: str | None = None, only: bool = False) -> dict:
    """``args`` with a trained router folder added as the default router (used by the workflow).

    ``only``: serve that router alone (no build-time default routers), and no Embedder deployment
    when it does not need one (a static featurizer runs in the router replica)."""
    a = dict(args)
    keep = {} if only else a
    a["routers"] = {**(keep.get("routers") or {}), router_name: str(router_dir)}
    a["default_router"] = router_name
    a["thresholds"] = {**(keep.get("thresholds") or {}), router_name: float(threshold)}
    if only:
        from rayeval.route.routers import load_router
        from rayeval.serve.routing import uses_embedder

        if not uses_embedder(load_router(str(router_dir))):
            a["embedder"] = None
    llms = a.get("llms") or AppArgs().llms
    if strong in llms and weak in llms:
        a["strong_model"], a["weak_model"] = strong, weak
    return a
