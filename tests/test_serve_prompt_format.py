"""How served models build prompts: the instruct model keeps its chat template, the base model
gets a completion-style prompt with stop strings, both tokenized with the engine layer's BOS rule.
Real tokenizers of the prepared packaged models; no engine."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from rayeval.eval.engines import encode_prompt
from rayeval.models import ModelSpec, get_spec, resolve_model
from rayeval.serve.app import parse_args
from rayeval.serve.llm import PromptFormat

MSGS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tokenizers():
    return {n: AutoTokenizer.from_pretrained(str(resolve_model(n))) for n in ("smollm2-135m", "gemma3-270m")}


def test_base_model_is_served_completion_style_with_bos_and_stops(tokenizers):
    tok = tokenizers["gemma3-270m"]
    fmt = PromptFormat.of(get_spec("gemma3-270m"), "gemma3-270m")
    text = fmt.text(tok, MSGS)
    assert fmt.kind == "completion"
    assert text.endswith("Question: What is the capital of France?\nAnswer:") and "<start_of_turn>" not in text
    ids = fmt.prompt_ids(tok, MSGS)
    # The tokenizer itself adds no BOS; the registry's add_bos does, as when the model is scored.
    assert tok.encode(text, add_special_tokens=False)[0] != tok.bos_token_id
    assert ids[0] == tok.bos_token_id and ids == encode_prompt(tok, text, add_bos=True)
    assert fmt.stops() == ["\n\n", "\nQuestion:"]
    assert fmt.stops("###") == ["\n\n", "\nQuestion:", "###"]
    # Earlier turns become Question/Answer pairs; a system message leads.
    multi = [{"role": "system", "content": "Be brief."}, *MSGS, {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "And of Italy?"}]
    assert fmt.text(tok, multi).endswith("Be brief.\n\nQuestion: What is the capital of France?\n"
                                         "Answer: Paris.\n\nQuestion: And of Italy?\nAnswer:")


def test_instruct_model_keeps_its_chat_template(tokenizers):
    tok = tokenizers["smollm2-135m"]
    fmt = PromptFormat.of(get_spec("smollm2-135m"), "smollm2-135m")
    assert fmt.kind == "chat" and fmt.stops() is None
    ids = fmt.prompt_ids(tok, MSGS)
    want = tok.apply_chat_template(MSGS, tokenize=True, add_generation_prompt=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert ids == want
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in fmt.text(tok, MSGS)


def test_prompt_format_errors_are_early_and_named():
    with pytest.raises(ValueError, match="bad-model: prompt_format 'plain' is not one of"):
        ModelSpec("bad-model", "hf", "x/y", prompt_format="plain")
    with pytest.raises(ValueError, match="needs a completion_template"):
        ModelSpec("bad-model", "hf", "x/y", prompt_format="completion")
    # The serve config can override the registry per model; mistakes fail when the args are parsed.
    with pytest.raises(ValueError, match=r"llms.smollm2-135m: prompt_format 'completion' needs"):
        parse_args({"llms": {"smollm2-135m": {"prompt_format": "completion"}, "gemma3-270m": {}}})
    with pytest.raises(ValueError, match=r"llms.gemma3-270m: stop must be a list"):
        parse_args({"llms": {"smollm2-135m": {}, "gemma3-270m": {"stop": "\n"}}})
    with pytest.raises(ValueError, match=r"llms.gemma3-270m: unknown key\(s\) \['stops'\]"):
        parse_args({"llms": {"smollm2-135m": {}, "gemma3-270m": {"stops": ["\n"]}}})
    a = parse_args({"llms": {"smollm2-135m": {}, "gemma3-270m": {"stop": ["\n"], "cpu_cores": "1"}}})
    assert a.llms["gemma3-270m"]["stop"] == ["\n"]
