"""How a sharded job runs: the engine kind and its options, the actor pool's size and resources,
CPU pinning, restarts, the score cache (an ``engine:`` section of any config)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

# Keys of ``EvalConfig.engine`` that configure execution; every other key goes to the engine.
EXEC_KEYS = ("kind", "actors", "pools", "num_cpus", "num_gpus", "resources", "cpu_cores", "max_restarts", "fault", "cache",
             "hf", "vllm")
# Engine options each kind takes (besides ``from_pretrained`` / ``vllm.LLM`` passthrough below).
HF_KEYS = {"dtype", "num_threads", "batch_size", "max_tokens_per_batch", "max_kv_tokens", "row_tokens", "min_fill", "head_rows",
           "fuse", "packed", "keep_heap", "attention",
           "prefix_sharing", "max_model_len", "attn_implementation", "revision", "trust_remote_code"}


@dataclass
class Execution:
    kind: str = "auto"            # auto | vllm | hf | fake  (auto: hf on a CPU host, vllm on GPUs)
    actors: int = 1               # actor-pool size (one engine per model in each actor)
    # Evaluation with several models: "model", an actor pool per model, each actor one engine in
    # its own process (the resources below are then shared: each model's actors get their share);
    # "shared", every model's engine in each actor of one pool (engines of one process contend
    # for its interpreter lock: the paper-grid slice took 1.10x as long, docs/benchmarks.md).
    # Generation and judging run one model per job: one pool.
    pools: str = "model"
    num_cpus: float = 1.0         # logical CPUs per actor
    num_gpus: float = 0.0         # GPUs per actor (a cluster: 1, or the tensor-parallel size)
    resources: dict[str, float] = field(default_factory=dict)  # custom resources per actor, e.g. {"gpu_node": 1}
    cpu_cores: dict[str, str] = field(default_factory=dict)  # CPU pinning per model, e.g. {m1: "0", m2: "1"}
    max_restarts: int = 3         # actor restarts after a crash; its batch is retried
    fault: dict[str, Any] = field(default_factory=dict)      # test hook: {"crash_on_shard" | "kill_engine_core_on_shard": k, "marker": path}
    cache: bool | str = True      # score cache: true (local default folder), false, or a path / URI
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_engine_dict(cls, d: dict[str, Any]) -> "Execution":
        """From an ``engine:`` section.  ``hf:`` / ``vllm:`` sub-sections hold options for that kind
        only (used when it is the kind that runs, e.g. under ``kind: auto``); top-level options
        must suit the kind that runs: an option it does not take is an error here, not in an actor."""
        from rayeval.eval.engines import ENGINE_KINDS, resolve_kind

        d = dict(d or {})
        ex = {k: d.pop(k) for k in EXEC_KEYS if k in d}
        kind = ex.pop("kind", cls.kind)
        if kind not in ENGINE_KINDS:
            raise ValueError(f"engine.kind: {kind!r} is not one of {', '.join(ENGINE_KINDS)}")
        per_kind = {k: ex.pop(k) for k in ("hf", "vllm") if k in ex}
        for k, v in per_kind.items():
            if not isinstance(v, dict):
                raise ValueError(f"engine.{k}: expected a mapping of {k} engine options, got {v!r}")
        real = resolve_kind(kind)
        d.update(per_kind.get(real, {}))
        if real == "hf":
            bad = sorted(set(d) - HF_KEYS)
            if bad:
                raise ValueError(f"engine: option(s) {bad} do not apply to the hf engine (kind {kind!r} runs hf "
                                 f"here); it takes {sorted(HF_KEYS)}. Put vLLM-only options under engine.vllm")
        elif real == "vllm":
            bad = sorted(set(d) & (HF_KEYS - {"dtype", "max_model_len", "revision", "trust_remote_code"}))
            if bad:
                raise ValueError(f"engine: option(s) {bad} are hf engine options, not vllm.LLM arguments "
                                 f"(kind {kind!r} runs vllm here); put them under engine.hf")
        if ex.get("pools", "model") not in ("model", "shared"):
            raise ValueError(f"engine.pools: {ex['pools']!r} is not one of model, shared")
        cache = ex.get("cache", True)
        if not isinstance(cache, (bool, str)):
            raise ValueError(f"engine.cache: expected true, false or a path/URI, got {cache!r}")
        from rayeval.config import from_dict

        return from_dict(cls, {"kind": real, **ex, "engine_kwargs": d}, "engine")  # the types of every key

    def cache_path(self) -> str | None:
        from rayeval.eval.score_cache import default_cache_path

        if self.kind == "fake" or self.cache is False:
            return None
        return default_cache_path() if self.cache is True else str(self.cache)

    def engine_kwargs_for(self, model: str, cores: dict[str, str] | None = None) -> dict[str, Any]:
        """The options one model's engine gets: the section's options, plus its CPU pinning for a
        vLLM engine (``cores``: the pinning to use, default ``self.cpu_cores``)."""
        kw = dict(self.engine_kwargs)
        cores = self.cpu_cores if cores is None else cores
        if self.kind == "vllm" and cores.get(model):
            kw["cpu_cores"] = cores[model]
        return kw

    def pinning(self, models: Sequence[str]) -> dict[str, str]:
        """CPU pinning per model for engines that share one actor: the configured ``cpu_cores``, else
        (vLLM on a CPU host) one share of this process's cores each."""
        return default_cpu_cores(models) if self.kind == "vllm" and not self.cpu_cores else self.cpu_cores


def default_cpu_cores(models: Sequence[str]) -> dict[str, str]:
    """On a CPU-only host with several models in one actor, give each engine its own core(s)
    (vLLM pins its OpenMP threads; unpinned engines would all land on core 0)."""
    from rayeval.eval.engines import on_cpu

    if not on_cpu() or len(models) < 2:
        return {}
    avail = sorted(os.sched_getaffinity(0))
    if len(avail) < len(models):
        return {}
    per = len(avail) // len(models)
    out = {}
    for i, m in enumerate(models):
        mine = avail[i * per: (i + 1) * per]
        out[m] = ",".join(str(c) for c in mine)
    return out
