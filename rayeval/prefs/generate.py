"""Response generation on Ray Data: chat prompts -> responses of every model in a set.

    from rayeval.prefs.generate import run_generate
    run_generate("judge_mt_bench", "runs/mtb/generate")     # packaged config name or YAML path

Prompts come from MT-Bench (first turns), a RouteLLM/RouterBench benchmark, or any JSONL /
parquet / CSV of prompts (``load_prompts``).  They are cut into deterministic shards; a Ray Data
``map_batches`` over an actor pool (each actor holds one generator per model, vLLM engines
pinned to their own cores on CPU) answers whole shards, and the driver writes
``shards/part-NNNNN.parquet`` atomically -- a rerun with the same config only computes the
missing shards, exactly like ``rayeval.eval.pipeline``.

Output: ``responses.parquet`` with columns
``prompt_id, prompt, group, model, response, tokens, finish_reason``.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from rayeval.config import data_root, from_dict, load_yaml, resolve_config
from rayeval.runtime import Execution, ShardActor, digest, read_rows, run_sharded, write_parquet



# ----------------------------------------------------------------------------- config

@dataclass
class PromptSource:
    source: str = "mt_bench"       # mt_bench | routellm:<bench> | routerbench:<task>[:split] | a file path
    limit: int | None = None       # first N prompts (in file order)
    turn: int = 1                  # MT-Bench: which turn is the prompt (1 = first)


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 128
    seed: int = 0
    stop: list[str] = field(default_factory=list)


@dataclass
class GenerateConfig:
    name: str = "generate"
    models: list[str] = field(default_factory=lambda: ["smollm2-135m", "gemma3-270m"])
    prompts: PromptSource = field(default_factory=PromptSource)
    sampling: Sampling = field(default_factory=Sampling)
    system_prompt: str | None = None
    shard_size: int = 16
    engine: dict[str, Any] = field(default_factory=lambda: {"kind": "vllm"})

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "generate") -> "GenerateConfig":
        d = dict(d)
        if isinstance(d.get("prompts"), str):  # prompts: mt_bench
            d["prompts"] = {"source": d["prompts"]}
        cfg = from_dict(cls, d, where)
        if not cfg.models:
            raise ValueError(f"{where}.models: give at least one model")
        if cfg.shard_size < 1:
            raise ValueError(f"{where}.shard_size must be >= 1")
        Execution.from_engine_dict(cfg.engine)  # validates the kind
        return cfg


def load_generate_config(path: str | Path | dict) -> GenerateConfig:
    """The ``generate`` part of a job config (a YAML with ``models``/``prompts``/``sampling``,
    and optionally a ``judge`` section that this ignores)."""
    doc = path if isinstance(path, dict) else load_yaml(resolve_config(path))
    doc = {k: v for k, v in doc.items() if k != "judge"}
    return GenerateConfig.from_dict(doc, where=str(path) if not isinstance(path, dict) else "generate")


# ----------------------------------------------------------------------------- prompts

def _mt_bench(turn: int) -> pd.DataFrame:
    f = data_root() / "routellm_evals" / "mt_bench" / "question.jsonl"
    rows = []
    with open(f, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                r = json.loads(line)
                turns = r["turns"]
                if turn > len(turns):
                    continue
                rows.append({"prompt_id": f"mt_bench:{r['question_id']}", "prompt": turns[turn - 1],
                             "group": r.get("category", "mt_bench")})
    return pd.DataFrame(rows)


_ID_COLS = ("prompt_id", "id", "question_id", "query_id", "sample_id")
_TEXT_COLS = ("prompt", "question", "query", "turns", "messages", "instruction")


def _first_user_turn(v) -> str:
    if isinstance(v, str):
        return v
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, (list, tuple)) and v:
        first = v[0]
        if isinstance(first, dict):
            first = next((t.get("content", "") for t in v if isinstance(t, dict) and t.get("role", "user") == "user"), "")
        return str(first)
    return "" if v is None else str(v)


def _from_file(path: Path) -> pd.DataFrame:
    if path.suffix in (".jsonl", ".json"):
        df = pd.read_json(path, lines=path.suffix == ".jsonl")
    elif path.suffix == ".parquet":
        df = pd.read_parquet(path)
    elif path.suffix == ".csv":
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    else:
        raise ValueError(f"{path}: prompts must be .jsonl, .json, .parquet or .csv")
    tcol = next((c for c in _TEXT_COLS if c in df), None)
    if tcol is None:
        raise ValueError(f"{path}: no prompt column; expected one of {_TEXT_COLS}, have {list(df.columns)}")
    icol = next((c for c in _ID_COLS if c in df), None)
    ids = df[icol].astype(str) if icol else pd.Series([f"{path.stem}:{i}" for i in range(len(df))])
    out = pd.DataFrame({"prompt_id": ids.to_numpy(), "prompt": [_first_user_turn(v) for v in df[tcol]],
                        "group": df["category"].astype(str).to_numpy() if "category" in df
                        else (df["group"].astype(str).to_numpy() if "group" in df else path.stem)})
    empty = out["prompt"].str.strip() == ""
    if empty.any():
        raise ValueError(f"{path}: record {int(empty.to_numpy().argmax()) + 1} has an empty prompt")
    return out


def load_prompts(source: str | PromptSource = "mt_bench", limit: int | None = None, turn: int = 1) -> pd.DataFrame:
    """Prompts as a frame: ``prompt_id`` (unique), ``prompt`` (the user turn), ``group``.

    ``mt_bench`` (turn ``turn`` of the 80 questions), ``routellm:<mmlu|gsm8k|mt_bench>``,
    ``routerbench:<task>[:split]``, or a .jsonl/.json/.parquet/.csv file whose prompt column is one
    of prompt/question/query/turns/messages (a conversation list: its first user turn)."""
    if isinstance(source, PromptSource):
        source, limit, turn = source.source, source.limit if limit is None else limit, source.turn
    kind, _, rest = str(source).partition(":")
    if source == "mt_bench":
        df = _mt_bench(turn)
    elif kind in ("routellm", "routerbench") and rest:
        from rayeval.prefs.sources import load_source

        df = load_source(str(source)).queries.rename(columns={"query_id": "prompt_id", "query": "prompt"})[["prompt_id", "prompt", "group"]]
    else:
        p = Path(source).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"prompts {source!r}: not mt_bench, routellm:<b>, routerbench:<t>, or a file")
        df = _from_file(p)
    if df["prompt_id"].duplicated().any():
        raise ValueError(f"prompts {source!r}: duplicate prompt_id {df['prompt_id'][df['prompt_id'].duplicated()].iloc[0]!r}")
    if limit is not None:
        df = df.head(int(limit))
    return df.reset_index(drop=True)


# ----------------------------------------------------------------------------- chat rendering

def render_chat(tokenizer, messages: Sequence[dict], assistant_prefix: str = "") -> str:
    """The model's own chat template applied to ``messages`` with the generation prompt
    (``rayeval.eval.engines.chat_text``), then ``assistant_prefix``.  BOS is the engine's to add
    (``encode_prompt``: the registry's rule), as for every other prompt.  Without a tokenizer or
    template (test doubles, ``use_chat_template: false``): plain text."""
    from rayeval.eval.engines import chat_text

    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        body = "\n\n".join(m["content"] for m in messages)
        return body + ("\n" + assistant_prefix if assistant_prefix else "")
    return chat_text(tokenizer, messages) + assistant_prefix


def conversation(prompt: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


# ----------------------------------------------------------------------------- generators

class VLLMGenerator:
    """Generation with a ``VLLMEngine``'s ``vllm.LLM`` (same construction as scoring:
    ``vllm_cpu_defaults`` and core pinning on CPU).  One request per prompt, each with its own
    seed, so outputs do not depend on how prompts are batched."""

    def __init__(self, model: str, engine_kwargs: dict | None = None):
        from rayeval.eval.engines import VLLMEngine

        self.engine = VLLMEngine(model, engine_kwargs)
        self.name = model
        self.tokenizer = self.engine.tokenizer

    def prompt_ids(self, conv: Sequence[dict]) -> list[int]:
        """A conversation's token ids: ``encode_chat``, the rule scoring and serving use too."""
        from rayeval.eval.engines import encode_chat

        return encode_chat(self.tokenizer, conv, self.engine.add_bos)

    def generate(self, messages: Sequence[Sequence[dict]], sampling: Sampling) -> list[dict]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params = [], []
        for i, conv in enumerate(messages):
            ids = self.prompt_ids(conv)
            room = self.engine.max_model_len - len(ids)
            if room < 1:
                raise ValueError(f"prompt {i}: {len(ids)} tokens, no room under max_model_len={self.engine.max_model_len}")
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                         max_tokens=min(sampling.max_tokens, room), seed=sampling.seed,
                                         stop=list(sampling.stop) or None))
        outs = self.engine.generate(prompts, params)
        return [{"response": o.outputs[0].text.strip(), "tokens": len(o.outputs[0].token_ids),
                 "finish_reason": str(o.outputs[0].finish_reason)} for o in outs]

    def close(self) -> None:
        self.engine.close()


class FakeGenerator:
    """Deterministic test double: the response is a hash-chosen number of words derived from the
    prompt and the model name.  Never a stand-in for the real path."""

    tokenizer = None

    def __init__(self, model: str, engine_kwargs: dict | None = None):
        self.name = model

    def generate(self, messages: Sequence[Sequence[dict]], sampling: Sampling) -> list[dict]:
        out = []
        for conv in messages:
            text = conv[-1]["content"]
            h = int(hashlib.sha1(f"{self.name}\x1f{text}\x1f{sampling.seed}".encode()).hexdigest()[:8], 16)
            n = min(sampling.max_tokens, 3 + h % 20)
            words = [f"{self.name}-w{(h >> k) % 97}" for k in range(n)]
            out.append({"response": " ".join(words), "tokens": n,
                        "finish_reason": "length" if n == sampling.max_tokens else "stop"})
        return out

    def close(self) -> None:
        pass


def make_generator(kind: str, model: str, engine_kwargs: dict | None = None):
    if kind == "vllm":
        return VLLMGenerator(model, engine_kwargs)
    if kind == "fake":
        return FakeGenerator(model, engine_kwargs)
    raise ValueError(f"generation supports engine kinds vllm and fake, not {kind!r}")


class GenerateActor(ShardActor):
    """One generator per model; answers whole shards.  A Ray Data ``map_batches`` class."""

    def __init__(self, models: list[str], execution: dict[str, Any], sampling: dict[str, Any],
                 system_prompt: str | None = None, generators: dict | None = None):
        ex = Execution(**execution)
        self.sampling = Sampling(**sampling)
        self.system = system_prompt
        cores = ex.pinning(models)
        self.gens = dict(generators or {})  # ready generators (e.g. engines shared in one process)
        for m in models:
            if m not in self.gens:
                self.gens[m] = make_generator(ex.kind, m, ex.engine_kwargs_for(m, cores))
        self.pool = ThreadPoolExecutor(max(1, len(self.gens)))

    def process(self, shard: int, items: list[dict]) -> list[dict[str, Any]]:
        convs = [conversation(it["prompt"], self.system) for it in items]
        # engines of different models run side by side (each pinned to its own cores)
        results = list(self.pool.map(lambda g: g.generate(convs, self.sampling), self.gens.values()))
        return [{"prompt_id": it["prompt_id"], "prompt": it["prompt"], "group": it["group"], "model": model, **r}
                for model, res in zip(self.gens, results) for it, r in zip(items, res)]


# ----------------------------------------------------------------------------- driver

def run_generate(config: str | Path | dict | GenerateConfig, out_dir: str | Path, *,
                 engine: dict[str, Any] | None = None, resume: bool = True, stop_after: int | None = None,
                 limit: int | None = None, address: str | None = None) -> dict[str, Any]:
    """Generate (or resume) responses of every model to every prompt; writes
    ``responses.parquet`` and ``run.json`` in ``out_dir``.  ``engine`` overrides keys of the
    config's engine section (e.g. ``{"kind": "fake"}``); ``limit`` caps the prompts."""
    cfg = config if isinstance(config, GenerateConfig) else load_generate_config(config)
    if limit is not None:
        cfg.prompts.limit = limit
    ex = Execution.from_engine_dict({**cfg.engine, **(engine or {})})
    out = Path(out_dir)
    t0 = time.time()
    prompts = load_prompts(cfg.prompts)
    items = prompts.to_dict("records")
    shards = [items[i: i + cfg.shard_size] for i in range(0, len(items), cfg.shard_size)]
    fp = digest({k: v for k, v in asdict(cfg).items() if k not in ("engine", "name")},
                [[it["prompt_id"], it["prompt"]] for it in items])
    res = run_sharded(
        f"{cfg.name}/generate", shards, GenerateActor,
        {"models": list(cfg.models), "execution": asdict(ex), "sampling": asdict(cfg.sampling),
         "system_prompt": cfg.system_prompt},
        out, fp, lambda s: len(shards[s]) * len(cfg.models), ex, resume=resume, stop_after=stop_after,
        address=address, meta={"models": cfg.models, "prompts": len(items), "sampling": asdict(cfg.sampling)})
    result: dict[str, Any] = {"out": str(out), **res}
    if not res["complete"]:
        return result
    rows = read_rows(out).sort_values(["model", "prompt_id"], ignore_index=True)
    write_parquet(rows, out / "responses.parquet")
    result.update(rows=len(rows), prompts=len(items), models=list(cfg.models),
                  mean_tokens={m: float(g.mean()) for m, g in rows.groupby("model")["tokens"]},
                  seconds=round(time.time() - t0, 1), responses=str(out / "responses.parquet"))
    (out / "run.json").write_text(json.dumps(result, indent=1))
    return result
