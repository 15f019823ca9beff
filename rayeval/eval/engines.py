"""Engines: take a batch of scoring requests, return numbers.  Nothing else talks to a model.

A request is a prompt plus either
  * ``symbols``: return the next-token log-probability of each symbol (one request per prompt), or
  * ``continuations``: return the summed log-likelihood of each continuation after the prompt,
    with its token count.
Scoring methods (symbol / hybrid / cloze) only build requests and reduce these numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from rayeval.eval.tokens import PrefixTrie, TokenJob, continuation_job, next_token_job, unique

if TYPE_CHECKING:  # pragma: no cover
    from rayeval.eval.score_cache import ScoreCache


@dataclass(frozen=True)
class ScoreRequest:
    prompt: str
    symbols: tuple[str, ...] | None = None
    continuations: tuple[str, ...] | None = None
    # chat turns ((role, content), ...): the engine renders them with its model's chat template
    # (``prompt`` then is the same prompt as raw text, for ordering and display)
    chat: tuple[tuple[str, str], ...] | None = None


@dataclass
class ScoreResult:
    # symbol requests: log P(symbol | prompt) per symbol (first token of " " + symbol)
    symbol_logprobs: list[float] | None = None
    # continuation requests: summed log P(continuation | prompt) and its token count, per continuation
    continuation_logprobs: list[float] | None = None
    continuation_tokens: list[int] | None = None
    extra: dict = field(default_factory=dict)


class Engine(Protocol):
    name: str

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]: ...


class FakeEngine:
    """A fast, deterministic test double.  Scores come from a hash of (prompt, option), plus an
    optional additive ``bias`` per symbol position (to imitate selection bias), so the same
    request always gets the same numbers.  Never a stand-in for the real path in the product."""

    name = "fake"

    def __init__(self, bias: Sequence[float] = (), seed: int = 0, delay_s: float = 0.0):
        self.bias = list(bias)
        self.seed = seed
        self.delay_s = float(delay_s)  # seconds per call: a shard takes a while, as on a real engine
        self.calls = 0

    def _h(self, *parts: str) -> float:
        h = hashlib.blake2b("\x1f".join((str(self.seed),) + parts).encode(), digest_size=8).digest()
        return -(int.from_bytes(h, "little") / 2**64) * 5.0  # in (-5, 0]

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        out = []
        for r in requests:
            key = r.prompt if not r.chat else repr(r.chat)
            if r.symbols is not None:
                lp = [self._h(key, s) + (self.bias[i] if i < len(self.bias) else 0.0)
                      for i, s in enumerate(r.symbols)]
                out.append(ScoreResult(symbol_logprobs=lp))
            else:
                conts = r.continuations or ()
                ntok = [max(1, len(c.split())) for c in conts]
                out.append(ScoreResult(continuation_logprobs=[self._h(key, c) * n for c, n in zip(conts, ntok)],
                                       continuation_tokens=ntok))
        return out


# --------------------------------------------------------------------------------------------
# Shared tokenization logic: both real engines score exactly the same token streams.
# --------------------------------------------------------------------------------------------

def symbol_token_ids(tokenizer, symbols: Sequence[str]) -> list[int] | None:
    """Token id of " <symbol>" for each symbol when every symbol is one distinct token, else None.

    ``None`` means the symbols must be scored as continuations (exact, one sequence each)."""
    ids = []
    for s in symbols:
        t = tokenizer.encode(" " + s, add_special_tokens=False)
        if len(t) != 1:
            return None
        ids.append(t[0])
    return ids if len(set(ids)) == len(ids) else None


def encode_prompt(tokenizer, prompt: str, add_bos: bool = False) -> list[int]:
    """Prompt tokens, with BOS first when the model needs it (``ModelSpec.add_bos``) or its
    tokenizer says so."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    bos = getattr(tokenizer, "bos_token_id", None)
    want = add_bos or bool(getattr(tokenizer, "add_bos_token", False))
    if bos is not None and want and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def chat_text(tokenizer, messages: Sequence, chat_template: str | None = None) -> str:
    """Chat turns rendered by the model's chat template with the assistant generation prompt.
    ``messages``: dicts with role/content, or (role, content) pairs.  ``chat_template`` is used
    only when the tokenizer has none (a registry entry's template for a prepared folder)."""
    msgs = [m if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in messages]
    kw: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
    if not getattr(tokenizer, "chat_template", None):
        if not chat_template:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ValueError(f"{name}: the tokenizer has no chat template, so chat turns cannot be rendered")
        kw["chat_template"] = chat_template
    return tokenizer.apply_chat_template(msgs, **kw)


def encode_chat(tokenizer, messages: Sequence, add_bos: bool = False, chat_template: str | None = None) -> list[int]:
    """Token ids of chat turns: the chat template's text, then the same BOS rule as raw prompts.
    Scoring, generation and serving all call this, so one chat is one token stream everywhere."""
    return encode_prompt(tokenizer, chat_text(tokenizer, messages, chat_template), add_bos)


def encode_continuation(tokenizer, context_ids: list[int], continuation: str) -> list[int]:
    """Tokens of ``continuation`` after the context.  Tokenized separately (lm-eval style) so the
    context tokens stay fixed; a leading space is kept when the continuation has one."""
    return tokenizer.encode(continuation, add_special_tokens=False)


def _expand(requests: Sequence[ScoreRequest], tokenizer, sym_cache: dict, add_bos: bool = False):
    """Turn requests into flat jobs: ('sym', req_index, ids, token_ids) or
    ('cont', req_index, option_index, context_ids, cont_ids)."""
    jobs = []
    for i, r in enumerate(requests):
        ctx = encode_chat(tokenizer, r.chat, add_bos) if r.chat else encode_prompt(tokenizer, r.prompt, add_bos)
        if r.symbols is not None:
            key = tuple(r.symbols)
            if key not in sym_cache:
                sym_cache[key] = symbol_token_ids(tokenizer, r.symbols)
            tids = sym_cache[key]
            if tids is not None:
                jobs.append(("sym", i, ctx, tids))
            else:
                for j, s in enumerate(r.symbols):
                    jobs.append(("cont", i, j, ctx, encode_continuation(tokenizer, ctx, " " + s)))
        else:
            for j, c in enumerate(r.continuations or ()):
                cont = encode_continuation(tokenizer, ctx, c)
                if not cont:
                    raise ValueError(f"request {i}: continuation {j} is empty after tokenization: {c!r}")
                jobs.append(("cont", i, j, ctx, cont))
    return jobs


def _assemble(requests: Sequence[ScoreRequest], jobs, values) -> list[ScoreResult]:
    out = [ScoreResult() for _ in requests]
    for r, res in zip(requests, out):
        n = len(r.symbols) if r.symbols is not None else len(r.continuations or ())
        if r.symbols is not None:
            res.symbol_logprobs = [float("nan")] * n
        else:
            res.continuation_logprobs = [float("nan")] * n
            res.continuation_tokens = [0] * n
    for job, val in zip(jobs, values):
        res = out[job[1]]
        if job[0] == "sym":
            res.symbol_logprobs = list(val)
        else:
            lp, ntok = val
            if requests[job[1]].symbols is not None:
                res.symbol_logprobs[job[2]] = lp
                res.extra["symbols_as_continuations"] = True
            else:
                res.continuation_logprobs[job[2]] = lp
                res.continuation_tokens[job[2]] = ntok
    return out


def shift_jobs(per_request_set: Sequence[Sequence[tuple]], sizes: Sequence[int]) -> list[tuple]:
    """The :func:`_expand` jobs of several request lists (``per_request_set[k]`` made from a list of
    ``sizes[k]`` requests) as the jobs of their concatenation: request indices move by the
    requests before them."""
    out, off = [], 0
    for jobs, n in zip(per_request_set, sizes):
        out.extend((j[0], j[1] + off, *j[2:]) for j in jobs)
        off += n
    return out


def token_job(job) -> TokenJob:
    """The :class:`TokenJob` of one ``_expand`` job."""
    if job[0] == "sym":
        return next_token_job(job[2], job[3])
    return continuation_job(job[3], job[4])


def _gpu_device_nodes() -> bool:
    """Whether this host exposes a GPU device node (NVIDIA's ``/dev/nvidia<N>``, ROCm's
    ``/dev/kfd``, WSL's ``/dev/dxg``): without one, no CUDA or ROCm runtime can see a device."""
    import glob

    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd") or os.path.exists("/dev/dxg")


def on_cpu() -> bool:
    """No GPU for torch here.  A host without GPU device nodes answers without importing torch
    (1.2 s of the driver's start before a run on a CPU host, where nothing else of the driver's
    needs torch); otherwise torch says."""
    if "torch" not in sys.modules and sys.platform.startswith("linux") and not _gpu_device_nodes():
        return True
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return True


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls (AMX or AVX512-BF16): then bf16 is the fast CPU dtype, else fp32 is
    (without them bf16 matmuls are emulated and run tens of times slower than fp32)."""
    from rayeval.host import cpu_flags

    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def vllm_cpu_defaults() -> dict[str, Any]:
    """vLLM engine options on a CPU host, for scoring, generation and serving alike: the fast
    dtype of this CPU (bf16 with AMX / AVX512-BF16, else fp32: a 501-token Gemma-3 prompt took
    6.8 s in bf16 and 2.3 s in fp32 on an AVX2-only EPYC), eager mode, and a fixed 1 GiB KV cache
    (which skips vLLM's check that reserves a share of the whole NUMA node, failing beside other
    processes)."""
    return {"dtype": hf_dtype("auto"), "enforce_eager": True, "kv_cache_memory_bytes": 1 << 30}


def vllm_engine_args(model: str, engine_kwargs: dict | None = None, cpu_cores: str | None = None, *,
                     max_model_len: int = 2048, in_process: bool = False) -> tuple[Path, dict[str, Any]]:
    """The one place that assembles a vLLM engine, for scoring and generation (``vllm.LLM``,
    :class:`VLLMEngine`) and the Serve LLM deployment (``AsyncLLM``): the model's path (registry
    name, folder or hub id) and its engine arguments: ``max_model_len`` and a fixed seed, this
    host's CPU defaults (:func:`vllm_cpu_defaults`; ``in_process``: the model runs inside the
    engine-core process, no third worker process), the registry's per-model defaults, then the
    caller's ``engine_kwargs`` (they win).  On a CPU host ``cpu_cores`` pins the engine's OpenMP
    threads (e.g. "0" and "1" for two engines on 2 cores; read by the engine-core process at spawn)."""
    from rayeval.models import get_spec, resolve_model

    cpu = on_cpu()
    if cpu_cores is not None and cpu:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cpu_cores)
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    kw: dict[str, Any] = {"max_model_len": int(max_model_len), "seed": 0}
    if cpu:
        kw.update(vllm_cpu_defaults())
        if in_process:  # 12 s less per Serve replica start on this CPU (20.7 vs 33.1 s)
            kw["distributed_executor_backend"] = "uni"
    kw.update(get_spec(model).engine_defaults)
    kw.update(engine_kwargs or {})
    if cpu and kw.get("distributed_executor_backend") == "uni":
        # vLLM's CPU platform turns "uni" back into "mp" unless in-process mode is declared;
        # the engine-core process stays either way (only the worker process goes).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return resolve_model(model), kw


def hf_dtype(dtype: str = "auto") -> str:
    if dtype == "auto":
        return "float32" if on_cpu() and not cpu_has_bf16() else "bfloat16"
    return dtype


def hf_fuse(fuse: Any = "auto", dtype: str = "auto") -> bool:
    """Whether the HF engine fuses its elementwise kernels (``rayeval.eval.fused``): ``auto`` on a
    CPU host running bf16, where they are a quarter of the forward pass; true / false to force."""
    if fuse == "auto":
        return on_cpu() and hf_dtype(dtype) == "bfloat16"
    return bool(fuse)


def _dist_version(*names: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for n in names:
        try:
            return f"{n}=={version(n)}"
        except PackageNotFoundError:
            continue
    return "unknown"


def hf_attention(attention: str = "auto", dtype: str = "auto", packed: Any = "auto", head_dim: int | None = None) -> bool:
    """Whether an HF engine's packed passes attend with :mod:`rayeval.eval.cpu_attention`'s AMX
    kernel (bf16 on a CPU that can build it, a head size it takes), as far as the host, the options
    and the model's config tell; the engine also needs the kernel's load-time check to pass."""
    if attention not in ("auto", "sdpa", "amx"):
        raise ValueError(f"attention: {attention!r} is not one of auto, sdpa, amx")
    if attention == "sdpa" or packed is False or hf_dtype(dtype) != "bfloat16" or not on_cpu():
        return False
    from rayeval.eval.cpu_attention import available, supports

    return (head_dim is None or supports(head_dim)) and available()


def config_head_dim(path) -> int | None:
    """The attention head size a model folder's ``config.json`` declares (None if it does not say)."""
    try:
        c = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    c = c.get("text_config", c)
    if c.get("head_dim"):
        return int(c["head_dim"])
    if c.get("hidden_size") and c.get("num_attention_heads"):
        return int(c["hidden_size"]) // int(c["num_attention_heads"])
    return None


def engine_identity(kind: str, model: str, engine_kwargs: dict | None = None) -> dict | None:
    """What an engine's numbers depend on besides the token ids (the score cache's key space):
    engine kind and version, dtype, the weights' fingerprint.  None for the fake engine."""
    from rayeval.eval.score_cache import weights_fingerprint
    from rayeval.models import resolve_model

    kind = resolve_kind(kind)
    if kind == "fake":
        return None
    kw = engine_kwargs or {}
    path = resolve_model(model)
    if kind == "hf":
        ident = {"engine": "hf", "version": _dist_version("transformers"), "dtype": hf_dtype(kw.get("dtype", "auto"))}
        if hf_fuse(kw.get("fuse", "auto"), kw.get("dtype", "auto")):
            from rayeval.eval.fused import kernels_version

            ident["kernels"] = kernels_version(hf_dtype(kw.get("dtype", "auto")))
        if hf_attention(kw.get("attention", "auto"), kw.get("dtype", "auto"), kw.get("packed", "auto"),
                        config_head_dim(path)):
            from rayeval.eval.cpu_attention import VERSION

            ident["attention"] = VERSION
    else:
        from rayeval.models import get_spec

        dtype = kw.get("dtype") or get_spec(model).engine_defaults.get("dtype") or (
            vllm_cpu_defaults()["dtype"] if on_cpu() else "auto")
        ident = {"engine": "vllm", "version": _dist_version("vllm", "vllm-cpu"), "dtype": str(dtype)}
    ident["weights"] = weights_fingerprint(path)
    return ident


def keep_heap() -> bool:
    """glibc only: keep freed memory in this process's heap instead of handing it back to the OS.

    A CPU forward pass allocates and frees activations of megabytes per layer.  glibc's defaults
    return such blocks to the kernel (``mmap`` above a threshold, heap trimming above another), so
    the next layer page-faults the same memory in again: on SmolLM2's zero-shot MMLU that was 13-15%
    of the wall time and most of the system time (docs/benchmarks.md).  Blocks up to 32 MiB (the
    largest ``M_MMAP_THRESHOLD`` glibc takes) now come from the heap, and the heap is never
    trimmed: the process keeps its peak resident size, as an inference engine's memory pool does.
    Process-wide; returns whether it applied (False off glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    ok = mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    ok &= mallopt(M_TOP_PAD, 64 << 20) == 1
    return bool(ok)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class TokenEngine:
    """What every real engine shares: requests -> token jobs (``_expand``, the one tokenization
    path) -> distinct jobs -> score cache -> ``_compute`` of the misses -> results.

    Subclasses set ``name``, ``tokenizer``, ``add_bos``, ``max_model_len``, ``identity`` (what the
    numbers depend on besides the token ids) and implement ``_compute(jobs)``: for a next-token
    job the log-probability of each candidate, for a continuation job ``(summed logprob, n)``.
    ``stats`` counts the work: jobs asked, distinct, cache hits, tokens asked for and computed."""

    name: str
    tokenizer: Any
    add_bos: bool = False
    max_model_len: int = 2048
    cache: "ScoreCache | None" = None
    len_inclusive = False  # True: a sequence may not reach max_model_len (vLLM needs room for 1 token)

    def _init_common(self, cache: str | None, identity: dict) -> None:
        self._sym_cache: dict = {}
        self.identity = identity
        self.stats = {k: 0 for k in ("requests", "jobs", "distinct_jobs", "cache_hits", "tokens_requested",
                                     "tokens_distinct", "tokens_computed")}
        self.stats["compute_s"] = 0.0
        if cache:
            from rayeval.eval.score_cache import ScoreCache

            self.cache = ScoreCache(cache, identity)

    def token_jobs(self, requests: Sequence[ScoreRequest]) -> tuple[list, list[TokenJob]]:
        jobs = _expand(requests, self.tokenizer, self._sym_cache, self.add_bos)
        return jobs, [token_job(j) for j in jobs]

    def _check_len(self, job: TokenJob, i: int) -> None:
        n = len(job.ids)
        if n > self.max_model_len or (self.len_inclusive and n >= self.max_model_len):
            raise ValueError(f"request {i}: prompt has {n} tokens, over max_model_len={self.max_model_len}")

    def score(self, requests: Sequence[ScoreRequest], jobs: Sequence | None = None) -> list[ScoreResult]:
        """Scores of ``requests``.  ``jobs``: their token jobs as :func:`_expand` made them with
        this model's tokenizer (the driver's plan ships them with each shard, :func:`shift_jobs`),
        so the engine neither tokenizes again nor loads its tokenizer's vocabulary."""
        if jobs is None:
            jobs, tjobs = self.token_jobs(requests)
        else:
            tjobs = [token_job(j) for j in jobs]
        for job, tj in zip(jobs, tjobs):
            self._check_len(tj, job[1])
        uniq, where = unique(tjobs)
        vals: list = [None] * len(uniq)
        if self.cache is not None:
            vals = self.cache.get_many([u.key for u in uniq])
        miss = [k for k, v in enumerate(vals) if v is None]
        t0 = time.perf_counter()
        computed = self._compute([uniq[k] for k in miss]) if miss else []
        self.stats["compute_s"] += time.perf_counter() - t0
        for k, v in zip(miss, computed):
            vals[k] = v
        if self.cache is not None and miss:
            self.cache.put_many([uniq[k] for k in miss], computed)
        s = self.stats
        s["requests"] += len(requests)
        s["jobs"] += len(tjobs)
        s["distinct_jobs"] += len(uniq)
        s["cache_hits"] += len(uniq) - len(miss)
        s["tokens_requested"] += sum(len(j.ids) for j in tjobs)
        s["tokens_distinct"] += sum(len(j.ids) for j in uniq)
        s["tokens_computed"] += self._tokens_computed([uniq[k] for k in miss])
        return _assemble(requests, jobs, [vals[k] for k in where])

    def _tokens_computed(self, jobs: Sequence[TokenJob]) -> int:
        return sum(len(j.ids) for j in jobs)

    def _compute(self, jobs: Sequence[TokenJob]) -> list:  # pragma: no cover - abstract
        raise NotImplementedError


class EngineDead(RuntimeError):
    """An engine's own worker process died (OOM killer, segfault): the engine cannot be used again.
    Sharded actors turn it into their own exit (:func:`rayeval.eval.pipeline.crash_only`), so Ray
    restarts them and retries the shard."""


def engine_died(e: BaseException) -> bool:
    """Is ``e`` an engine's death (ours, or vLLM's ``EngineDeadError``)?"""
    return isinstance(e, EngineDead) or type(e).__name__ == "EngineDeadError"


class VLLMEngine(TokenEngine):
    """The real engine: one ``vllm.LLM`` per model.

    Next-token jobs are ONE generation step per prompt with ``logprob_token_ids`` (vLLM >= 0.30)
    returning the raw next-token log-probabilities of exactly the candidate tokens (on older vLLM
    the top-``max_logprobs`` list); such requests go through vLLM's automatic prefix cache.
    Continuation jobs use ``prompt_logprobs=0`` over context+continuation token ids, and read the
    prefix cache too (``cached_prompt_logprobs``, default on; vLLM skips it for prompt-logprob
    requests unless told): the context's cached blocks are not recomputed, and only positions
    after them are read (a job whose cached part reaches into its continuation is recomputed
    without the cache).  Jobs go to vLLM sorted by token ids, so requests that share a prefix are
    neighbours; ``stats["tokens_computed"]`` counts what vLLM did not find cached.  On CPU the
    defaults are :func:`vllm_cpu_defaults` (the CPU's fast dtype, eager mode); on a GPU cluster
    vLLM's own defaults apply.  Extra
    ``engine_kwargs`` go straight to ``vllm.LLM``."""

    len_inclusive = True

    def __init__(self, model: str, engine_kwargs: dict | None = None):
        from vllm import LLM, SamplingParams

        from rayeval.models import get_spec

        self.name = model
        engine_kwargs = dict(engine_kwargs or {})
        cache = engine_kwargs.pop("score_cache", None)
        self.cached_prompt_logprobs = bool(engine_kwargs.pop("cached_prompt_logprobs", True))
        path, kw = vllm_engine_args(model, engine_kwargs, engine_kwargs.pop("cpu_cores", None))
        spec = get_spec(model)
        self.llm = LLM(model=str(path), **kw)
        self.tokenizer = self.llm.get_tokenizer()
        self.add_bos = spec.add_bos
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._SP = SamplingParams
        fields = getattr(SamplingParams, "__struct_fields__", None) or vars(SamplingParams())
        self._has_token_ids = "logprob_token_ids" in fields
        self._can_read_cache = "skip_reading_prefix_cache" in fields
        self._computed = 0
        self._init_common(cache, engine_identity("vllm", model, kw))
        self._closing, self._dead = False, None
        self._watch_engine_core()

    def engine_core_pids(self) -> list[int]:
        """The pids of this engine's engine-core processes ([] for an in-process engine)."""
        return [p.pid for p in self._engine_procs()]

    def _core(self):
        """vLLM's engine-core client (``None`` once closed)."""
        return getattr(getattr(getattr(self, "llm", None), "llm_engine", None), "engine_core", None)

    def _engine_procs(self) -> list:
        mgr = getattr(getattr(self._core(), "resources", None), "engine_manager", None)
        return list(getattr(mgr, "processes", None) or [])

    def _watch_engine_core(self) -> None:
        """vLLM notices a dead engine-core process but leaves a blocked ``generate`` waiting for
        outputs that never come (the evaluation then hangs).  This thread waits on the processes
        and, when one dies while the engine is open, fails the waiting call with :class:`EngineDead`."""
        import threading
        from multiprocessing.connection import wait

        procs = self._engine_procs()
        if not procs:  # in-process engine: a crash takes this process with it
            return
        core = self._core()

        def watch():
            wait([p.sentinel for p in procs])
            if self._closing:
                return
            for p in procs:
                p.join(timeout=1)  # reap, so the exit code is known
            codes = {p.name: p.exitcode for p in procs if p.exitcode is not None}
            self._dead = f"{self.name}: vLLM engine-core process died (exit codes {codes})"
            queue = getattr(core, "outputs_queue", None)
            if queue is not None:  # wakes a generate() blocked on engine outputs
                queue.put_nowait(EngineDead(self._dead))

        threading.Thread(target=watch, name=f"rayeval-engine-watch-{self.name}", daemon=True).start()

    def generate(self, prompts: list, params: list) -> list:
        """``vllm.LLM.generate`` that raises :class:`EngineDead` instead of hanging or failing
        obscurely when the engine-core process is gone."""
        if self._dead:
            raise EngineDead(self._dead)
        try:
            return self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as e:
            if self._dead or engine_died(e):
                raise EngineDead(self._dead or f"{self.name}: vLLM engine is dead ({e!r})") from e
            raise

    def close(self) -> None:
        """Stop the engine-core process now (rather than at interpreter exit)."""
        self._closing = True
        core = self._core()
        if core is not None:
            core.shutdown()
        self.llm = None

    def _params(self, j: TokenJob, read_cache: bool):
        # detokenize off: scoring reads numbers only (and cached positions of a prompt-logprob
        # request hold no tokens to decode)
        sp = dict(max_tokens=1, temperature=0.0, detokenize=False)
        if j.next_token and self._has_token_ids:
            return self._SP(**sp, logprob_token_ids=list(j.cands))
        if j.next_token:  # pragma: no cover - older vLLM
            return self._SP(**sp, logprobs=20)
        if self._can_read_cache:
            return self._SP(**sp, prompt_logprobs=0, skip_reading_prefix_cache=not read_cache)
        return self._SP(**sp, prompt_logprobs=0)  # pragma: no cover - older vLLM

    def _compute(self, jobs: Sequence[TokenJob]) -> list:
        from vllm.inputs import TokensPrompt

        order = sorted(range(len(jobs)), key=lambda k: jobs[k].ids)   # shared prefixes side by side
        outs: list = [None] * len(jobs)
        todo, read = order, self.cached_prompt_logprobs
        self._computed = 0
        while todo:
            got = self.generate([TokensPrompt(prompt_token_ids=list(jobs[k].ids)) for k in todo],
                                [self._params(jobs[k], read) for k in todo])
            redo = []
            for k, o in zip(todo, got):
                cached = int(getattr(o, "num_cached_tokens", 0) or 0)
                if not jobs[k].next_token and cached >= jobs[k].start:
                    redo.append(k)  # its first scored position came from the cache: no logprob there
                    continue
                outs[k] = o
                self._computed += len(jobs[k].ids) - cached
            todo, read = redo, False
        values = []
        for j, o in zip(jobs, outs):
            if j.next_token:
                lp = o.outputs[0].logprobs[0]
                values.append([lp[t].logprob if t in lp else -1e9 for t in j.cands])
            else:
                plp = o.prompt_logprobs
                values.append((sum(plp[p][j.ids[p]].logprob for p in range(j.start, len(j.ids))),
                               len(j.ids) - j.start))
        return values

    def _tokens_computed(self, jobs: Sequence[TokenJob]) -> int:
        return self._computed if jobs else 0  # what the last _compute found not cached


class HFEngine(TokenEngine):
    """A transformers engine that computes every shared prefix once.

    The distinct jobs of a call become a :class:`PrefixTrie`; the trie is run shallowest level
    first (a node's tokens with its parent's KV cache as the past), so a few-shot block shared by
    a subject's questions, the prompt shared by its hybrid continuations, or a symbol prompt that
    is the prefix of the same item's hybrid context are computed once.  A level's nodes form rows
    (siblings share one); a forward pass is one packed sequence of up to ``max_tokens_per_batch``
    real tokens from many rows, of one level or several (a node may share a pass with its
    parent), with attention per group of rows on top of their parents' caches
    (:mod:`rayeval.eval.packed`; ``packed: false``: a level per pass, rows right-padded in the
    model's own attention, parent caches left-padded).  The vocabulary head runs only at the positions a job
    reads, and in packed passes so does the last layer past its attention (its feed-forward and
    the final norm; :func:`rayeval.eval.fused.cut_last_layer`).  ``prefix_sharing: false`` runs
    every distinct sequence from scratch (the trie then has one node per sequence): the reference
    the tests compare against.

    Options: ``dtype`` (``auto``: bf16 where the CPU has native bf16 matmuls or on GPU, else
    fp32), ``num_threads`` (default: every core this process may use), ``batch_size`` (rows per
    attention group; padded: per pass), ``max_tokens_per_batch`` (tokens per forward pass; 8,192
    packed, 4,096 padded),
    ``max_kv_tokens`` (keys per attention group, parents' included), ``row_tokens`` (sibling tokens
    packed per row), ``min_fill`` (a row must fill this share of its attention group's query and
    key lengths, else it opens another group: attention padding stays small), ``packed`` (``auto``: packed passes where the
    model's attention allows),
    ``head_rows`` (read positions per vocabulary-head call: 4,096 where the head runs in
    vocabulary chunks, fused engines on a CPU; else 256; 0: the head after every forward pass),
    ``fuse`` (``auto``: fused elementwise kernels on a bf16 CPU, C where the CPU has AVX512-BF16,
    else compiled, :mod:`rayeval.eval.fused`),
    ``attention`` (``auto``: packed bf16 passes attend on AMX tiles where the CPU has them,
    :mod:`rayeval.eval.cpu_attention`; ``sdpa``: PyTorch's kernel; ``amx``: the tiles or an error),
    ``keep_heap`` (``auto``: on a CPU host, freed activations stay in the process heap,
    :func:`keep_heap`),
    ``prefix_sharing``, ``score_cache``;
    anything else goes to ``from_pretrained``."""

    def __init__(self, model: str, engine_kwargs: dict | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        from rayeval.eval.tokenizer import load_tokenizer
        from rayeval.models import get_spec, resolve_model

        kw = dict(engine_kwargs or {})
        self.name = model
        self.batch_size = int(kw.pop("batch_size", 64))
        max_tokens = kw.pop("max_tokens_per_batch", None)
        self.max_kv_tokens = int(kw.pop("max_kv_tokens", 65536))
        dtype = hf_dtype(kw.pop("dtype", "auto"))
        fuse = hf_fuse(kw.pop("fuse", "auto"), dtype)
        bf16_cpu = on_cpu() and dtype == "bfloat16"
        # Siblings packed per row: every token of a row attends to the whole row, masked.  With
        # native bf16 matmuls attention is the larger cost and one question per row pays (1.07x
        # on zero-shot MMLU, docs/benchmarks.md); in fp32 the fewer, longer rows did (1.70x with
        # bucketing and head chunks).
        self.row_tokens = int(kw.pop("row_tokens", 64 if bf16_cpu else 256))
        self.min_fill = float(kw.pop("min_fill", 0.75))
        head_rows = kw.pop("head_rows", None)
        self.prefix_sharing = bool(kw.pop("prefix_sharing", True))
        packed = kw.pop("packed", "auto")
        cache = kw.pop("score_cache", None)
        limit = kw.pop("max_model_len", None)
        threads = kw.pop("num_threads", None) or default_threads()
        heap = kw.pop("keep_heap", "auto")
        attention = kw.pop("attention", "auto")
        try:
            amx = hf_attention(attention, dtype, packed)
        except ValueError as e:
            raise ValueError(f"{model}: {e}") from None
        self.keep_heap = keep_heap() if (on_cpu() if heap == "auto" else bool(heap)) else False
        torch.set_num_threads(int(threads))
        path = resolve_model(model)
        self.tokenizer = load_tokenizer(path)
        self.add_bos = get_spec(model).add_bos
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype), **kw).eval()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.dtype = dtype
        self.base = getattr(self.model, self.model.base_model_prefix)
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        cfg = self.model.config
        sliding = "sliding_attention" in (getattr(cfg, "layer_types", None) or ())
        self.window = int(cfg.sliding_window) if sliding and getattr(cfg, "sliding_window", None) else 0
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
        if limit:
            self.max_model_len = min(self.max_model_len, int(limit))
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._torch = torch
        self.fused: list[str] = []
        if fuse:
            from rayeval.eval.fused import fuse_elementwise

            self.fused = fuse_elementwise(self.model)
        from rayeval.eval.fused import logsumexp_fp32

        self._lse = logsumexp_fp32(compiled=bool(self.fused))
        # With fused kernels the vocabulary head runs in chunks of the vocabulary (_head_chunked)
        lm = getattr(self.model, "lm_head", None)
        self.vocab_chunk = 2048 if self.fused and isinstance(lm, torch.nn.Linear) and self.device == "cpu" else 0
        # read positions per head call: the head's weights stream from memory once per call; whole
        # logits rows need a bound (Gemma-3: 0.5 MB each), vocabulary chunks do not (0.72 vs 1.28 ms
        # per position on the paper grid's Gemma-3 shards: 4,096 against 256)
        self.head_rows = int(head_rows if head_rows is not None else (4096 if self.vocab_chunk else 256))
        # Packed passes (rayeval.eval.packed) run their own SDPA: the default, unless another
        # attention implementation is asked for or the model soft-caps its attention logits.
        can_pack = kw.get("attn_implementation") in (None, "sdpa") and not getattr(cfg, "attn_logit_softcapping", None)
        self.packed = can_pack if packed == "auto" else bool(packed)
        if self.packed and not can_pack:
            raise ValueError(f"{model}: packed passes need SDPA attention without logit soft-capping; set packed: false")
        # Tokens per forward pass: packed passes have no padding, and 8,192 rows ran the bf16
        # matmuls 4% faster than 4,096 on zero-shot MMLU (both packaged models; docs/benchmarks.md);
        # padded passes keep 4,096 (their padding grows with the pass)
        self.max_tokens_per_batch = int(max_tokens or (8192 if self.packed else 4096))
        self.cut = False   # packed passes: the last layer goes on past its attention with read rows only
        if self.packed:
            from rayeval.eval.fused import cut_last_layer
            from rayeval.eval.packed import install

            install(self.model)
            self.cut = cut_last_layer(self.model)
        # Packed bf16 groups on AMX tiles where the CPU has them (rayeval.eval.cpu_attention)
        self.attention_kernel = None
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if self.packed and amx:
            from rayeval.eval.cpu_attention import load, supports

            self.attention_kernel = load() if supports(head_dim) else None
        if attention == "amx" and self.attention_kernel is None:
            raise ValueError(f"{model}: attention: amx needs packed bf16 passes on a CPU with AMX-BF16, a C "
                             f"compiler and a head size that is a multiple of 32 up to 256 (this model's: {head_dim})")
        ident = engine_identity("hf", model, {"dtype": dtype, "fuse": bool(self.fused), "attention": attention,
                                              "packed": self.packed})
        if self.attention_kernel is None:
            ident.pop("attention", None)   # what this engine computes with, whatever the host promised
        if ident.get("kernels"):   # (none unless this engine fused) the set it runs, whatever the host promised
            from rayeval.eval.fused import KERNELS, KERNELS_C, c_kernels

            if ident["kernels"] == KERNELS_C and c_kernels() is None:
                ident["kernels"] = KERNELS
        self._init_common(cache, ident)

    def _trie(self, jobs: Sequence[TokenJob]) -> PrefixTrie:
        seqs = [j.ids for j in jobs]
        return PrefixTrie(seqs) if self.prefix_sharing else PrefixTrie.flat(seqs)

    def _tokens_computed(self, jobs: Sequence[TokenJob]) -> int:
        return self._last_trie_size if jobs else 0  # the trie _compute just ran (flat without sharing)

    def _head_logprobs(self, h, inv, ti):
        """log p(token ``ti[i]`` | position ``inv[i]``) for hidden states ``h`` at distinct positions:
        the fp32 log-sum-exp over the model-dtype logits (fused engines on a CPU: in vocabulary
        chunks, :meth:`_head_chunked`; elsewhere with fused kernels one compiled pass, no fp32 copy
        of Gemma-3's 262k-wide rows; soft-capped logits are fp32 already)."""
        if self.vocab_chunk:
            return self._head_chunked(h, inv, ti)
        logits = self.model.lm_head(h)
        if self.softcap:
            logits = self._torch.tanh(logits.float() / self.softcap) * self.softcap
        return logits[inv, ti].float() - self._lse(logits)[inv]

    def _head_chunked(self, h, inv, ti):
        """:meth:`_head_logprobs` over ``vocab_chunk`` rows of the head's weights at a time: each
        chunk's logits (the same products, bf16) stay in cache for their log-sum-exp and for the
        reads whose token they hold; the chunks' log-sum-exps combine in fp32.  No [rows, vocab]
        logits in memory: Gemma-3's 262k-wide head ran 1.5-1.6x faster on 256-1024 rows, and its
        results move by fp32 rounding of the normaliser only (docs/benchmarks.md)."""
        torch = self._torch
        lm, V = self.model.lm_head, self.vocab_chunk
        n = lm.weight.shape[0]
        chunk = torch.div(ti, V, rounding_mode="floor")
        order = torch.argsort(chunk, stable=True)
        counts = torch.bincount(chunk, minlength=(n + V - 1) // V).tolist()
        target = torch.empty(ti.shape[0], dtype=torch.float32, device=h.device)
        lses, a = [], 0
        for c, k in enumerate(counts):
            c0 = c * V
            logits = torch.nn.functional.linear(h, lm.weight[c0: c0 + V], None if lm.bias is None else lm.bias[c0: c0 + V])
            if self.softcap:
                logits = torch.tanh(logits.float() / self.softcap) * self.softcap
            if k:
                sel = order[a: a + k]
                a += k
                target[sel] = logits[inv[sel], ti[sel] - c0].float()
            lses.append(torch.logsumexp(logits.float(), -1))
        return target - torch.logsumexp(torch.stack(lses, -1), -1)[inv]

    def _rows(self, nodes: list[int], trie: PrefixTrie) -> list[list[int]]:
        """One level's nodes as rows: siblings share a row (their parent's cache appears once),
        up to ``row_tokens`` tokens; a longer node gets a row of its own."""
        by_parent: dict[int, list[int]] = {}
        for n in nodes:
            by_parent.setdefault(trie.parent[n], []).append(n)
        rows = []
        for kids in by_parent.values():
            kids.sort(key=lambda n: trie.lo[n] - trie.hi[n])
            row: list[int] = []
            used = 0
            for n in kids:
                s = trie.hi[n] - trie.lo[n]
                if row and used + s > self.row_tokens:
                    rows.append(row)
                    row, used = [], 0
                row.append(n)
                used += s
            rows.append(row)
        return rows

    @staticmethod
    def _lengths(rows: list[list[int]], trie: PrefixTrie) -> tuple[list[int], list[int]]:
        """Each row's query tokens (its nodes' tokens) and parent-path length."""
        return [sum(trie.hi[n] - trie.lo[n] for n in r) for r in rows], [trie.lo[r[0]] for r in rows]

    def _batches(self, rows: list[list[int]], trie: PrefixTrie):
        """Pack rows into forward passes: longest first, bounded rows, query tokens, cache tokens."""
        q, p = self._lengths(rows, trie)
        order = sorted(range(len(rows)), key=lambda i: (-q[i], -p[i]))
        batch: list[int] = []
        for i in order:
            if batch:
                qmax = q[batch[0]]
                pmax = max(p[j] for j in batch + [i])
                b = len(batch) + 1
                # rows are sorted longest first: a row much shorter than the batch's first would
                # be mostly padding, so it opens the next batch instead
                if (b > self.batch_size or b * qmax > self.max_tokens_per_batch or b * (pmax + qmax) > self.max_kv_tokens
                        or q[i] < self.min_fill * qmax):
                    yield [rows[j] for j in batch]
                    batch = []
            batch.append(i)
        if batch:
            yield [rows[j] for j in batch]

    def _compute(self, jobs: Sequence[TokenJob]) -> list:
        torch = self._torch
        trie = self._trie(jobs)
        self._last_trie_size = trie.size
        reads: dict[int, list[tuple[int, int, int, int]]] = {}
        for k, j in enumerate(jobs):
            for slot, (pos, tok) in enumerate(j.queries()):
                node, o = trie.locate(k, pos)
                reads.setdefault(node, []).append((o, tok, k, slot))
        is_next = [j.next_token for j in jobs]
        values: list = [[0.0] * len(j.cands) if j.next_token else [0.0, len(j.ids) - j.start] for j in jobs]
        self._pending: list = []  # (hidden states at read positions, their reads), headed at the end
        with torch.inference_mode():
            if self.packed:
                from rayeval.eval.packed import KVStore

                store = KVStore(trie, self.device)  # the keys/values of every node with children
                for groups in self._passes(trie):
                    self._forward_packed(groups, trie, store, reads)
                    if not self.head_rows:  # head_rows 0: the head after every pass (the reference)
                        self._read_heads(values, is_next)
            else:
                kv: dict[int, list] = {}  # padded passes: node -> per layer (keys, values) of its whole path
                for level in trie.levels():
                    nxt: dict[int, list] = {}
                    for batch in self._batches(self._rows(level, trie), trie):
                        self._forward(batch, trie, kv, nxt, reads)
                        if not self.head_rows:
                            self._read_heads(values, is_next)
                    kv = nxt
            self._read_heads(values, is_next)
        return [v if j.next_token else (v[0], int(v[1])) for j, v in zip(jobs, values)]

    def _read_heads(self, values, is_next) -> None:
        """The vocabulary head over every read position of the call at once, in chunks of
        ``head_rows``: its weights (Gemma-3: 262k x 640) stream from memory once per chunk, not once
        per forward pass."""
        torch = self._torch
        if not self._pending:
            return
        h = torch.cat([p[0] for p in self._pending])
        want = [(q + off, tok, k, slot) for off, (_, w) in zip(self._offsets(), self._pending) for q, tok, k, slot in w]
        self._pending = []
        qi = torch.tensor([w[0] for w in want], device=h.device)
        ti = torch.tensor([w[1] for w in want], device=h.device)
        lp = torch.empty(len(want))
        step = self.head_rows or len(want)
        for a in range(0, len(want), step):
            # the positions these reads use, headed once each
            rows, inv = torch.unique(qi[a: a + step], return_inverse=True)
            lp[a: a + step] = self._head_logprobs(h[rows], inv, ti[a: a + step]).cpu()
        for (q, tok, k, slot), x in zip(want, lp.tolist()):
            if is_next[k]:
                values[k][slot] = x
            else:
                values[k][0] += x

    def _offsets(self):
        off = 0
        for hid, _ in self._pending:
            yield off
            off += hid.shape[0]

    def _passes(self, trie: PrefixTrie, per_level: bool = False):
        """Packed mode: the trie's rows into passes of at most ``max_tokens_per_batch`` real tokens
        (no padding), and each pass's rows into attention groups.  Levels are taken shallowest
        first and a pass runs across level boundaries: a node may share a pass with its parent,
        whose keys and values each layer writes to the store before any row of the pass attends
        (tree attention in one pass).  The paper grid's tries are deep and narrow (a shard: ~12
        levels of ~1-3k tokens), so passes per level ran far below the matmuls' best size.
        ``per_level``: a level per pass (the schedule before; ``bench/packed_passes.py`` compares).
        Yields lists of groups, each a list of rows."""
        chosen: list[list[int]] = []
        cq: list[int] = []
        cp: list[int] = []
        used = 0
        for level in trie.levels():
            if per_level and chosen:
                yield self._pass_groups(chosen, cq, cp)
                chosen, cq, cp, used = [], [], [], 0
            rows = self._rows(level, trie)
            q, p = self._lengths(rows, trie)
            for i in sorted(range(len(rows)), key=lambda i: (-(p[i] + q[i]), -q[i])):
                if chosen and used + q[i] > self.max_tokens_per_batch:
                    yield self._pass_groups(chosen, cq, cp)
                    chosen, cq, cp, used = [], [], [], 0
                chosen.append(rows[i])
                cq.append(q[i])
                cp.append(p[i])
                used += q[i]
        if chosen:
            yield self._pass_groups(chosen, cq, cp)

    def _pass_groups(self, rows: list[list[int]], q: list[int], p: list[int]) -> list[list[list[int]]]:
        """One pass's rows (with their :meth:`_lengths`) into attention groups, longest keys first."""
        order = sorted(range(len(rows)), key=lambda i: (-(p[i] + q[i]), -q[i]))
        return [[rows[j] for j in g] for g in self._groups(order, q, p)]

    def _groups(self, order: list[int], q: list[int], p: list[int]) -> list[list[int]]:
        """Rows (longest keys first) into attention groups: a group is a padded ``[rows, qmax,
        pmax + qmax]`` attention, set by its first row; a row joins the first open group it fits
        with at least ``min_fill`` of that group's query length and of its key length (else it
        opens a group), up to ``batch_size`` rows and ``max_kv_tokens`` keys.  Bounding both
        dimensions keeps the padded attention cells near the real ones on trie levels whose rows
        mix short and long parent paths (paper grid: 1.2x the real cells, was 1.7x)."""
        groups: list[tuple[list[int], int, int]] = []  # (rows, qmax, pmax)
        for i in order:
            for g, qm, pm in groups:
                if (q[i] <= qm and p[i] <= pm and q[i] >= self.min_fill * qm and p[i] + q[i] >= self.min_fill * (pm + qm)
                        and len(g) < self.batch_size and (len(g) + 1) * (pm + qm) <= self.max_kv_tokens):
                    g.append(i)
                    break
            else:
                groups.append(([i], q[i], p[i]))
        return [g for g, _, _ in groups]

    def _forward_packed(self, groups: list[list[list[int]]], trie: PrefixTrie, store, reads) -> None:
        """One packed forward pass (:mod:`rayeval.eval.packed`): the rows of every group as one
        sequence for the linear layers, attention per group on top of the parents' caches."""
        from rayeval.eval.packed import Group, Pass, running

        torch = self._torch
        dev = self.device
        ids: list[int] = []
        pos: list[int] = []
        start: dict[int, int] = {}   # node -> its first packed position
        built = []
        for rows in groups:
            P = [trie.lo[row[0]] for row in rows]
            Q = [sum(trie.hi[n] - trie.lo[n] for n in row) for row in rows]
            R, pmax, qmax = len(rows), max(P), max(Q)
            qidx = torch.zeros((R, qmax), dtype=torch.long)
            paths = [store.path(trie.parent[row[0]]) if P[r] else None for r, row in enumerate(rows)]
            # a parent slot written by an earlier level, for the rows' left padding: masked, but a
            # slot not yet written holds whatever the allocator left there (bf16 NaN x 0 is NaN)
            pad = next((int(x[0]) for x in paths if x is not None), 0)
            pidx = torch.full((R, pmax), pad, dtype=torch.long, device=dev)
            gpos = torch.zeros((R, qmax), dtype=torch.long)
            grp = torch.full((R, qmax), -1, dtype=torch.long)
            for r, row in enumerate(rows):
                c = 0
                for g, n in enumerate(row):
                    s = trie.hi[n] - trie.lo[n]
                    start[n] = len(ids)
                    qidx[r, c: c + s] = torch.arange(len(ids), len(ids) + s)
                    gpos[r, c: c + s] = torch.arange(P[r], P[r] + s)
                    grp[r, c: c + s] = g
                    ids.extend(trie.tokens(n))
                    pos.extend(range(P[r], P[r] + s))
                    c += s
                if P[r]:
                    pidx[r, pmax - P[r]:] = paths[r]
            kreal = torch.arange(pmax)[None, :] >= (pmax - torch.tensor(P))[:, None]
            same = (grp[:, :, None] == grp[:, None, :]) & (gpos[:, :, None] >= gpos[:, None, :]) & (grp[:, :, None] >= 0)
            eye = torch.eye(qmax, dtype=torch.bool)[None] & (grp[:, :, None] < 0)   # pads see themselves
            full = torch.cat([kreal[:, None, :].expand(R, qmax, pmax), same | eye], 2)
            sliding = None
            if self.window:
                kpos = torch.cat([torch.arange(pmax)[None, :] - (pmax - torch.tensor(P))[:, None], gpos], 1)
                near = (gpos[:, :, None] - kpos[:, None, :]) < self.window
                padself = torch.cat([torch.zeros(R, qmax, pmax, dtype=torch.bool), eye], 2)
                sliding = ((full & near) | padself)[:, None].to(dev)
            real = (grp >= 0).flatten()
            src = real.nonzero().squeeze(1)
            built.append(Group(qidx=qidx.flatten().to(dev), pidx=pidx.flatten() if pmax else None,
                               rows=R, qmax=qmax, pmax=pmax, full=full[:, None].to(dev), sliding=sliding,
                               src=src.to(dev)))
        kept = [n for n in start if trie.children[n]]
        at: dict[int, int] = {}   # packed position -> its row among those the head reads
        want = []
        for n, s0 in start.items():
            for o, tok, k, slot in reads.get(n, ()):
                q = at.setdefault(s0 + o, len(at))
                want.append((q, tok, k, slot))
        p = Pass(groups=built, store=store, kernel=self.attention_kernel, threads=torch.get_num_threads(),
                 keep=torch.tensor(list(at), dtype=torch.long, device=dev) if self.cut else None)
        if kept:  # their keys/values go to the store as each layer makes them
            p.src = torch.cat([torch.arange(start[n], start[n] + trie.hi[n] - trie.lo[n]) for n in kept]).to(dev)
            p.dst = torch.cat([store.own(n) for n in kept])
        dummy = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=dev)  # 4-D: transformers builds no mask
        attn = {"full_attention": dummy, "sliding_attention": dummy} if self.window else dummy
        with running(p):
            out = self.base(input_ids=torch.tensor([ids], device=dev), attention_mask=attn,
                            position_ids=torch.tensor([pos], device=dev), use_cache=False)
        h = out.last_hidden_state[0]   # cut: the read rows only, in ``at``'s order
        if want:
            self._pending.append((h if self.cut else h[torch.tensor(list(at), device=dev)], want))

    def _forward(self, batch: list[list[int]], trie: PrefixTrie, kv, nxt, reads) -> None:
        """One forward pass over rows of sibling nodes on top of their parents' caches.

        Layout of row r: [left pad | parent path (P_r) | node a | node b | ... | right pad].  The
        mask lets every token see its parent path and the earlier tokens of its own node only
        (siblings never see each other), and the sliding window where the model has one; position
        ids continue each node from its parent, so each node computes exactly as it would alone."""
        from transformers import DynamicCache

        torch = self._torch
        dev = self.device
        B = len(batch)
        P = [trie.lo[row[0]] for row in batch]
        Q = [sum(trie.hi[n] - trie.lo[n] for n in row) for row in batch]
        pmax, qmax = max(P), max(Q)
        ids = torch.full((B, qmax), self.pad, dtype=torch.long)
        pos = torch.zeros((B, qmax), dtype=torch.long)
        grp = torch.full((B, qmax), -1, dtype=torch.long)   # which node of the row (-1: pad)
        start: list[list[int]] = []
        for r, row in enumerate(batch):
            c, starts = 0, []
            for g, n in enumerate(row):
                s = trie.hi[n] - trie.lo[n]
                ids[r, c: c + s] = torch.tensor(trie.tokens(n), dtype=torch.long)
                pos[r, c: c + s] = torch.arange(P[r], P[r] + s)
                grp[r, c: c + s] = g
                starts.append(c)
                c += s
            start.append(starts)
        # keys: the left-padded parent path, then the row's own tokens
        kreal = torch.arange(pmax)[None, :] >= (pmax - torch.tensor(P))[:, None]          # [B, pmax]
        kpos = torch.cat([torch.arange(pmax)[None, :] - (pmax - torch.tensor(P))[:, None], pos], 1)
        same = (grp[:, :, None] == grp[:, None, :]) & (pos[:, :, None] >= pos[:, None, :]) & (grp[:, :, None] >= 0)
        eye = torch.eye(qmax, dtype=torch.bool)[None] & (grp[:, :, None] < 0)             # pads see themselves
        full = torch.cat([kreal[:, None, :].expand(B, qmax, pmax), same | eye], 2)        # [B, Q, K]
        masks = {"full_attention": full[:, None].to(dev)}
        if self.window:
            near = (pos[:, :, None] - kpos[:, None, :]) < self.window
            padself = torch.cat([torch.zeros(B, qmax, pmax, dtype=torch.bool), eye], 2)
            masks["sliding_attention"] = ((full & near) | padself)[:, None].to(dev)
        if pmax:
            past = []
            ref = kv[trie.parent[batch[0][0]]]
            for layer in range(len(ref)):
                k0, v0 = ref[layer]
                kk = k0.new_zeros((B, k0.shape[0], pmax, k0.shape[2]))
                vv = v0.new_zeros((B, v0.shape[0], pmax, v0.shape[2]))
                for r, row in enumerate(batch):
                    if P[r]:
                        pk, pv = kv[trie.parent[row[0]]][layer]
                        kk[r, :, pmax - P[r]:] = pk
                        vv[r, :, pmax - P[r]:] = pv
                past.append((kk, vv))
            cache = DynamicCache(ddp_cache_data=past)
        else:
            cache = DynamicCache()
        attn = masks if self.window else masks["full_attention"]
        out = self.base(input_ids=ids.to(dev), attention_mask=attn, position_ids=pos.to(dev),
                        past_key_values=cache, use_cache=True)
        h = out.last_hidden_state
        # Keep the hidden state of every position a job reads (once per distinct position); the
        # head runs over all of them when the call's last pass is done (_read_heads).
        at: dict[tuple[int, int], int] = {}
        want = []
        for r, row in enumerate(batch):
            for g, n in enumerate(row):
                for o, tok, k, slot in reads.get(n, ()):
                    q = at.setdefault((r, start[r][g] + o), len(at))
                    want.append((q, tok, k, slot))
        if want:
            rr = torch.tensor([rc[0] for rc in at], device=dev)
            cc = torch.tensor([rc[1] for rc in at], device=dev)
            self._pending.append((h[rr, cc], want))
        # Keep the whole-path cache of every node that has children, for the next level.
        for r, row in enumerate(batch):
            for g, n in enumerate(row):
                if trie.children[n]:
                    a, b = pmax + start[r][g], pmax + start[r][g] + trie.hi[n] - trie.lo[n]
                    nxt[n] = [(torch.cat([layer.keys[r, :, pmax - P[r]: pmax], layer.keys[r, :, a:b]], 1),
                               torch.cat([layer.values[r, :, pmax - P[r]: pmax], layer.values[r, :, a:b]], 1))
                              for layer in cache.layers]


ENGINES = {"vllm": VLLMEngine, "hf": HFEngine, "fake": FakeEngine}
ENGINE_KINDS = ("auto",) + tuple(ENGINES)


def resolve_kind(kind: str) -> str:
    """``auto``: the engine the benchmark found fastest for scoring on this device
    (docs/benchmarks.md): transformers with prefix sharing on a CPU host, vLLM on a GPU."""
    if kind == "auto":
        return "hf" if on_cpu() else "vllm"
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}; choose one of {list(ENGINE_KINDS)}")
    return kind


def make_engine(kind: str, model: str, engine_kwargs: dict | None = None):
    """The one front door: ``make_engine("vllm", "smollm2-135m", {"max_model_len": 1024})``."""
    kind = resolve_kind(kind)
    if kind == "fake":  # engine options of the real engines do not apply; the model name seeds it
        kw = {k: v for k, v in (engine_kwargs or {}).items() if k in ("bias", "seed", "delay_s")}
        kw.setdefault("seed", int(hashlib.sha1(model.encode()).hexdigest()[:8], 16))
        eng = FakeEngine(**kw)
        eng.name = model
        return eng
    return ENGINES[kind](model, engine_kwargs)
