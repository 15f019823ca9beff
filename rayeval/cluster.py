"""Connect to a Ray cluster, or start a local one.  Token authentication stays on.

Resolution order: explicit ``address`` -> ``$RAY_ADDRESS`` -> a new local cluster.  Ray >= 2.59
enables token auth for local clusters and writes the token to ``~/.ray/auth_token``; for a remote
cluster pass it with ``$RAY_AUTH_TOKEN`` or ``$RAY_AUTH_TOKEN_PATH`` (Ray reads both).
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: float | None = None, resources: dict | None = None,
             runtime_env: dict | None = None, **kwargs: Any):
    """Idempotent ``ray.init``.  Returns Ray's context.

    Locally, ``num_cpus`` defaults to ``$RAYEVAL_NUM_CPUS`` or the machine's cores.  Logical CPUs
    are a scheduling budget: Serve graphs with light deployments may declare more than the cores.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        raise RuntimeError("RAY_AUTH_MODE=disabled: rayeval keeps Ray's token authentication on; unset it")
    address = address or os.environ.get("RAY_ADDRESS") or None
    kw: dict[str, Any] = {"log_to_driver": True, **kwargs}
    if runtime_env:
        kw["runtime_env"] = runtime_env
    if address:
        log.info("connecting to Ray at %s", address)
        return ray.init(address=address, **kw)
    if num_cpus is None:
        env = os.environ.get("RAYEVAL_NUM_CPUS")
        num_cpus = float(env) if env else float(os.cpu_count() or 1)
    kw.setdefault("include_dashboard", False)
    return ray.init(num_cpus=num_cpus, resources=resources, **kw)


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
