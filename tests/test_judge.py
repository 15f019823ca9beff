"""LLM-as-judge labelling: aggregation of both orders, position bias, the judge actor with test
doubles, configs, prompt loading, and the Ray Data jobs (generate -> judge -> router) on fakes."""

import json

import numpy as np
import pandas as pd
import pytest

from rayeval.eval.engines import FakeEngine, ScoreResult
from rayeval.prefs.generate import GenerateConfig, load_generate_config, load_prompts, render_chat, run_generate
from rayeval.prefs.judge import (JudgeActor, JudgeConfig, aggregate_pairwise, judge_markdown, load_judge_config,
                                 pairwise_items, run_judge)
from rayeval.prefs.outcomes import Preferences


def _raw(rows):
    """rows: (prompt_id, order, verdict, lp_first, lp_second) -> judge-call frame for pair (m1, m2)."""
    return pd.DataFrame([{"prompt_id": p, "query": f"q{p}", "group": "g", "model_a": "m1", "model_b": "m2",
                          "order": o, "verdict": v, "lp_first": lf, "lp_second": ls, "lp_tie": -9.0}
                         for p, o, v, lf, ls in rows])


HAND = _raw([
    ("1", "ab", "first", -1, -3), ("1", "ba", "second", -3, -1),    # m1 both times       -> a
    ("2", "ab", "second", -3, -1), ("2", "ba", "first", -1, -3),    # m2 both times       -> b
    ("3", "ab", "first", -1, -3), ("3", "ba", "first", -0.5, -3.5),  # first position twice -> tie
    ("4", "ab", "second", -3, -1), ("4", "ba", "second", -3, -2),   # second position twice -> tie
    ("5", "ab", "tie", -2, -2.5), ("5", "ba", "second", -3, -1),    # tie vs m1            -> tie
])


def test_aggregate_both_orders_by_hand():
    prefs, st = aggregate_pairwise(HAND)
    d = prefs.df.set_index("query_id")
    assert d.winner.to_dict() == {"1": "a", "2": "b", "3": "tie", "4": "tie", "5": "tie"}
    assert d.consistent.tolist() == [True, True, False, False, False]
    assert st["n_pairs"] == 5 and st["n_calls"] == 10
    assert st["consistency"] == pytest.approx(2 / 5)
    assert st["position_bias_rate"] == pytest.approx(3 / 5)
    assert st["first_position_both"] == pytest.approx(1 / 5)
    assert st["second_position_both"] == pytest.approx(1 / 5)
    assert st["first_position_share"] == pytest.approx(4 / 10)
    assert st["second_position_share"] == pytest.approx(5 / 10)
    assert st["tie_call_share"] == pytest.approx(1 / 10)
    assert st["winner_shares"] == pytest.approx({"a": 0.2, "b": 0.2, "tie": 0.6})
    assert st["per_model"]["m1"] == pytest.approx({"win": 0.2, "tie": 0.6})
    # debiased: margin = 0.5 * [(lp1 - lp2)_ab - (lp1 - lp2)_ba]; offset = the mean of the two
    assert d.loc["1", "margin"] == pytest.approx(2.0) and d.loc["1", "position_offset"] == pytest.approx(0.0)
    assert d.loc["3", "margin"] == pytest.approx(0.5 * (2 - 3)) and d.loc["3", "position_offset"] == pytest.approx(2.5)
    assert d.loc["4", "margin"] == pytest.approx(0.5 * (-2 - -1))
    assert d.winner_debiased.to_dict() == {"1": "a", "2": "b", "3": "b", "4": "b", "5": "a"}
    # the preference file is in the routers' schema, and the rule picks the winner column
    assert isinstance(prefs, Preferences) and {"query_id", "query", "group", "model_a", "model_b", "winner"} <= set(d.reset_index())
    deb, _ = aggregate_pairwise(HAND, rule="debiased", tie_margin=0.6)
    assert deb.df.set_index("query_id").winner.to_dict() == {"1": "a", "2": "b", "3": "tie", "4": "tie", "5": "a"}
    lab = prefs.strong_labels("m1", "m2").set_index("query_id")
    assert lab.y.to_dict() == {"1": 1.0, "2": 0.0, "3": 0.5, "4": 0.5, "5": 0.5}
    md = judge_markdown({**st, "judge": "double"})
    assert "position-bias rate" in md and "60.0%" in md and "high" in md


def test_aggregate_rejects_incomplete_or_duplicated_pairs():
    with pytest.raises(ValueError, match="one order only"):
        aggregate_pairwise(HAND.iloc[:-1])
    with pytest.raises(ValueError, match="twice"):
        aggregate_pairwise(pd.concat([HAND, HAND.iloc[:1]]))
    with pytest.raises(ValueError, match="agree or debiased"):
        aggregate_pairwise(HAND, rule="majority")
    bad = HAND.copy()
    bad.loc[0, "verdict"] = "A"
    with pytest.raises(ValueError, match="first/second/tie"):
        aggregate_pairwise(bad)


class ContentJudge:
    """Deterministic judge double: prefers the answer that contains GOOD, plus ``bias`` nats for
    whatever stands in the first position."""

    name = "double"
    tokenizer = None

    def __init__(self, bias: float = 0.0):
        self.bias = bias
        self.prompts = []

    @staticmethod
    def _between(text, start, end):
        return text.split(start, 1)[1].split(end, 1)[0]

    def score(self, reqs):
        out = []
        for r in reqs:
            assert r.symbols == ("A", "B", "C")
            self.prompts.append(r.prompt)
            a = self._between(r.prompt, "[The Start of Assistant A's Answer]", "[The End of Assistant A's Answer]")
            b = self._between(r.prompt, "[The Start of Assistant B's Answer]", "[The End of Assistant B's Answer]")
            out.append(ScoreResult(symbol_logprobs=[-2.0 + 2 * ("GOOD" in a) + self.bias,
                                                    -2.0 + 2 * ("GOOD" in b), -3.0]))
        return out


def _responses():
    good1 = [True, True, True, False]  # m1 gives the better answer on prompts 0-2, m2 on prompt 3
    rows = []
    for i, g in enumerate(good1):
        rows.append({"prompt_id": f"p{i}", "prompt": f"question {i} {{with braces}}", "group": "g", "model": "m1",
                     "response": "GOOD answer" if g else "meh"})
        rows.append({"prompt_id": f"p{i}", "prompt": f"question {i} {{with braces}}", "group": "g", "model": "m2",
                     "response": "meh" if g else "GOOD answer"})
    return pd.DataFrame(rows)


def _judge_with(engine, resp=None):
    cfg = load_judge_config("judge_mt_bench")
    actor = JudgeActor(cfg.model, {"kind": "fake"}, {**cfg.pairwise.__dict__}, "pairwise", engine=engine)
    items = pairwise_items(_responses() if resp is None else resp)
    return aggregate_pairwise(pd.DataFrame(actor.judge(items)))


def test_both_orders_with_an_unbiased_double():
    eng = ContentJudge(bias=0.0)
    prefs, st = _judge_with(eng)
    assert len(eng.prompts) == 8  # 4 prompts x 1 pair x 2 orders
    assert all("{with braces}" in p for p in eng.prompts)  # template filling leaves other braces alone
    assert prefs.df.set_index("query_id").winner.to_dict() == {"p0": "a", "p1": "a", "p2": "a", "p3": "b"}
    assert st["position_bias_rate"] == 0 and st["consistency"] == 1
    assert st["first_position_share"] == pytest.approx(0.5)


def test_position_bias_turns_wins_into_ties_and_is_reported():
    prefs, st = _judge_with(ContentJudge(bias=5.0))  # the first position always wins
    d = prefs.df.set_index("query_id")
    assert (d.winner == "tie").all() and (d.verdict_ab == "first").all() and (d.verdict_ba == "first").all()
    assert st["position_bias_rate"] == 1 and st["first_position_both"] == 1 and st["first_position_share"] == 1
    assert st["position_offset_nats"] == pytest.approx(5.0)
    # the constant offset cancels in the debiased log-odds: the content signal comes back
    assert d.winner_debiased.to_dict() == {"p0": "a", "p1": "a", "p2": "a", "p3": "b"}
    # a moderate bias flips only the pairs where content and position disagree
    _, st2 = _judge_with(ContentJudge(bias=1.0))
    assert st2["position_bias_rate"] == 0


def test_fake_engine_with_position_bias():
    _, st = _judge_with(FakeEngine(bias=[6.0, 0.0, 0.0]))
    assert st["first_position_share"] == 1 and st["position_bias_rate"] == 1


def test_configs_and_validation():
    g, j = load_generate_config("judge_mt_bench"), load_judge_config("judge_mt_bench")
    assert g.models == ["smollm2-135m", "gemma3-270m"] and g.sampling.max_tokens <= 128
    assert j.model == "gemma3-270m" and j.mode == "pairwise" and j.pairwise.symbols == ["A", "B", "C"]
    assert j.single.symbols[-1] == "10"
    base = {"pairwise": {"template": "{question} {answer_a}"}}
    with pytest.raises(ValueError, match="answer_b"):
        JudgeConfig.from_dict(base)
    with pytest.raises(ValueError, match="unknown key"):
        JudgeConfig.from_dict({"modle": "x"})
    with pytest.raises(ValueError, match="pairwise or single"):
        JudgeConfig.from_dict({"mode": "triple", "pairwise": {"template": "{question}{answer_a}{answer_b}"}})
    with pytest.raises(ValueError, match="unknown key"):
        GenerateConfig.from_dict({"sampling": {"temp": 1}})


def test_load_prompts_formats(tmp_path, shared_data):
    mt = load_prompts("mt_bench")
    assert len(mt) == 80 and mt.prompt_id.is_unique and mt.prompt_id.iloc[0] == "mt_bench:81"
    assert load_prompts("mt_bench", turn=2).prompt.iloc[0].startswith("Rewrite your previous response")
    g = tmp_path / "q.jsonl"
    g.write_text(json.dumps({"question_id": 7, "turns": ["a", "b"], "category": "c"}) + "\n")
    q = load_prompts(str(g))
    assert q.to_dict("records") == [{"prompt_id": "7", "prompt": "a", "group": "c"}]
    h = tmp_path / "m.jsonl"
    h.write_text(json.dumps({"id": "m1", "messages": [{"role": "system", "content": "s"},
                                                     {"role": "user", "content": "hello"}]}) + "\n")
    assert load_prompts(str(h)).prompt.tolist() == ["hello"]
    assert len(load_prompts("routerbench:mbpp:test", limit=5)) == 5
    with pytest.raises(FileNotFoundError):
        load_prompts("nope.jsonl")


def test_render_chat_leaves_bos_to_the_engine_rule():
    class Tok:
        chat_template = "x"
        bos_token, bos_token_id = "<bos>", 7

        def apply_chat_template(self, msgs, add_generation_prompt, tokenize):
            return "Question: " + msgs[-1]["content"] + "\nAnswer:"

        def encode(self, text, add_special_tokens=False):
            return [7 if w == "<bos>" else len(w) for w in text.replace("<bos>", "<bos> ").split()]

    text = render_chat(Tok(), [{"role": "user", "content": "hi"}], " X")
    assert text == "Question: hi\nAnswer: X"
    from rayeval.eval.engines import encode_prompt

    # BOS once, from the registry's rule, whether or not the text already carries it
    assert encode_prompt(Tok(), text, add_bos=True)[:2] == [7, len("Question:")]
    assert encode_prompt(Tok(), "<bos>" + text, add_bos=True)[:2] == [7, len("Question:")]
    assert render_chat(None, [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]) == "s\n\nhi"


@pytest.mark.ray
def test_generate_and_judge_jobs_on_ray_resume_and_train(tmp_path, shared_data):
    gcfg = GenerateConfig.from_dict({"name": "gen_test", "models": ["model-a", "model-b"],
                                     "prompts": {"source": "mt_bench", "limit": 6},
                                     "sampling": {"max_tokens": 12}, "shard_size": 2, "engine": {"kind": "fake"}})
    part = run_generate(gcfg, tmp_path / "gen", stop_after=1)
    assert not part["complete"] and part["written"] == 1
    res = run_generate(gcfg, tmp_path / "gen")
    assert res["complete"] and res["written"] == 2 and res["rows"] == 12
    resp = pd.read_parquet(tmp_path / "gen" / "responses.parquet")
    assert not resp.duplicated(["prompt_id", "model"]).any() and (resp.tokens <= 12).all()
    assert set(resp.columns) >= {"prompt_id", "prompt", "model", "response", "tokens", "finish_reason"}
    with pytest.raises(ValueError, match="different config"):
        run_generate(GenerateConfig.from_dict({**gcfg.__dict__, "prompts": {"source": "mt_bench", "limit": 5},
                                               "sampling": gcfg.sampling.__dict__}), tmp_path / "gen")

    jcfg = load_judge_config("judge_mt_bench")
    jcfg.shard_size, jcfg.engine = 2, {"kind": "fake", "bias": [3.0, 0.0, 0.0]}
    jr = run_judge(jcfg, tmp_path / "gen", tmp_path / "judge")
    assert jr["complete"] and jr["shards"] == 3 and jr["rows"] == 6
    again = run_judge(jcfg, tmp_path / "gen", tmp_path / "judge")
    assert again["written"] == 0
    calls = pd.read_parquet(tmp_path / "judge" / "judgements.parquet")
    assert len(calls) == 12 and set(calls.order) == {"ab", "ba"}
    st = json.loads((tmp_path / "judge" / "judge_stats.json").read_text())
    assert st["first_position_share"] > 0.5 and "position-bias rate" in (tmp_path / "judge" / "judge_report.md").read_text()

    prefs = Preferences.load(tmp_path / "judge" / "preferences.parquet")
    assert len(prefs) == 6 and prefs.models == ["model-a", "model-b"]
    from rayeval.route.routers import make_router

    r = make_router("knn", k=3, strong="model-a", weak="model-b").fit(prefs)
    p = r.win_probability(prefs.unique_queries()["query"].tolist())
    assert p.shape == (6,) and np.all((0 <= p) & (p <= 1))


@pytest.mark.engine
def test_tiny_real_run_generate_judge_train(tmp_path, shared_data):
    """Real vLLM on CPU, engines shared within the test: SmolLM2-135M and Gemma-3-270M answer 3
    MT-Bench questions (16 tokens), Gemma-3-270M's engine then judges both orders -> a
    Preferences file that a router trains on."""
    from rayeval.prefs.generate import GenerateActor, Sampling, VLLMGenerator
    from rayeval.runtime import write_parquet
    from rayeval.route.routers import make_router

    import pickle

    models = ["smollm2-135m", "gemma3-270m"]
    gens = {m: VLLMGenerator(m, {"max_model_len": 1024, "cpu_cores": str(i % 2)}) for i, m in enumerate(models)}
    try:
        prompts = load_prompts("mt_bench", limit=3)
        sampling = Sampling(temperature=0.7, max_tokens=16, seed=0, stop=["\nQuestion:"])
        actor = GenerateActor(models, {"kind": "vllm"}, sampling.__dict__, generators=gens)
        batch = {"shard": np.array([0]), "payload": np.array([pickle.dumps(prompts.to_dict("records"))], dtype=object)}
        resp = actor(batch).drop(columns=["shard"])
        assert len(resp) == 6 and (resp.tokens > 0).all() and (resp.tokens <= 16).all()
        assert (resp.response.str.len() > 0).all()
        # the same seed on the same computation gives the same text (each request carries its own
        # seed): two calls of the same batch, the prefix cache emptied before each.  Not against the
        # actor's call above: that one ran beside the other model's engine, and at temperature 0.7
        # a near-tie between two tokens flips on a last-bit difference of the logits (seen in CI).
        from rayeval.prefs.generate import conversation

        convs = [conversation(p, None) for p in prompts.prompt]
        texts = []
        for _ in range(2):
            gens["smollm2-135m"].engine.llm.reset_prefix_cache()
            texts.append([a["response"] for a in gens["smollm2-135m"].generate(convs, sampling)])
        # Seeded sampling starts the same; on a CPU two identical calls can still differ by a last
        # bit late in a sequence (seen at token ~14 of 16 on a loaded host), so the check is the start
        # of each text: without the seed they part at the first sampled tokens.
        assert all(texts[0]) and all(a[:40] == b[:40] for a, b in zip(*texts)), texts
        write_parquet(resp, tmp_path / "responses.parquet")

        cfg = load_judge_config("judge_mt_bench")
        judge = JudgeActor(cfg.model, {"kind": "vllm"}, {**cfg.pairwise.__dict__}, "pairwise",
                           engine=gens[cfg.model].engine)
        items = pairwise_items(pd.read_parquet(tmp_path / "responses.parquet"))
        assert len(items) == 6
        # the base model gets its BOS token once: from the registry rule, as every prompt does
        from rayeval.eval.engines import encode_prompt

        eng = gens[cfg.model].engine
        ids = encode_prompt(eng.tokenizer, judge.build(items[0]), eng.add_bos)
        assert eng.add_bos and ids[0] == eng.tokenizer.bos_token_id != ids[1]
        calls = pd.DataFrame(judge.judge(items))
        lp = calls[["lp_first", "lp_second", "lp_tie"]].to_numpy()
        assert np.isfinite(lp).all() and (lp < 0).all() and (lp > -50).all()
        prefs, st = aggregate_pairwise(calls)
        prefs.save(tmp_path / "preferences.parquet")
        back = Preferences.load(tmp_path / "preferences.parquet")
        assert len(back) == 3 and set(back.models) == set(models)
        assert 0 <= st["position_bias_rate"] <= 1
        r = make_router("knn", k=2, strong="gemma3-270m", weak="smollm2-135m").fit(back)
        assert r.win_probability(["Write a poem about the sea."]).shape == (1,)
    finally:
        for g in gens.values():
            g.close()


def test_single_answer_grading_with_fake_engine():
    from rayeval.prefs.judge import aggregate_single, single_items

    cfg = load_judge_config("judge_mt_bench")
    actor = JudgeActor(cfg.model, {"kind": "fake"}, {**cfg.single.__dict__}, "single", engine=FakeEngine(seed=3))
    resp = _responses()
    rows = pd.DataFrame(actor.judge(single_items(resp)))
    assert len(rows) == 8 and rows.rating.between(1, 10).all() and rows.rating_expected.between(1, 10).all()
    # the expectation is over the renormalised distribution of the ten ratings
    lp = np.array(rows.logprobs.iloc[0])
    p = np.exp(lp - lp.max())
    assert rows.rating_expected.iloc[0] == pytest.approx(float((p / p.sum()) @ np.arange(1, 11)))
    oc, prefs, st = aggregate_single(rows, tie_eps=0.0)
    assert oc.models == ["m1", "m2"] and len(oc) == 4 and len(prefs) == 4
    d = oc.scores.to_numpy()
    exp = np.where(d[:, 0] > d[:, 1], "a", np.where(d[:, 0] < d[:, 1], "b", "tie"))
    assert prefs.df.winner.tolist() == exp.tolist()
    assert "mean expected rating" in judge_markdown({**st, "judge": "fake"})
