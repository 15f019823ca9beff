"""Talk to a running gateway, and the workflow's "deploy with this router, send these prompts" step."""

from __future__ import annotations

import copy
import os
import time
from typing import Sequence

import pandas as pd


def base_url(cfg: dict | None = None, host: str = "127.0.0.1") -> str:
    port = ((cfg or {}).get("http_options") or {}).get("port", 8000)
    return f"http://{host}:{port}"


def openai_client(url: str, api_key: str | None = None, timeout: float = 120.0):
    from openai import OpenAI

    return OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or os.environ.get("RAYEVAL_API_KEY") or "none",
                  timeout=timeout, max_retries=0)


def chat(url: str, model: str, prompt: str, max_tokens: int = 32, api_key: str | None = None) -> dict:
    """One non-streaming request; returns the served model, routing headers, text and latency."""
    import httpx

    key = api_key or os.environ.get("RAYEVAL_API_KEY")
    t0 = time.perf_counter()
    r = httpx.post(url.rstrip("/") + "/v1/chat/completions", timeout=300,
                   headers={"Authorization": f"Bearer {key}"} if key else {},
                   json={"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens})
    dt = time.perf_counter() - t0
    out = {"prompt": prompt, "requested": model, "status": r.status_code, "latency_s": dt,
           "served_by": r.headers.get("x-rayeval-served-by"), "tier": r.headers.get("x-rayeval-tier"),
           "p_strong": float(r.headers["x-rayeval-win-probability"]) if "x-rayeval-win-probability" in r.headers else None}
    if r.status_code == 200:
        j = r.json()
        out.update(model=j["model"], text=j["choices"][0]["message"]["content"],
                   completion_tokens=j["usage"]["completion_tokens"])
    else:
        out["error"] = r.text[:300]
    return out


def deploy_and_query(config: str, router_dir: str, threshold: float | None, strong: str, weak: str,
                     prompts: Sequence[str], router_name: str = "trained", max_tokens: int = 32,
                     num_cpus: float | None = None, shutdown: bool = True, only: bool = False) -> pd.DataFrame:
    """Deploy ``config`` with the trained router (and its threshold) as the default, send ``prompts``
    through ``router-<name>-<threshold>``, and return one row per request.

    ``strong``/``weak`` name the router's models; when they are served models of the config they
    become its strong/weak models, otherwise the config's own pair is kept."""
    from ray import serve

    from rayeval.serve.app import app_args_for
    from rayeval.serve.deploy import app_config, deploy, load_config

    threshold = 0.5 if threshold is None else float(threshold)
    cfg = copy.deepcopy(load_config(config))
    app = app_config(cfg)
    app["args"] = app_args_for(app.get("args") or {}, router_name, router_dir, threshold, strong, weak,
                                 only=only)
    for d in app.get("deployments") or []:  # the config's hot user_config must not undo ours
        if d.get("name") == "Router":
            d.pop("user_config", None)
    if app["args"].get("embedder", {}) is None:  # no Embedder deployment to override
        app["deployments"] = [d for d in app.get("deployments") or [] if d.get("name") != "Embedder"]
    deploy(cfg, num_cpus=num_cpus or float((os.cpu_count() or 1) + 2))
    url = base_url(cfg)
    try:
        rows = [chat(url, f"router-{router_name}-{threshold}", p, max_tokens) for p in prompts]
    finally:
        if shutdown:
            serve.shutdown()
    return pd.DataFrame(rows)
