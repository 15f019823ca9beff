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
