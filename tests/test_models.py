"""Packaged models become plain HF folders that transformers and vLLM both load and score with."""

import json
import math

import pytest

from rayeval.eval.engines import ScoreRequest, make_engine
from rayeval.models import REGISTRY, get_spec, resolve_model

PROMPT = ("The following are multiple choice questions (with answers) about geography.\n\n"
          "What is the capital of France?\nA. Berlin\nB. Paris\nC. Rome\nD. Madrid\nAnswer:")


def test_registry_and_resolution(tmp_path):
    assert {"smollm2-135m", "gemma3-270m", "minilm-l6"} <= set(REGISTRY)
    assert get_spec(str(tmp_path)).kind == "hf"  # a local folder
    assert get_spec("Qwen/Qwen2.5-0.5B-Instruct").kind == "hf"  # a hub id
    with pytest.raises(KeyError, match="unknown model"):
        get_spec("no-such-model")
    emb = resolve_model("minilm-l6")
    assert (emb / "modules.json").exists()


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_prepared_folder_is_plain_hf(name):
    path = resolve_model(name)
    cfg = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert resolve_model(name) == path  # idempotent, no re-conversion


@pytest.mark.model
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_transformers_engine_scores(name):
    eng = make_engine("hf", name)
    sym, cont = eng.score([ScoreRequest(PROMPT, symbols=("A", "B", "C", "D")),
                           ScoreRequest(PROMPT, continuations=(" Berlin", " Paris"))])
    assert len(sym.symbol_logprobs) == 4 and all(lp < 0 for lp in sym.symbol_logprobs)
    assert sum(math.exp(lp) for lp in sym.symbol_logprobs) < 1.0
    assert all(t >= 1 for t in cont.continuation_tokens)


@pytest.mark.model
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_transformers_engine_batched_left_padding_matches_single(name):
    """Symbol jobs run left-padded with last-position logits only; prompts of different lengths
    in one batch must score as they do alone (fp32, so only padding could make them differ)."""
    eng = make_engine("hf", name, {"dtype": "float32", "batch_size": 8})
    prompts = [PROMPT, "Q: 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:", PROMPT.replace("Answer:", "Think.\nAnswer:")]
    reqs = [ScoreRequest(p, symbols=("A", "B", "C", "D")) for p in prompts]
    reqs.append(ScoreRequest(PROMPT, continuations=(" Berlin", " Paris")))
    together = eng.score(reqs)
    for r, t in zip(reqs, together):
        alone = eng.score([r])[0]
        got, want = (t.symbol_logprobs, alone.symbol_logprobs) if r.symbols else \
            (t.continuation_logprobs, alone.continuation_logprobs)
        assert len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want)) < 1e-3, (name, got, want)


@pytest.mark.engine
def test_vllm_scores_both_models_and_agrees_with_transformers():
    """A real vLLM engine per model (CPU), and the same numbers as transformers on the same tokens."""
    reqs = [ScoreRequest(PROMPT, symbols=("A", "B", "C", "D")),
            ScoreRequest(PROMPT, symbols=("œ", "§", "З", "ü")),  # multi-token: scored as continuations
            ScoreRequest(PROMPT, continuations=(" Berlin", " Paris", " Rome", " Madrid"))]
    for name in ("smollm2-135m", "gemma3-270m"):
        v = make_engine("vllm", name, {"max_model_len": 1024})
        h = make_engine("hf", name)
        rv, rh = v.score(reqs), h.score(reqs)
        for a, b in zip(rv[0].symbol_logprobs + rv[1].symbol_logprobs + rv[2].continuation_logprobs,
                        rh[0].symbol_logprobs + rh[1].symbol_logprobs + rh[2].continuation_logprobs):
            assert math.isfinite(a) and a < 0
            assert abs(a - b) < 0.35 + 0.05 * abs(b), (name, a, b)  # kernels (and bf16 where native) differ slightly
        assert rv[2].continuation_tokens == rh[2].continuation_tokens
        v.close()


@pytest.mark.engine
def test_vllm_continuations_read_the_prefix_cache_with_the_same_numbers():
    """Continuation jobs (prompt logprobs) read vLLM's automatic prefix cache: a long shared
    context is computed once, the numbers equal those of requests that skip the cache, and a job
    whose cached part would cover its continuation is recomputed (the same jobs scored again)."""
    context = "The following are multiple choice questions about geography.\n\n" + " ".join(
        f"Fact {i}: the river {i} flows into the sea {i % 7}." for i in range(40)) + "\n\n" + PROMPT
    reqs = [ScoreRequest(context, continuations=(" Berlin", " Paris", " Rome", " Madrid")),
            ScoreRequest(context, symbols=("A", "B", "C", "D"))]
    kw = {"max_model_len": 1024, "block_size": 32, "dtype": "float32"}   # fp32: only the cache could differ
    v = make_engine("vllm", "smollm2-135m", kw)
    try:
        got = v.score(reqs)
        asked, done = v.stats["tokens_requested"], v.stats["tokens_computed"]
        again = v.score(reqs)   # every block cached now: each continuation is recomputed, same numbers
        ref = make_engine("vllm", "smollm2-135m", {**kw, "cached_prompt_logprobs": False, "enable_prefix_caching": False})
        want = ref.score(reqs)
        ref.close()
    finally:
        v.close()
    n_ctx = len(v.tokenizer.encode(context, add_special_tokens=False))
    assert n_ctx > 300
    # five jobs share the context (four continuations, one symbol job): it is computed about once
    assert done < asked - 3 * (n_ctx - 32), (asked, done)
    assert ref.stats["tokens_computed"] == ref.stats["tokens_requested"]
    for a, b, c in zip(got, again, want):
        x = a.continuation_logprobs or a.symbol_logprobs
        y = b.continuation_logprobs or b.symbol_logprobs
        z = c.continuation_logprobs or c.symbol_logprobs
        assert max(abs(p - q) for p, q in zip(x, z)) < 2e-3 and max(abs(p - q) for p, q in zip(y, z)) < 2e-3, (x, y, z)
