"""Engines: take a batch of scoring requests, return numbers.  Nothing else talks to a model.

A request is a prompt plus either
  * ``symbols``: return the next-token log-probability of each symbol (one request per prompt), or
  * ``continuations``: return the summed log-likelihood of each continuation after the prompt,
    with its token count.
Scoring methods (symbol / hybrid / cloze) only build requests and reduce these numbers.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class ScoreRequest:
    prompt: str
    symbols: tuple[str, ...] | None = None
    continuations: tuple[str, ...] | None = None


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

    def __init__(self, bias: Sequence[float] = (), seed: int = 0):
        self.bias = list(bias)
        self.seed = seed
        self.calls = 0

    def _h(self, *parts: str) -> float:
        h = hashlib.blake2b("\x1f".join((str(self.seed),) + parts).encode(), digest_size=8).digest()
        return -(int.from_bytes(h, "little") / 2**64) * 5.0  # in (-5, 0]

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        self.calls += 1
        out = []
        for r in requests:
            if r.symbols is not None:
                lp = [self._h(r.prompt, s) + (self.bias[i] if i < len(self.bias) else 0.0)
                      for i, s in enumerate(r.symbols)]
                out.append(ScoreResult(symbol_logprobs=lp))
            else:
                conts = r.continuations or ()
                ntok = [max(1, len(c.split())) for c in conts]
                out.append(ScoreResult(continuation_logprobs=[self._h(r.prompt, c) * n for c, n in zip(conts, ntok)],
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


def encode_continuation(tokenizer, context_ids: list[int], continuation: str) -> list[int]:
    """Tokens of ``continuation`` after the context.  Tokenized separately (lm-eval style) so the
    context tokens stay fixed; a leading space is kept when the continuation has one."""
    return tokenizer.encode(continuation, add_special_tokens=False)


def _expand(requests: Sequence[ScoreRequest], tokenizer, sym_cache: dict, add_bos: bool = False):
    """Turn requests into flat jobs: ('sym', req_index, ids, token_ids) or
    ('cont', req_index, option_index, context_ids, cont_ids)."""
    jobs = []
    for i, r in enumerate(requests):
        ctx = encode_prompt(tokenizer, r.prompt, add_bos)
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


def on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return True


class VLLMEngine:
    """The real engine: one ``vllm.LLM`` per model.

    Symbol requests are ONE generation step per prompt with ``logprob_token_ids`` (vLLM >= 0.30)
    returning the raw next-token log-probabilities of exactly the symbol tokens; on older vLLM
    the top-``max_logprobs`` list is used.  Continuation requests use ``prompt_logprobs=0`` over
    context+continuation token ids.  On CPU the defaults are bf16, eager mode; on a GPU cluster
    vLLM's own defaults apply.  Extra ``engine_kwargs`` go straight to ``vllm.LLM``.
    """

    def __init__(self, model: str, engine_kwargs: dict | None = None):
        from vllm import LLM, SamplingParams

        from rayeval.models import get_spec, resolve_model

        self.name = model
        path = resolve_model(model)
        engine_kwargs = dict(engine_kwargs or {})
        cores = engine_kwargs.pop("cpu_cores", None)
        if cores is not None and on_cpu():
            # Pin this engine's OpenMP threads (e.g. "0" and "1" for two engines on 2 cores, or
            # "0-1" for one engine using both).  Read by the engine-core process at spawn.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cores)
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        kw: dict = {"max_model_len": 2048, "seed": 0}
        if on_cpu():
            # 1 GiB of KV cache: plenty for scoring small batches, and it skips vLLM's check that
            # reserves a fraction of the whole NUMA node (which fails beside other processes).
            kw.update(dtype="bfloat16", enforce_eager=True, kv_cache_memory_bytes=1 << 30)
        spec = get_spec(model)
        kw.update(spec.engine_defaults)
        kw.update(engine_kwargs)
        self.llm = LLM(model=str(path), **kw)
        self.tokenizer = self.llm.get_tokenizer()
        self.add_bos = spec.add_bos
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._SP = SamplingParams
        self._has_token_ids = "logprob_token_ids" in SamplingParams.__struct_fields__ if hasattr(
            SamplingParams, "__struct_fields__") else hasattr(SamplingParams(), "logprob_token_ids")
        self._sym_cache: dict = {}

    def close(self) -> None:
        """Stop the engine-core process now (rather than at interpreter exit)."""
        core = getattr(getattr(self, "llm", None), "llm_engine", None)
        core = getattr(core, "engine_core", None)
        if core is not None:
            core.shutdown()
        self.llm = None

    def _check_len(self, ids: list[int], i: int) -> None:
        if len(ids) >= self.max_model_len:
            raise ValueError(f"request {i}: prompt has {len(ids)} tokens, over max_model_len={self.max_model_len}")

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        from vllm.inputs import TokensPrompt

        jobs = _expand(requests, self.tokenizer, self._sym_cache, self.add_bos)
        prompts, params = [], []
        for job in jobs:
            if job[0] == "sym":
                _, i, ctx, tids = job
                self._check_len(ctx, i)
                prompts.append(TokensPrompt(prompt_token_ids=ctx))
                if self._has_token_ids:
                    params.append(self._SP(max_tokens=1, temperature=0.0, logprob_token_ids=list(tids)))
                else:  # pragma: no cover - older vLLM
                    params.append(self._SP(max_tokens=1, temperature=0.0, logprobs=20))
            else:
                _, i, _j, ctx, cont = job
                self._check_len(ctx + cont, i)
                prompts.append(TokensPrompt(prompt_token_ids=ctx + cont))
                params.append(self._SP(max_tokens=1, temperature=0.0, prompt_logprobs=0))
        outs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        values = []
        for job, o in zip(jobs, outs):
            if job[0] == "sym":
                lp = o.outputs[0].logprobs[0]
                values.append([lp[t].logprob if t in lp else -1e9 for t in job[3]])
            else:
                ctx, cont = job[3], job[4]
                plp = o.prompt_logprobs
                total = 0.0
                for pos, t in enumerate(cont, start=len(ctx)):
                    total += plp[pos][t].logprob
                values.append((total, len(cont)))
        return _assemble(requests, jobs, values)


class HFEngine:
    """A transformers engine behind the same interface (batched forward passes, no KV cache).

    On small CPUs it can beat vLLM for scoring-only work (no generation); the benchmark in
    ``bench/`` measures both on the same token streams."""

    def __init__(self, model: str, engine_kwargs: dict | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rayeval.models import get_spec, resolve_model

        kw = dict(engine_kwargs or {})
        self.name = model
        self.batch_size = int(kw.pop("batch_size", 16))
        self.max_tokens_per_batch = int(kw.pop("max_tokens_per_batch", 8192))
        dtype = kw.pop("dtype", "bfloat16" if on_cpu() else "auto")
        # One thread per engine unless told otherwise (Ray sets OMP_NUM_THREADS for actors):
        # measured 2.8 vs 0.5 questions/s for 1 vs 2 threads on 2 cores (docs/benchmarks.md).
        threads = kw.pop("num_threads", None) or os.environ.get("OMP_NUM_THREADS") or 1
        torch.set_num_threads(int(threads))
        path = str(resolve_model(model))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.add_bos = get_spec(model).add_bos
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype) if dtype != "auto" else "auto", **kw).eval()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self._sym_cache: dict = {}
        self._torch = torch

    def _batches(self, seqs: list[list[int]]):
        order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k]))
        batch: list[int] = []
        for k in order:
            longest = len(seqs[batch[0]]) if batch else len(seqs[k])
            if batch and (len(batch) >= self.batch_size or longest * (len(batch) + 1) > self.max_tokens_per_batch):
                yield batch
                batch = []
            batch.append(k)
        if batch:
            yield batch

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        torch = self._torch
        jobs = _expand(requests, self.tokenizer, self._sym_cache, self.add_bos)
        seqs = [j[2] if j[0] == "sym" else j[3] + j[4] for j in jobs]
        for job, s in zip(jobs, seqs):
            if len(s) > self.max_model_len:
                raise ValueError(f"request {job[1]}: {len(s)} tokens, over the model's {self.max_model_len}")
        values: list = [None] * len(jobs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        sym = [k for k, j in enumerate(jobs) if j[0] == "sym"]
        cont = [k for k, j in enumerate(jobs) if j[0] != "sym"]
        with torch.inference_mode():
            # Symbol jobs need the next-token distribution at the last position only: left-pad,
            # positions from the mask, and ask the model for one row of logits (the vocabulary head
            # is a fifth of SmolLM2's compute and over half of Gemma-3-270M's at every position).
            for b in self._batches([seqs[k] for k in sym]):
                b = [sym[i] for i in b]
                L = max(len(seqs[k]) for k in b)
                ids = torch.full((len(b), L), pad, dtype=torch.long)
                mask = torch.zeros((len(b), L), dtype=torch.long)
                for r, k in enumerate(b):
                    ids[r, L - len(seqs[k]):] = torch.tensor(seqs[k])
                    mask[r, L - len(seqs[k]):] = 1
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    position_ids=pos.to(self.device), logits_to_keep=1).logits
                lp = torch.log_softmax(logits[:, -1].float(), -1)
                for r, k in enumerate(b):
                    values[k] = [float(lp[r, t]) for t in jobs[k][3]]
            for b in self._batches([seqs[k] for k in cont]):
                b = [cont[i] for i in b]
                L = max(len(seqs[k]) for k in b)
                ids = torch.full((len(b), L), pad, dtype=torch.long)
                mask = torch.zeros((len(b), L), dtype=torch.long)
                for r, k in enumerate(b):  # right padding: positions stay 0..n-1
                    ids[r, : len(seqs[k])] = torch.tensor(seqs[k])
                    mask[r, : len(seqs[k])] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                for r, k in enumerate(b):  # continuation log-likelihood: logits over its tokens only
                    job, n = jobs[k], len(seqs[k])
                    c0 = len(job[3])
                    lp = torch.log_softmax(logits[r, c0 - 1: n - 1].float(), -1)
                    tgt = torch.tensor(job[4], device=lp.device)
                    values[k] = (float(lp.gather(1, tgt[:, None]).sum()), len(job[4]))
        return _assemble(requests, jobs, values)


ENGINES = {"vllm": VLLMEngine, "hf": HFEngine, "fake": FakeEngine}


def make_engine(kind: str, model: str, engine_kwargs: dict | None = None):
    """The one front door: ``make_engine("vllm", "smollm2-135m", {"max_model_len": 1024})``."""
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}; choose one of {sorted(ENGINES)}")
    if kind == "fake":  # engine options of the real engines do not apply; the model name seeds it
        kw = {k: v for k, v in (engine_kwargs or {}).items() if k in ("bias", "seed")}
        kw.setdefault("seed", int(hashlib.sha1(model.encode()).hexdigest()[:8], 16))
        eng = FakeEngine(**kw)
        eng.name = model
        return eng
    return ENGINES[kind](model, engine_kwargs)
