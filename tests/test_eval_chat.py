"""The chat-template axis: a setting renders its MCQ prompt through each model's chat template,
and one chat becomes one token stream in scoring, generation and serving."""

from __future__ import annotations

import pytest

from rayeval.data.schema import MCQItem
from rayeval.eval.config import ConfigError, EvalConfig
from rayeval.eval.engines import FakeEngine, ScoreRequest, _expand, encode_chat, token_job
from rayeval.eval.pipeline import make_shards
from rayeval.eval.plan import ByteTokenizer, plan_works
from rayeval.eval.prompts import build_prompt, chat_turns
from rayeval.eval.scoring import expand, flatten

ITEM = MCQItem(id="q0", question="What is 2 plus 2?", choices=["4", "5", "6", "7"], gold=0, subject="math")
DEV = [MCQItem(id=f"d{i}", question=f"Dev {i}?", choices=["a", "b", "c", "d"], gold=i % 4, subject="math")
       for i in range(3)]
HEAD = "The following are multiple choice questions (with answers) about math.\n\n"
Q0 = "What is 2 plus 2?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:"


def test_single_turn_is_the_raw_prompt_as_one_user_message():
    p = build_prompt(ITEM, "mmlu", {"k": 2}, DEV, chat="single")
    assert p.messages == (("user", p.text),)
    assert p.cloze_messages == (("user", p.cloze_text),)
    assert p.applied["chat"] == "single"
    raw = build_prompt(ITEM, "mmlu", {"k": 2}, DEV)
    assert raw.messages == () and raw.text == p.text  # the raw text is unchanged by the chat axis


def test_multiturn_hand_built():
    p = build_prompt(ITEM, "mmlu", {"k": 2}, DEV, chat="multiturn")
    assert p.messages == (
        ("user", HEAD + "Dev 0?\nA. a\nB. b\nC. c\nD. d\nAnswer:"), ("assistant", "A"),
        ("user", "Dev 1?\nA. a\nB. b\nC. c\nD. d\nAnswer:"), ("assistant", "B"),
        ("user", Q0))
    # cloze: options hidden, the example answers are the option texts
    assert p.cloze_messages == (
        ("user", HEAD + "Dev 0?\nAnswer:"), ("assistant", "a"),
        ("user", "Dev 1?\nAnswer:"), ("assistant", "b"),
        ("user", "What is 2 plus 2?\nAnswer:"))
    # zero-shot multiturn: the header opens the only user turn
    assert build_prompt(ITEM, "mmlu", None, DEV, chat="multiturn").messages == (("user", HEAD + Q0),)
    with pytest.raises(ValueError, match="chat"):
        chat_turns("", [], "q", "threeturn")


def _cfg(settings, models=("model-a", "model-b"), scorings=("symbol", "hybrid", "cloze")):
    return EvalConfig.from_dict({"name": "t", "models": list(models), "datasets": [{"name": "mmlu"}],
                                 "scorings": list(scorings), "settings": settings})


def test_chat_setting_config_checks():
    cfg = _cfg([{"name": "baseline"}, {"name": "chat", "chat": True, "models": ["model-a"]}])
    assert cfg.setting("chat").chat == "multiturn" and cfg.setting("chat").models == ["model-a"]
    assert _cfg([{"name": "baseline"}, {"name": "c", "chat": "single"}]).setting("c").chat == "single"
    assert _cfg([{"name": "baseline"}, {"name": "c", "chat": False}]).setting("c").chat is None
    with pytest.raises(ConfigError, match=r"settings\[1\]\.chat: expected false, true or one of"):
        _cfg([{"name": "baseline"}, {"name": "c", "chat": "yes"}])
    with pytest.raises(ConfigError, match=r"settings\[1\]\.models: \['model-z'\] not among the config's models"):
        _cfg([{"name": "baseline"}, {"name": "c", "models": ["model-z"]}])
    # a base model has no chat template: an error naming the setting and the model, with the way out
    with pytest.raises(ConfigError, match=r"settings\[1\]\.chat: model 'gemma3-270m' has no chat template "
                                          r"\(a base model.*models: \['smollm2-135m'\]"):
        _cfg([{"name": "baseline"}, {"name": "c", "chat": True}], models=("smollm2-135m", "gemma3-270m"))
    ok = _cfg([{"name": "baseline"}, {"name": "c", "chat": True, "models": ["smollm2-135m"]}],
              models=("smollm2-135m", "gemma3-270m"))
    assert ok.setting("c").models == ["smollm2-135m"]


def test_local_folder_without_chat_template_is_a_config_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    with pytest.raises(ConfigError, match=r"settings\[1\]\.chat: model .* has no chat template .*no chat_template"):
        _cfg([{"name": "baseline"}, {"name": "c", "chat": "single"}], models=(str(tmp_path),))
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    _cfg([{"name": "baseline"}, {"name": "c", "chat": "single"}], models=(str(tmp_path),))


def test_chat_works_carry_turns_and_their_models():
    cfg = _cfg([{"name": "baseline"}, {"name": "chat", "chat": True, "models": ["model-a"], "shots": {"k": 2}}])
    works = expand([ITEM], DEV, cfg, dataset="mmlu")
    chat = [w for w in works if w.setting == "chat"]
    assert {w.scoring.label for w in chat} == {"symbol", "hybrid", "cloze"}
    assert all(w.models == ("model-a",) and w.for_model("model-a") and not w.for_model("model-b") for w in chat)
    assert all(w.models is None for w in works if w.setting == "baseline")
    by = {w.scoring.label: w.requests[0] for w in chat}
    assert by["symbol"].chat == by["hybrid"].chat != by["cloze"].chat
    assert by["cloze"].chat[-1] == ("user", "What is 2 plus 2?\nAnswer:")
    # the fake engine tells a chat request from the same raw text
    fake = FakeEngine()
    raw = ScoreRequest(prompt=by["symbol"].prompt, symbols=by["symbol"].symbols)
    assert fake.score([raw])[0].symbol_logprobs != fake.score([by["symbol"]])[0].symbol_logprobs


def test_planner_counts_chat_requests_only_for_their_models():
    cfg = _cfg([{"name": "baseline"}, {"name": "chat", "chat": "single", "models": ["model-a"]}],
               scorings=("symbol",))
    works = expand([ITEM], DEV, cfg, dataset="mmlu")
    tok = ByteTokenizer()
    plan = plan_works(make_shards(works, 10), ["model-a", "model-b"],
                      tokenizers={"model-a": (tok, False, 0), "model-b": (tok, False, 0)})
    a, b = plan.models
    assert (a.requests, b.requests) == (2, 1)
    # the chat job is the template's text of the same prompt ("user: <prompt>\nassistant:")
    jobs = {w.setting: _expand(w.requests, tok, {}, False) for w in works}
    ctx = {k: bytes(j[0][3]).decode() for k, j in jobs.items()}  # (" A" is 2 bytes: a continuation job)
    assert ctx["chat"] == "user: " + ctx["baseline"] + "\nassistant:"
    assert a.tokens_requested - b.tokens_requested == sum(len(token_job(j).ids) for j in jobs["chat"])


def test_encode_chat_needs_a_template():
    class NoTemplate:
        chat_template = None
        name_or_path = "base-model"

        def encode(self, text, add_special_tokens=False):
            return [1]

    with pytest.raises(ValueError, match="base-model: the tokenizer has no chat template"):
        encode_chat(NoTemplate(), [("user", "hi")])
    with pytest.raises(ValueError, match="no chat template"):
        _expand([ScoreRequest(prompt="hi", symbols=("A",), chat=(("user", "hi"),))], NoTemplate(), {})


# ----------------------------------------------------------------------------- packaged models

@pytest.mark.model
def test_one_chat_one_token_stream_in_scoring_generation_and_serving():
    """SmolLM2 (chat template) and Gemma-3 (a base model served through its registry template):
    the eval engine layer, the generator and the Serve LLM deployment encode a chat identically."""
    from rayeval.eval.plan import load_tokenizer
    from rayeval.models import get_spec
    from rayeval.prefs.generate import VLLMGenerator
    from rayeval.serve.llm import PromptFormat

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"}]
    for model in ("smollm2-135m", "gemma3-270m"):
        tok, add_bos, _ = load_tokenizer(model)
        spec = get_spec(model)
        if not getattr(tok, "chat_template", None):
            tok.chat_template = spec.chat_template
        scoring = token_job(_expand([ScoreRequest(prompt="", symbols=("A", "B"),
                                                  chat=tuple((m["role"], m["content"]) for m in msgs))],
                                    tok, {}, add_bos)[0]).ids
        gen = object.__new__(VLLMGenerator)
        gen.tokenizer, gen.engine = tok, type("E", (), {"add_bos": add_bos})()
        served = PromptFormat.of(spec, model, prompt_format="chat").prompt_ids(tok, msgs)
        assert list(scoring) == gen.prompt_ids(msgs) == served, model
        if tok.bos_token_id is not None and add_bos:
            assert scoring[0] == tok.bos_token_id and scoring[1] != tok.bos_token_id
    text = tok.decode(list(scoring))
    assert "Question: What is 2 plus 2?" in text  # Gemma's registry template rendered the turns


@pytest.mark.model
def test_chat_request_scores_as_its_rendered_text_on_smollm2():
    """A chat request is exactly the raw request of its template text (HF engine, real weights),
    and it differs from the raw prompt: the axis changes what the model sees."""
    from rayeval.eval.engines import chat_text, make_engine

    p = build_prompt(ITEM, "mmlu", {"k": 2}, DEV, chat="multiturn")
    eng = make_engine("hf", "smollm2-135m", {"dtype": "float32", "num_threads": 2})
    text = chat_text(eng.tokenizer, p.messages)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    chat, rendered, raw = eng.score([ScoreRequest(prompt=p.text, symbols=p.symbols, chat=p.messages),
                                     ScoreRequest(prompt=text, symbols=p.symbols),
                                     ScoreRequest(prompt=p.text, symbols=p.symbols)])
    assert max(abs(a - b) for a, b in zip(chat.symbol_logprobs, rendered.symbol_logprobs)) < 1e-4
    assert max(abs(a - b) for a, b in zip(chat.symbol_logprobs, raw.symbol_logprobs)) > 1e-3


def test_report_compares_chat_with_raw_like_any_perturbation(tmp_path):
    """A chat setting scored for one model of two: Δacc, paired test and rank tables carry it."""
    import pandas as pd

    from rayeval.eval.metrics import compute_all
    from rayeval.eval.report import write_report
    from rayeval.eval.scoring import reduce

    items = [MCQItem(id=f"q{i}", question=f"What is {i} plus {i}?", choices=[str(2 * i), "x", "y", "z"], gold=0,
                     subject="math") for i in range(30)]
    cfg = _cfg([{"name": "baseline"}, {"name": "chat", "chat": True, "models": ["model-a"]}], scorings=("symbol",))
    works = expand(items, DEV, cfg, dataset="mmlu")
    fake = FakeEngine()
    rows = [reduce(w, fake.score(w.requests), model=m) for m in cfg.models for w in works if w.for_model(m)]
    df = pd.DataFrame(rows)
    assert set(df[df.setting == "chat"].model) == {"model-a"} and (df[df.setting == "chat"].chat == "multiturn").all()
    assert len(df[df.setting == "baseline"]) == 60
    tables = compute_all(df, ("baseline", "symbol"), n_boot=50)
    s = tables["summary"].set_index(["model", "setting"])
    assert ("model-a", "chat") in s.index and ("model-b", "chat") not in s.index
    a = df[df.model == "model-a"].pivot(index="item_id", columns="setting", values="correct")
    row = s.loc[("model-a", "chat")]
    assert row["delta_acc"] == pytest.approx(100 * (a["chat"].mean() - a["baseline"].mean()))
    assert 0 <= row["p_adj"] <= 1 and row["delta_lo"] <= row["delta_acc"] <= row["delta_hi"]
    files = write_report(df, tmp_path, tables=tables)
    assert "chat" in files["report"].read_text()
