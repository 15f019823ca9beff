"""The robust protocol: balanced in-context answers, protocols in the config, the stability comparison."""

import json

import pandas as pd
import pytest

from rayeval.data.schema import MCQItem
from rayeval.eval import metrics as M
from rayeval.eval.config import ConfigError, EvalConfig, load_eval_config
from rayeval.eval.prompts import Shots, build_prompt
from rayeval.eval.report import write_report
from rayeval.eval.scoring import expand

ITEM = MCQItem(id="t1", subject="bio", question="Q?", choices=("w", "x", "y", "z"), gold=1)
DEV_ALL_A = [MCQItem(id=f"d{i}", subject="bio", question=f"Dev {i}?", choices=(f"r{i}", f"f{i}1", f"f{i}2", f"f{i}3"),
                     gold=0) for i in range(5)]


def test_balanced_shots_cycle_the_answer_positions():
    p = build_prompt(ITEM, "mmlu", {"k": 5, "balanced": True}, DEV_ALL_A)
    assert p.applied["example_answers"] == [0, 1, 2, 3, 0]  # every dev answer was at A
    for i, letter in enumerate("ABCDA"):  # the right text moved with it
        assert f"{letter}. r{i}\n" in p.text and f"Dev {i}?" in p.text
    assert p.applied["shots"]["balanced"] is True
    assert build_prompt(ITEM, "mmlu", {"k": 5}, DEV_ALL_A).applied["example_answers"] == [0] * 5
    with pytest.raises(ValueError, match="shots.balanced: cannot be combined with fixed_position"):
        Shots(k=2, balanced=True, fixed_position=1)
    with pytest.raises(ValueError, match="shots.balanced: must be true or false"):
        Shots(k=2, balanced="yes")


def test_packaged_robust_preset():
    c = load_eval_config("eval_robust")
    assert set(c.protocols) == {"standard", "robust"}
    std, rob = c.protocols["standard"], c.protocols["robust"]
    assert (std.baseline, std.scoring, rob.baseline, rob.scoring) == ("baseline", "symbol", "robust", "hybrid")
    assert len(std.settings) == len(rob.settings) == 5
    # the robust settings apply the same perturbations as the standard ones they stand beside
    for a, b in zip(std.settings, rob.settings):
        assert c.setting(a).perturbations == c.setting(b).perturbations and b == f"robust_{a}"
        assert c.setting(b).shots == Shots(k=5, source="dev", balanced=True)
    assert c.report_kwargs()["protocols"]["robust"]["settings"] == rob.settings
    dev = [MCQItem(id=f"dv{i}", subject="anatomy", question=f"D{i}?", choices=tuple("abcd"), gold=0) for i in range(5)]
    items = [MCQItem(id="x1", subject="anatomy", question="Q?", choices=tuple("efgh"), gold=2)]
    works = {(w.setting, w.scoring.label): w for w in expand(items, dev, c, dataset="mmlu")}
    assert works[("robust", "hybrid")].prompt.applied["example_answers"] == [0, 1, 2, 3, 0]
    assert ("robust", "symbol") not in works and works[("baseline", "symbol")].prompt.applied["example_ids"] == []


BASE = {"name": "t", "models": ["m1"], "datasets": [{"name": "mmlu"}], "scorings": ["symbol", "hybrid"],
        "settings": [{"name": "baseline"}, {"name": "s", "scorings": ["symbol"]}]}


@pytest.mark.parametrize("protocols,msg", [
    ({"p": {"baseline": "baseline", "scoring": "symbol", "settings": ["nope"]}},
     r"protocols\.p\.settings\[0\]: 'nope' is not one of the settings"),
    ({"p": {"baseline": "baseline", "scoring": "hybrid", "settings": ["s"]}},
     r"protocols\.p\.settings\[0\]: setting 's' does not run scoring 'hybrid'"),
    ({"p": {"baseline": "baseline", "scoring": "cloze", "settings": ["s"]}}, r"protocols\.p\.scoring: 'cloze'"),
    ({"p": {"baseline": "baseline", "scoring": "symbol"}}, r"protocols\.p\.settings: required"),
    ({"p": {"baseline": "baseline", "scoring": "symbol", "settings": []}}, r"protocols\.p\.settings: expected"),
    ({"p": {"baseline": "b", "scoring": "symbol", "settings": ["s"], "extra": 1}}, r"protocols\.p: unknown key"),
    ([], r"protocols: expected a mapping"),
])
def test_protocol_errors_name_the_field(protocols, msg):
    with pytest.raises(ConfigError, match=msg):
        EvalConfig.from_dict(dict(BASE, protocols=protocols))


def rows(setting, scoring, accs, n=200):
    return [dict(model=m, dataset="d", setting=setting, scoring=scoring, item_id=f"i{k}", gold=0,
                 prediction=0 if k < a * n else 1, correct=k < a * n, rotation=0, n_options=4, forced_gold=-1)
            for m, a in accs.items() for k in range(n)]


PROTOCOLS = {"standard": {"baseline": "baseline", "scoring": "symbol", "settings": ["p1", "p2"]},
             "robust": {"baseline": "robust", "scoring": "hybrid", "settings": ["robust_p1", "robust_p2"]}}


def protocol_rows():
    ordered = {"m1": 0.9, "m2": 0.6, "m3": 0.3}
    return (rows("baseline", "symbol", ordered) + rows("p1", "symbol", {"m1": 0.3, "m2": 0.6, "m3": 0.9})
            + rows("p2", "symbol", {"m1": 0.9, "m2": 0.3, "m3": 0.6})
            + rows("robust", "hybrid", ordered) + rows("robust_p1", "hybrid", {"m1": 0.85, "m2": 0.55, "m3": 0.25})
            + rows("robust_p2", "hybrid", ordered))


def test_protocol_stability_hand_computed():
    per, summ = M.protocol_stability(protocol_rows(), PROTOCOLS, n_boot=200)
    per = per.set_index(["protocol", "setting"])
    # p1 reverses 3 models: tau = -1, shifts (-2, 0, +2); p2 swaps m2 and m3: tau = 1/3, shifts (0, -1, +1)
    assert per.loc[("standard", "p1"), ["tau", "tau_lo", "tau_hi"]].tolist() == pytest.approx([-1, -1, -1])
    assert per.loc[("standard", "p1"), "mean_abs_shift"] == pytest.approx(4 / 3)
    assert per.loc[("standard", "p2"), "tau"] == pytest.approx(1 / 3)
    assert per.loc[("standard", "p2"), "mean_abs_shift"] == pytest.approx(2 / 3)
    assert (per["rank_width"] == 0).all() and (per["n_items"] == 200).all()  # 30-point gaps: exact ranks
    s = summ.set_index("protocol")
    assert s.loc["standard", "mean_tau"] == pytest.approx((-1 + 1 / 3) / 2)
    assert s.loc["robust", "mean_tau"] == pytest.approx(1.0) and s.loc["robust", "mean_abs_shift"] == 0
    assert s.loc["robust", "n_settings"] == 2


@pytest.mark.slow
def test_report_has_protocol_section(tmp_path):
    write_report(pd.DataFrame(protocol_rows()), tmp_path, n_boot=100, pride_fraction=0.5, protocols=PROTOCOLS)
    md = (tmp_path / "report.md").read_text()
    section = md.split("## Protocol stability")[1]
    assert "| standard | d | 2 | -0.33 |" in section and "| robust | d | 2 | 1.00 |" in section


@pytest.mark.slow
def test_robust_preset_end_to_end_on_a_fake_engine(tmp_path):
    """The packaged preset's grid, scored by three biased fakes, reports both protocols."""
    from rayeval.eval.engines import FakeEngine
    from rayeval.eval.scoring import reduce

    c = load_eval_config("eval_robust")
    subjects = c.datasets[0].subjects
    dev = [MCQItem(id=f"{s}-dev{i}", subject=s, question=f"{s} dev {i}?", choices=tuple(f"{s}{i}{j}" for j in "abcd"),
                   gold=i % 4) for s in subjects for i in range(5)]
    items = [MCQItem(id=f"{s}-{k}", subject=s, question=f"{s} question {k}?", choices=tuple(f"o{k}{j}" for j in "abcd"),
                     gold=k % 4) for s in subjects for k in range(10)]
    works = expand(items, dev, c, dataset="mmlu")
    rows = []
    for k, (name, bias) in enumerate((("a", [2.0, 0, 0, 0]), ("b", [0, 0, 0, 1.0]), ("c", []))):
        eng = FakeEngine(bias=bias, seed=k)
        rows += [reduce(w, eng.score(w.requests), model=name) for w in works]
    files = write_report(rows, tmp_path, **dict(c.report_kwargs(), n_boot=100))
    md = files["report"].read_text()
    t = json.loads((tmp_path / "metrics.json").read_text())["tables"]
    summ = pd.DataFrame(t["stability_summary"]).set_index("protocol")
    assert set(summ.index) == {"standard", "robust"} and (summ["n_settings"] == 5).all()
    assert summ["mean_tau"].between(-1, 1).all() and "## Protocol stability" in md
    assert (tmp_path / "report.html").stat().st_size > 0
