"""LLM-as-judge labelling on Ray Data: responses -> pairwise preferences (D_judge).

    from rayeval.prefs.judge import run_judge
    run_judge("judge_mt_bench", "runs/mtb/generate/responses.parquet", "runs/mtb/judge")

* **pairwise** (MT-Bench ``pair-v2`` style): the judge sees the question and two answers and is
  asked for ``A`` / ``B`` / ``C`` (tie).  The verdict is not parsed from free text: it is the
  argmax of the judge's next-token log-probabilities over the three verdict tokens right after
  the prompt (``VLLMEngine.score(ScoreRequest(prompt, symbols=("A", "B", "C")))``), which a
  270M model can give reliably even when it cannot write a well-formed judgement.
  Every pair is judged in BOTH orders.  Rule ``agree`` (MT-Bench's): a win counts only when
  the two orders agree, anything else is a tie.  Rule ``debiased``: the mean log-odds of a over b
  across both orders, ``0.5 * [(lpA - lpB)_ab - (lpA - lpB)_ba]``, which cancels a constant
  position offset; a tie within ``tie_margin``.  Both winners are kept as columns.
* **single** (``single-v1`` style): each answer is rated 1-10; the rating is the expectation of
  the judge's distribution over "1".."10" (multi-token ratings are scored exactly as
  continuations); pairs are then compared by rating (tie within ``tie_eps``).

The judge prompt is data: the ``judge`` section of a YAML config (``configs/judge_*.yaml``).
Output (``out_dir``): ``judgements.parquet`` (one row per judge call, with log-probabilities),
``preferences.parquet`` (the routers' ``Preferences`` schema, ready to train on),
``judge_stats.json`` (position-bias figures) and ``judge_report.md``.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy.special import logsumexp, softmax

from rayeval.config import from_dict, load_yaml, resolve_config
from rayeval.eval.engines import ScoreRequest
from rayeval.prefs.generate import conversation, render_chat
from rayeval.prefs.outcomes import Preferences, WINNERS
from rayeval.runtime import Execution, ShardActor, digest, read_rows, run_sharded, write_parquet

POSITIONS = ("first", "second", "tie")


# ----------------------------------------------------------------------------- config

@dataclass
class JudgePrompt:
    """One judge prompt.  ``template`` uses {question}, {answer_a}, {answer_b} (pairwise) or
    {answer} (single); ``symbols`` are the verdict tokens: pairwise [first wins, second wins,
    tie], single the ratings.  The prompt goes through the judge's chat template (unless
    ``use_chat_template`` is false), then ``assistant_prefix`` is appended; the verdict is the
    next token (scored as " " + symbol)."""

    system: str | None = None
    template: str = ""
    symbols: list[str] = field(default_factory=lambda: ["A", "B", "C"])
    assistant_prefix: str = ""
    use_chat_template: bool = True


@dataclass
class JudgeConfig:
    name: str = "judge"
    model: str = "gemma3-270m"
    mode: str = "pairwise"              # pairwise | single
    rule: str = "agree"                 # pairwise winner column: agree | debiased
    tie_margin: float = 0.0             # debiased rule: |log-odds| <= margin -> tie
    tie_eps: float = 0.0                # single mode: |rating difference| <= eps -> tie
    max_answer_chars: int = 2000        # answers are cut to this many characters in the judge prompt
    pairs: list[list[str]] | None = None  # model pairs to compare; default every pair in the responses
    shard_size: int = 16                # pairs (pairwise) or answers (single) per shard
    engine: dict[str, Any] = field(default_factory=lambda: {"kind": "vllm"})
    pairwise: JudgePrompt = field(default_factory=JudgePrompt)
    single: JudgePrompt = field(default_factory=lambda: JudgePrompt(symbols=[str(i) for i in range(1, 11)]))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "judge") -> "JudgeConfig":
        cfg = from_dict(cls, dict(d), where)
        if cfg.mode not in ("pairwise", "single"):
            raise ValueError(f"{where}.mode: {cfg.mode!r} is not pairwise or single")
        if cfg.rule not in ("agree", "debiased"):
            raise ValueError(f"{where}.rule: {cfg.rule!r} is not agree or debiased")
        p = cfg.prompt
        if not p.template:
            raise ValueError(f"{where}.{cfg.mode}.template: empty judge prompt")
        need = ("{question}", "{answer_a}", "{answer_b}") if cfg.mode == "pairwise" else ("{question}", "{answer}")
        miss = [n for n in need if n not in p.template]
        if miss:
            raise ValueError(f"{where}.{cfg.mode}.template: missing placeholder(s) {miss}")
        if cfg.mode == "pairwise" and len(p.symbols) != 3:
            raise ValueError(f"{where}.pairwise.symbols: need exactly [first, second, tie], got {p.symbols}")
        if cfg.mode == "single" and not all(s.strip().lstrip("-").replace(".", "", 1).isdigit() for s in p.symbols):
            raise ValueError(f"{where}.single.symbols: ratings must be numbers, got {p.symbols}")
        for pr in cfg.pairs or []:
            if len(pr) != 2 or pr[0] == pr[1]:
                raise ValueError(f"{where}.pairs: each pair is two different models, got {pr}")
        Execution.from_engine_dict(cfg.engine)
        return cfg

    @property
    def prompt(self) -> JudgePrompt:
        return self.pairwise if self.mode == "pairwise" else self.single


def load_judge_config(path: str | Path | dict) -> JudgeConfig:
    """The ``judge`` section of a job config (or a YAML whose top level is the judge section)."""
    doc = path if isinstance(path, dict) else load_yaml(resolve_config(path))
    if "judge" in doc:
        sec = dict(doc["judge"] or {})
        sec.setdefault("name", doc.get("name", "judge"))
    elif any(k in doc for k in ("models", "prompts", "sampling")):
        raise ValueError(f"{path}: a generation config without a judge section")
    else:
        sec = dict(doc)
    return JudgeConfig.from_dict(sec, where=f"{path}:judge" if not isinstance(path, dict) else "judge")


# ----------------------------------------------------------------------------- prompts

def _cut(text: str, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n] + " ..."


def fill(template: str, **kw: str) -> str:
    """Placeholder substitution that leaves every other brace alone (answers contain code)."""
    out = template
    for k, v in kw.items():
        out = out.replace("{" + k + "}", v)
    return out


def judge_prompt(p: JudgePrompt, tokenizer, **fields: str) -> str:
    msgs = conversation(fill(p.template, **fields), p.system)
    if p.use_chat_template:
        return render_chat(tokenizer, msgs, p.assistant_prefix)
    return render_chat(None, msgs, p.assistant_prefix)


# ----------------------------------------------------------------------------- the actor

class JudgeActor(ShardActor):
    """Holds the judge engine; scores the verdict tokens of whole shards of judge calls."""

    def __init__(self, model: str, execution: dict[str, Any], prompt: dict[str, Any], mode: str,
                 max_answer_chars: int = 2000, engine=None):
        from rayeval.eval.engines import make_engine

        ex = Execution(**execution)
        self.engine = engine if engine is not None else make_engine(ex.kind, model, ex.engine_kwargs_for(model))
        self.tokenizer = getattr(self.engine, "tokenizer", None)
        self.prompt = JudgePrompt(**prompt)
        self.mode = mode
        self.max_chars = max_answer_chars

    def build(self, item: dict) -> str:
        if self.mode == "pairwise":
            return judge_prompt(self.prompt, self.tokenizer, question=item["query"],
                                answer_a=_cut(item["first"], self.max_chars),
                                answer_b=_cut(item["second"], self.max_chars))
        return judge_prompt(self.prompt, self.tokenizer, question=item["query"],
                            answer=_cut(item["answer"], self.max_chars))

    def judge(self, items: Sequence[dict]) -> list[dict]:
        syms = tuple(self.prompt.symbols)
        reqs = [ScoreRequest(self.build(it), symbols=syms) for it in items]
        results = self.engine.score(reqs)
        rows = []
        for it, res in zip(items, results):
            lp = [float(v) for v in res.symbol_logprobs]
            row = {k: v for k, v in it.items() if k not in ("first", "second", "answer")}
            if self.mode == "pairwise":
                row.update(lp_first=lp[0], lp_second=lp[1], lp_tie=lp[2],
                           verdict=POSITIONS[int(np.argmax(lp))])
            else:
                vals = np.array([float(s) for s in syms])
                z = float(logsumexp(lp))
                p = softmax(np.asarray(lp, float))
                row.update(logprobs=lp, rating=float(vals[int(np.argmax(lp))]), rating_expected=float(p @ vals),
                           mass=float(math.exp(z)))
            rows.append(row)
        return rows

    def process(self, shard: int, items: list[dict]) -> list[dict[str, Any]]:
        return self.judge(items)


# ----------------------------------------------------------------------------- work

def load_responses(src: str | Path | pd.DataFrame) -> pd.DataFrame:
    """responses.parquet of ``run_generate`` (a file, or its run folder), or a frame with
    prompt_id, prompt, model, response (group optional)."""
    if isinstance(src, pd.DataFrame):
        df = src.copy()
    else:
        p = Path(src)
        if p.is_dir():
            p = p / "responses.parquet"
        df = pd.read_parquet(p)
    miss = [c for c in ("prompt_id", "prompt", "model", "response") if c not in df]
    if miss:
        raise ValueError(f"responses lack column(s) {miss}; have {list(df.columns)}")
    if "group" not in df:
        df["group"] = ""
    if df.duplicated(["prompt_id", "model"]).any():
        raise ValueError("responses: more than one response per (prompt_id, model)")
    return df


def pairwise_items(responses: pd.DataFrame, pairs: Sequence[Sequence[str]] | None = None) -> list[dict]:
    """Both orders of every (prompt, model pair): ``order`` "ab" shows model_a's answer first,
    "ba" shows model_b's first.  Models of a pair keep their given order (default: sorted)."""
    models = sorted(responses["model"].unique())
    pairs = [tuple(p) for p in pairs] if pairs else list(itertools.combinations(models, 2))
    unknown = sorted({m for p in pairs for m in p} - set(models))
    if unknown:
        raise ValueError(f"judge pairs name model(s) {unknown} without responses; have {models}")
    by = responses.set_index(["prompt_id", "model"])
    meta = responses.drop_duplicates("prompt_id").set_index("prompt_id")
    items = []
    for pid in meta.index:
        for a, b in pairs:
            if (pid, a) not in by.index or (pid, b) not in by.index:
                continue
            ra, rb = str(by.loc[(pid, a), "response"]), str(by.loc[(pid, b), "response"])
            base = {"prompt_id": str(pid), "query": str(meta.loc[pid, "prompt"]), "group": str(meta.loc[pid, "group"]),
                    "model_a": a, "model_b": b}
            items.append({**base, "order": "ab", "first": ra, "second": rb})
            items.append({**base, "order": "ba", "first": rb, "second": ra})
    return items


def single_items(responses: pd.DataFrame) -> list[dict]:
    return [{"prompt_id": str(r.prompt_id), "query": str(r.prompt), "group": str(r.group), "model": str(r.model),
             "answer": str(r.response)} for r in responses.itertuples()]


# ----------------------------------------------------------------------------- aggregation

_CANON = {("ab", "first"): "a", ("ab", "second"): "b", ("ba", "first"): "b", ("ba", "second"): "a"}


def aggregate_pairwise(raw: pd.DataFrame, rule: str = "agree", tie_margin: float = 0.0,
                       name: str = "judge") -> tuple[Preferences, dict[str, Any]]:
    """Judge calls (one row per order: prompt_id, query, group, model_a, model_b, order ab|ba,
    verdict first|second|tie, and lp_first/lp_second when known) -> (Preferences, stats).

    ``winner_agree``: the orders agree -> that verdict, else tie.  ``winner_debiased``: sign of
    ``margin`` = mean log-odds of a over b across orders (position offset cancelled), tie within
    ``tie_margin``.  ``winner`` is the one ``rule`` names.  Stats: ``position_bias_rate`` (share
    of pairs whose verdict changes with order), ``first_position_both`` / ``second_position_both``
    (the same position chosen in both orders), ``first_position_share`` (of all calls), the
    ``position_offset`` in nats and outcome shares."""
    if rule not in ("agree", "debiased"):
        raise ValueError(f"rule {rule!r}: agree or debiased")
    key = ["prompt_id", "model_a", "model_b"]
    bad = ~raw["order"].isin(["ab", "ba"]) | ~raw["verdict"].isin(POSITIONS)
    if bad.any():
        raise ValueError(f"judgements: order must be ab/ba and verdict first/second/tie (row {int(bad.to_numpy().argmax())})")
    if raw.duplicated(key + ["order"]).any():
        raise ValueError("judgements: a (prompt, pair, order) judged twice")
    ab = raw[raw.order == "ab"].set_index(key)
    ba = raw[raw.order == "ba"].set_index(key)
    both = ab.index.intersection(ba.index)
    missing = len(ab.index.union(ba.index)) - len(both)
    if missing:
        raise ValueError(f"judgements: {missing} pair(s) judged in one order only")
    ab, ba = ab.loc[both], ba.loc[both]
    v_ab = np.array([_CANON.get(("ab", v), "tie") for v in ab["verdict"]])
    v_ba = np.array([_CANON.get(("ba", v), "tie") for v in ba["verdict"]])
    agree = v_ab == v_ba
    w_agree = np.where(agree, v_ab, "tie")
    has_lp = "lp_first" in raw and "lp_second" in raw and raw[["lp_first", "lp_second"]].notna().all().all()
    if has_lp:
        d_ab = (ab["lp_first"] - ab["lp_second"]).to_numpy(float)  # log-odds first over second, a first
        d_ba = (ba["lp_first"] - ba["lp_second"]).to_numpy(float)  # ..., b first
        margin = 0.5 * (d_ab - d_ba)
        offset = 0.5 * (d_ab + d_ba)
        w_deb = np.where(margin > tie_margin, "a", np.where(margin < -tie_margin, "b", "tie"))
    else:
        margin = offset = np.full(len(both), np.nan)
        w_deb = w_agree.copy()
        if rule == "debiased":
            raise ValueError("rule debiased needs lp_first/lp_second")
    df = pd.DataFrame({
        "query_id": ab.index.get_level_values("prompt_id").astype(str),
        "query": ab["query"].astype(str).to_numpy(), "group": ab["group"].astype(str).to_numpy(),
        "model_a": ab.index.get_level_values("model_a"), "model_b": ab.index.get_level_values("model_b"),
        "winner": w_agree if rule == "agree" else w_deb,
        "winner_agree": w_agree, "winner_debiased": w_deb,
        "verdict_ab": ab["verdict"].to_numpy(), "verdict_ba": ba["verdict"].to_numpy(),
        "consistent": agree, "margin": margin, "position_offset": offset,
    })
    assert set(df["winner"]) <= set(WINNERS)
    n = len(df)
    first_both = (df.verdict_ab == "first") & (df.verdict_ba == "first")
    second_both = (df.verdict_ab == "second") & (df.verdict_ba == "second")
    calls = np.concatenate([df.verdict_ab.to_numpy(), df.verdict_ba.to_numpy()])
    stats: dict[str, Any] = {
        "rule": rule, "n_pairs": n, "n_calls": 2 * n,
        "consistency": float(agree.mean()) if n else float("nan"),
        "position_bias_rate": float(1 - agree.mean()) if n else float("nan"),
        "first_position_both": float(first_both.mean()) if n else float("nan"),
        "second_position_both": float(second_both.mean()) if n else float("nan"),
        "first_position_share": float((calls == "first").mean()) if n else float("nan"),
        "second_position_share": float((calls == "second").mean()) if n else float("nan"),
        "tie_call_share": float((calls == "tie").mean()) if n else float("nan"),
        "position_offset_nats": float(np.nanmean(offset)) if n and has_lp else float("nan"),
        "margin_sd_nats": float(np.nanstd(margin)) if n and has_lp else float("nan"),
        "winner_shares": {w: float((df.winner == w).mean()) for w in WINNERS} if n else {},
        "winner_shares_agree": {w: float((w_agree == w).mean()) for w in WINNERS} if n else {},
        "winner_shares_debiased": {w: float((w_deb == w).mean()) for w in WINNERS} if n else {},
        "debiased_vs_agree_on_consistent": float((w_deb[agree] == w_agree[agree]).mean()) if agree.any() else float("nan"),
    }
    # per model win rate (agreement rule), over the pairs it took part in
    wins = {}
    for m in sorted(set(df.model_a) | set(df.model_b)):
        mine = (df.model_a == m) | (df.model_b == m)
        won = ((df.model_a == m) & (df.winner == "a")) | ((df.model_b == m) & (df.winner == "b"))
        tie = mine & (df.winner == "tie")
        wins[m] = {"win": float(won.sum() / max(mine.sum(), 1)), "tie": float(tie.sum() / max(mine.sum(), 1))}
    stats["per_model"] = wins
    return Preferences(df, name=name), stats


def aggregate_single(raw: pd.DataFrame, tie_eps: float = 0.0, name: str = "judge"):
    """Ratings (prompt_id, query, group, model, rating_expected) -> (Outcomes, Preferences, stats)."""
    from rayeval.prefs.outcomes import Outcomes

    piv = raw.pivot(index="prompt_id", columns="model", values="rating_expected")
    meta = raw.drop_duplicates("prompt_id").set_index("prompt_id").loc[piv.index]
    oc = Outcomes(pd.DataFrame({"query_id": piv.index.astype(str), "query": meta["query"].to_numpy(),
                                "group": meta["group"].to_numpy()}), piv.reset_index(drop=True), name=name)
    prefs = oc.to_preferences(tie_eps=tie_eps)
    stats = {"mode": "single", "n_answers": len(raw), "mean_rating": {m: float(v) for m, v in oc.mean_scores().items()},
             "rating_mass": float(raw["mass"].mean()) if "mass" in raw else float("nan"),
             "winner_shares": {w: float((prefs.df.winner == w).mean()) for w in WINNERS}}
    return oc, prefs, stats


# ----------------------------------------------------------------------------- report

def judge_markdown(stats: dict[str, Any], title: str = "LLM-as-judge labels (D_judge)") -> str:
    if stats.get("mode") == "single":
        lines = [f"## {title}", "", f"{stats['n_answers']} answers rated 1-10 by `{stats.get('judge', '?')}`.", "",
                 "| model | mean expected rating |", "|---|---|"]
        lines += [f"| {m} | {v:.2f} |" for m, v in stats["mean_rating"].items()]
        return "\n".join(lines) + "\n"
    f = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"  # noqa: E731
    ws, wd = stats["winner_shares_agree"], stats["winner_shares_debiased"]
    lines = [
        f"## {title}", "",
        f"Judge `{stats.get('judge', '?')}` on {stats['n_pairs']} pairs, each judged in both orders "
        f"({stats['n_calls']} calls); verdict = argmax of the next-token log-probabilities of A/B/C.", "",
        "| figure | value |", "|---|---|",
        f"| position-bias rate (verdict changes when the order is swapped) | {f(stats['position_bias_rate'])} |",
        f"| picks the FIRST position in both orders | {f(stats['first_position_both'])} |",
        f"| picks the SECOND position in both orders | {f(stats['second_position_both'])} |",
        f"| calls choosing the first position / second / tie | {f(stats['first_position_share'])} / "
        f"{f(stats['second_position_share'])} / {f(stats['tie_call_share'])} |",
        f"| mean position offset (log-odds first over second, content cancelled) | "
        f"{'n/a' if stats.get('position_offset_nats') is None else format(stats['position_offset_nats'], '.2f')} nats |",
        f"| spread of the content log-odds (sd of the debiased margin) | "
        f"{'n/a' if stats.get('margin_sd_nats') is None else format(stats['margin_sd_nats'], '.2f')} nats |",
        f"| labels, agreement rule (a / b / tie) | {f(ws.get('a'))} / {f(ws.get('b'))} / {f(ws.get('tie'))} |",
        f"| labels, debiased log-odds rule (a / b / tie) | {f(wd.get('a'))} / {f(wd.get('b'))} / {f(wd.get('tie'))} |",
        "",
        "| model | win (agreement rule) | tie |", "|---|---|---|",
    ]
    lines += [f"| {m} | {f(v['win'])} | {f(v['tie'])} |" for m, v in stats["per_model"].items()]
    if (stats.get("position_bias_rate") or 0) > 0.3:
        lines += ["", "The position-bias rate is high: this judge mostly answers by position, not content. "
                      "Under the agreement rule such pairs become ties, so D_judge carries little signal; "
                      "a stronger judge (same config, another `model`) fixes the labels, not the pipeline."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- driver

def _finite(o):
    """NaN -> None, so the stats file is strict JSON."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, float) and math.isnan(o):
        return None
    return o


def run_judge(config: str | Path | dict | JudgeConfig, responses: str | Path | pd.DataFrame, out_dir: str | Path, *,
              engine: dict[str, Any] | None = None, resume: bool = True, stop_after: int | None = None,
              address: str | None = None) -> dict[str, Any]:
    """Judge (or resume judging) the responses; writes judgements / preferences / stats / report."""
    cfg = config if isinstance(config, JudgeConfig) else load_judge_config(config)
    ex = Execution.from_engine_dict({**cfg.engine, **(engine or {})})
    out = Path(out_dir)
    t0 = time.time()
    resp = load_responses(responses)
    if cfg.mode == "pairwise":
        items = pairwise_items(resp, cfg.pairs)
        per = 2 * cfg.shard_size  # both orders of shard_size pairs
    else:
        items = single_items(resp)
        per = cfg.shard_size
    if not items:
        raise ValueError("nothing to judge: no prompt has responses from both models of a pair")
    shards = [items[i: i + per] for i in range(0, len(items), per)]
    fp = digest(cfg.model, cfg.mode, asdict(cfg.prompt), cfg.max_answer_chars, [
        [it["prompt_id"], it.get("model_a", it.get("model")), it.get("model_b", ""), it.get("order", ""),
         it.get("first", it.get("answer")), it.get("second", "")] for it in items])
    res = run_sharded(f"{cfg.name}/judge", shards, JudgeActor,
                      {"model": cfg.model, "execution": asdict(ex), "prompt": asdict(cfg.prompt), "mode": cfg.mode,
                       "max_answer_chars": cfg.max_answer_chars},
                      out, fp, lambda s: len(shards[s]), ex, resume=resume, stop_after=stop_after, address=address,
                      meta={"judge": cfg.model, "mode": cfg.mode, "calls": len(items)})
    result: dict[str, Any] = {"out": str(out), **res}
    if not res["complete"]:
        return result
    raw = read_rows(out)
    write_parquet(raw, out / "judgements.parquet")
    if cfg.mode == "pairwise":
        prefs, stats = aggregate_pairwise(raw, cfg.rule, cfg.tie_margin, name=cfg.name)
    else:
        oc, prefs, stats = aggregate_single(raw, cfg.tie_eps, name=cfg.name)
        oc.save(out / "ratings.parquet")
    stats.update(judge=cfg.model, mode=cfg.mode)
    prefs.save(out / "preferences.parquet")
    (out / "judge_stats.json").write_text(json.dumps(_finite(stats), indent=1))
    (out / "judge_report.md").write_text(judge_markdown(stats))
    result.update(preferences=str(out / "preferences.parquet"), rows=len(prefs), stats=stats,
                  seconds=round(time.time() - t0, 1))
    (out / "run.json").write_text(json.dumps(result, indent=1, default=str))
    return result
