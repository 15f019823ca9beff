"""EvalConfig parsing and validation; the packaged example configs load and expand."""

import csv
import json

import pytest

from rayeval.config import data_root
from rayeval.data.schema import MCQItem
from rayeval.eval.config import ConfigError, EvalConfig, load_eval_config
from rayeval.eval.engines import FakeEngine
from rayeval.eval.scoring import expand, reduce

BASE = {
    "name": "t",
    "models": ["m1", "m2"],
    "datasets": [{"name": "mmlu", "subjects": ["anatomy"], "limit": 3}],
    "settings": [{"name": "baseline"}, {"name": "rare", "perturbations": [{"name": "symbols", "set": "rare"}]}],
    "scorings": ["symbol", {"name": "hybrid", "normalize": "chars"}],
}


def with_(**kw):
    d = json.loads(json.dumps(BASE))
    d.update(kw)
    return d


def test_parse_ok():
    c = EvalConfig.from_dict(BASE)
    assert [s.label for s in c.scorings] == ["symbol", "hybrid/chars"]
    assert c.settings[1].perturbations == [{"name": "symbols", "set": "rare"}]
    assert c.baseline.setting == "baseline" and c.seed == 0 and c.datasets[0].limit == 3


@pytest.mark.parametrize("patch,msg", [
    ({"modles": ["x"]}, r"config: unknown key\(s\) \['modles'\]"),
    ({"models": []}, r"models: expected a non-empty list"),
    ({"models": ["a", "a"]}, r"models: duplicate"),
    ({"datasets": [{"name": "mmlu", "limit": 0}]}, r"datasets\[0\]\.limit: expected an integer >= 1"),
    ({"datasets": [{"name": "mmlu", "splitt": "x"}]}, r"datasets\[0\]: unknown key"),
    ({"settings": [{"name": "baseline"}, {"name": "x", "perturbations": ["shufle"]}]},
     r"settings\[1\]\.perturbations\[0\]: unknown perturbation 'shufle'"),
    ({"settings": [{"name": "baseline"}, {"name": "x", "perturbations": [{"name": "fix_gold", "method": "slide"}]}]},
     r"settings\[1\]\.perturbations\[0\]: .*method"),
    ({"settings": [{"name": "baseline", "shots": {"k": 1, "source": "web"}}]}, r"settings\[0\]\.shots\.source"),
    ({"settings": [{"name": "baseline", "cyclic": 2}]}, r"settings\[0\]\.cyclic"),
    ({"settings": [{"name": "baseline", "template": "fancy"}]}, r"settings\[0\]\.template: unknown prompt template"),
    ({"settings": [{"name": "baseline"}, {"name": "baseline"}]}, r"settings: duplicate setting name"),
    ({"settings": [{"name": "baseline", "scorings": ["cloze"]}]}, r"settings\[0\]\.scorings: \['cloze'\] not among"),
    ({"scorings": ["symbol", "bogus"]}, r"scorings\[1\]: .*unknown method 'bogus'"),
    ({"baseline": {"setting": "nope"}}, r"baseline\.setting: 'nope' is not one of the settings"),
    ({"batch_size": 0}, r"batch_size: expected an integer >= 1"),
    ({"metrics": {"nboot": 5}}, r"metrics: unknown key"),
])
def test_errors_name_the_field(patch, msg):
    with pytest.raises(ConfigError, match=msg):
        EvalConfig.from_dict(with_(**patch))


def test_packaged_configs_load():
    small = load_eval_config("eval_small")
    grid = load_eval_config("eval_paper_grid")
    assert small.models == ["smollm2-135m", "gemma3-270m"] and grid.name == "eval_paper_grid"
    for c in (small, grid):
        names = {s.name for s in c.settings}
        assert {"baseline", "shuffle", "derange", "gold_A", "gold_D", "symbols_rare", "symbols_common",
                "self_correct", "self_incorrect"} <= names
        assert {s.label for s in c.scorings} == {"symbol", "hybrid", "cloze"}


def _mmlu(split, subject, n):
    f = data_root() / "mmlu" / split / f"{subject}_{split}.csv"
    rows = list(csv.reader(open(f, encoding="utf-8")))[:n]
    return [MCQItem(f"mmlu/{subject}/{split}/{i + 1}", subject, r[0], tuple(r[1:5]), "ABCD".index(r[5]))
            for i, r in enumerate(rows)]


def _arc(split, n):
    out = []
    for line in open(data_root() / "arc_challenge" / f"{split}.jsonl", encoding="utf-8"):
        d = json.loads(line)
        labels = [c["label"] for c in d["question"]["choices"]]
        out.append(MCQItem(d["id"], "arc_challenge", d["question"]["stem"],
                           tuple(c["text"] for c in d["question"]["choices"]), labels.index(d["answerKey"]),
                           labels=tuple(labels)))
    return [o for o in out if o.n_choices == 5][:2] + out[:n]


def test_eval_small_expands_on_real_rows():
    if not (data_root() / "mmlu").is_dir():
        pytest.skip("no shared data")
    cfg = load_eval_config("eval_small")
    subjects = cfg.datasets[0].subjects
    items = [it for s in subjects for it in _mmlu("test", s, 3)]
    dev = [it for s in subjects for it in _mmlu("dev", s, 5)]
    works = expand(items, dev, cfg, dataset="mmlu")
    arc_works = expand(_arc("test", 3), _arc("dev", 5), cfg, dataset="arc_challenge")
    assert {w.setting for w in works} == {s.name for s in cfg.settings}
    assert "shot1_ood" not in {w.setting for w in arc_works}  # restricted to mmlu
    eng = FakeEngine(bias=[0.5])
    rows = [reduce(w, eng.score(w.requests), model="fake") for w in works + arc_works]
    assert all(0 <= r["prediction"] < r["n_options"] for r in rows)
    five = [r for r in rows if r["dataset"] == "arc_challenge" and r["n_options"] == 5 and r["setting"] == "symbols_custom"]
    assert five and all(r["symbols"] == ["(1)", "(2)", "(3)", "(4)", "(5)"] for r in five)
    w = next(w for w in arc_works if w.setting == "baseline")
    assert w.prompt.text.startswith("The following are multiple choice questions (with answers) about science.")


def test_report_kwargs():
    kw = load_eval_config("eval_small").report_kwargs()
    assert kw == {"baseline": ("baseline", "symbol"), "n_boot": 1000, "ci": 0.95, "seed": 0, "pride_fraction": 0.25}
    c = EvalConfig.from_dict(with_(settings=[{"name": "baseline", "cyclic": 0.1}]))
    assert c.report_kwargs()["pride_fraction"] == 0.1


def test_per_dataset_baseline_config():
    d = with_(datasets=[{"name": "mmlu"}, {"name": "arc_challenge"}], scorings=["symbol", "cloze"],
              baseline={"setting": "baseline", "scoring": "symbol", "datasets": {"arc_challenge": {"scoring": "cloze"}}})
    c = EvalConfig.from_dict(d)
    assert c.report_kwargs()["baseline"] == {"*": ("baseline", "symbol"), "arc_challenge": ("baseline", "cloze")}
    d["baseline"]["datasets"] = {"arc": {"scoring": "cloze"}}
    with pytest.raises(ConfigError, match=r"baseline.datasets.arc: 'arc' is not one of the datasets"):
        EvalConfig.from_dict(d)
    d["baseline"]["datasets"] = {"arc_challenge": {"scoring": "hybrid"}}
    with pytest.raises(ConfigError, match=r"baseline.datasets.arc_challenge.scoring: 'hybrid'"):
        EvalConfig.from_dict(d)
    assert load_eval_config("eval_paper_grid").report_kwargs()["baseline"]["arc_challenge"] == ("baseline", "cloze")


def test_one_packaged_config_resolver_for_every_loader(tmp_path):
    from rayeval.config import CONFIG_DIR, resolve_config

    assert resolve_config("eval_small") == CONFIG_DIR / "eval_small.yaml"
    assert resolve_config("tune_small.yaml") == CONFIG_DIR / "tune_small.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("name: x\n")
    assert resolve_config(own) == own and resolve_config(str(own)) == own
    with pytest.raises(FileNotFoundError, match=r"eval_smal: No such file or directory, nor a packaged config.*eval_small"):
        resolve_config("eval_smal")
    # every loader goes through it: a packaged name works for each kind
    from rayeval.eval.config import load_eval_config
    from rayeval.prefs.generate import load_generate_config
    from rayeval.tune import TuneConfig
    from rayeval.workflow import load_workflow_config

    assert load_eval_config("eval_small").name and load_workflow_config("pipeline_small").router
    assert TuneConfig.from_yaml("tune_small").routers
    assert load_generate_config("judge_mt_bench").models


def test_a_section_reports_every_key_and_type_problem_at_once():
    # pydantic checks each section's keys and value types together: one line per problem
    bad = with_(settings=[{"name": "baseline", "seeds": "two", "templat": "mmlu", "scorings": "symbol"}])
    with pytest.raises(ConfigError) as e:
        EvalConfig.from_dict(bad)
    assert sorted(e.value.lines) == sorted([
        "settings[0]: unknown key(s) ['templat']; expected some of ['chat', 'cyclic', 'datasets', 'models', "
        "'name', 'perturbations', 'scorings', 'seeds', 'shots', 'template']",
        "settings[0].scorings: expected list, got 'symbol'",
        "settings[0].seeds: expected int, got 'two'"])
    with pytest.raises(ConfigError) as e:
        EvalConfig.from_dict(with_(datasets=[{"name": "mmlu", "subjects": "anatomy", "limit": [3]}]))
    assert set(e.value.lines) == {"datasets[0].subjects: expected list, got 'anatomy'",
                                  "datasets[0].limit: expected int, got [3]"}
    with pytest.raises(ConfigError, match=r"baseline\.datasets\.arc_challenge\.scoring: expected str, got 3"):
        EvalConfig.from_dict(with_(baseline={"datasets": {"arc_challenge": {"scoring": 3}}}))
