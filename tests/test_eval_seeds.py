"""Settings under K seeds: independent draws per replicate, config expansion, the seed-variance table."""

import pandas as pd
import pytest

from rayeval.data.schema import MCQItem
from rayeval.eval import metrics as M
from rayeval.eval import perturb
from rayeval.eval.config import ConfigError, EvalConfig, base_setting
from rayeval.eval.prompts import Shots
from rayeval.eval.report import write_report
from rayeval.eval.scoring import expand

ITEMS = [MCQItem(id=f"q{k}", subject="anatomy", question=f"Q{k}?", choices=tuple(f"o{k}{j}" for j in range(4)),
                 gold=k % 4) for k in range(40)]


def perm(item, specs, seed=0):
    return perturb.apply(item, specs, seed).meta["perm"]


def test_replicates_draw_independently():
    same = sum(perm(it, ["shuffle"]) == perm(it, [{"name": "shuffle", "seed": 0}]) for it in ITEMS)
    assert same == len(ITEMS)  # replicate 0 is the spec without a seed
    differ = sum(perm(it, ["shuffle"]) != perm(it, [{"name": "shuffle", "seed": 1}]) for it in ITEMS)
    assert differ >= 30  # 4 options: another draw matches with p = 1/24
    assert all(perm(it, [{"name": "shuffle", "seed": 2}]) == perm(it, [{"name": "shuffle", "seed": 2}]) for it in ITEMS)
    assert perturb.build({"name": "shuffle", "seed": 2}).spec == {"name": "shuffle", "seed": 2}
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        perturb.build({"name": "shuffle", "seed": -1})


BASE = {"name": "t", "models": ["m1"], "datasets": [{"name": "mmlu"}], "settings": [{"name": "baseline"}]}


def cfg(*settings):
    return EvalConfig.from_dict(dict(BASE, settings=[{"name": "baseline"}, *settings]))


def test_seeds_expand_into_replicates():
    c = cfg({"name": "shuffle", "perturbations": ["shuffle", {"name": "symbols", "set": "rare"}], "seeds": 3},
            {"name": "ood", "shots": {"k": 2, "source": "ood"}, "seeds": 2})
    assert [s.name for s in c.settings] == ["baseline", "shuffle", "shuffle@seed1", "shuffle@seed2", "ood", "ood@seed1"]
    assert c.setting("shuffle@seed2").perturbations == [{"name": "shuffle", "seed": 2}, {"name": "symbols", "set": "rare"}]
    assert c.setting("shuffle").perturbations == ["shuffle", {"name": "symbols", "set": "rare"}]
    assert c.setting("ood@seed1").shots == Shots(k=2, source="ood", seed=1)
    assert {s.seeds for s in c.settings} == {1} and base_setting("shuffle@seed2") == "shuffle"
    dev = [MCQItem(id=f"d{i}", subject=f"s{i}", question="?", choices=tuple("abcd"), gold=0) for i in range(8)]
    works = {(w.setting, w.prompt.item_id): w.prompt.applied for w in expand(ITEMS, dev, c, dataset="mmlu")}
    moved = sum(works[("shuffle", it.id)]["perm"] != works[("shuffle@seed1", it.id)]["perm"] for it in ITEMS)
    assert moved >= 30
    other = sum(works[("ood", it.id)]["example_ids"] != works[("ood@seed1", it.id)]["example_ids"] for it in ITEMS)
    assert other >= 30  # 2 of 8 other-subject examples: a repeat draw matches rarely


@pytest.mark.parametrize("setting,msg", [
    ({"name": "gold", "perturbations": [{"name": "fix_gold", "position": 0}], "seeds": 2},
     r"settings\[1\]\.seeds: setting 'gold' has nothing random to repeat"),
    ({"name": "dev5", "shots": {"k": 5, "source": "dev"}, "seeds": 2}, r"settings\[1\]\.seeds: setting 'dev5'"),
    ({"name": "shuffle", "perturbations": ["shuffle"], "seeds": 0}, r"settings\[1\]\.seeds: expected an integer >= 1"),
    ({"name": "x@seed1", "perturbations": ["shuffle"]}, r"settings\[1\]\.name: 'x@seed1' contains '@seed'"),
])
def test_seed_errors_name_the_field(setting, msg):
    with pytest.raises(ConfigError, match=msg):
        cfg(setting)


def seed_rows(n=100):
    """m1's accuracy is 50 / 60 / 70 under the three replicates, m2's 65 under all."""
    rows = []
    for setting, a1 in (("baseline", 0.6), ("shuffle", 0.5), ("shuffle@seed1", 0.6), ("shuffle@seed2", 0.7)):
        for model, a in (("m1", a1), ("m2", 0.65)):
            rows += [dict(model=model, dataset="d", setting=setting, scoring="symbol", item_id=f"i{k}", gold=k % 4,
                          prediction=k % 4 if k < a * n else (k + 1) % 4, rotation=0, n_options=4, forced_gold=-1)
                     for k in range(n)]
    return rows


def test_seed_variance_hand_computed(tmp_path):
    t = M.compute_all(seed_rows(), n_boot=200)
    sv = t["seed_variance"].set_index("model")
    assert set(sv["setting"]) == {"shuffle"} and (sv["n_seeds"] == 3).all()
    assert sv.loc["m1", ["acc_mean", "acc_sd", "acc_min", "acc_max"]].tolist() == pytest.approx([60, 10, 50, 70])
    assert sv.loc["m2", ["acc_mean", "acc_sd"]].tolist() == pytest.approx([65, 0])
    assert sv.loc["m1", ["rank_min", "rank_max"]].tolist() == [1, 2]  # 2nd, 2nd, 1st
    s = t["summary"]
    widths = s[(s.model == "m1") & s.setting.str.startswith("shuffle")].eval("acc_hi - acc_lo")
    assert sv.loc["m1", "boot_ci_width"] == pytest.approx(widths.mean())
    write_report(pd.DataFrame(seed_rows()), tmp_path, n_boot=100, pride_fraction=0.5)
    md = (tmp_path / "report.md").read_text()
    assert "## Seed variance" in md and "| m1 | d | shuffle | symbol | 3 | 60.00 | 10.00 |" in md
