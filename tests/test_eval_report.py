"""The report writes its files with the expected content, from synthetic rows."""

import pytest

import json

import pandas as pd

from rayeval.data.schema import MCQItem
from rayeval.eval.engines import FakeEngine
from rayeval.eval.report import md_table, write_report
from rayeval.eval.scoring import expand, reduce

CFG = {
    "seed": 0,
    "scorings": ["symbol", "hybrid", "cloze"],
    "settings": [
        {"name": "baseline", "cyclic": 0.5},
        {"name": "gold_A", "perturbations": [{"name": "fix_gold", "position": 0}], "scorings": ["symbol"]},
        {"name": "gold_B", "perturbations": [{"name": "fix_gold", "position": 1}], "scorings": ["symbol"]},
        {"name": "rare", "perturbations": [{"name": "symbols", "set": "rare"}], "scorings": ["symbol"]},
    ],
}


def synthetic_rows():
    items = [MCQItem(id=f"q{k}", subject="s", question=f"Question {k}?", choices=tuple(f"o{k}-{j}" for j in range(4)),
                     gold=k % 4) for k in range(24)]
    rows = []
    for name, bias in (("alpha", [2.0, 0, 0, 0]), ("beta", [0, 0, 0, 1.0]), ("gamma", [])):
        eng = FakeEngine(bias=bias, seed=len(name))
        rows += [reduce(w, eng.score(w.requests), model=name) for w in expand(items, [], CFG, dataset="toy")]
    return rows


def test_write_report(tmp_path):
    files = write_report(synthetic_rows(), tmp_path, baseline=("baseline", "symbol"), n_boot=200, pride_fraction=0.5)
    for name in ("report.md", "metrics.parquet", "metrics.json", "rank_shift_toy.png", "forced_gold.png", "rstd.png"):
        assert (tmp_path / name).exists() and (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "rstd.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "report.md").read_text()
    for heading in ("## Accuracy, Δacc, RStd and rank", "## Kendall τ", "## Rank shift", "## Accuracy by forced gold",
                    "## Recall by gold position", "## CircularEval", "## PriDe"):
        assert heading in md
    assert "| alpha | toy | gold_B | symbol |" in md and "![rank shift](rank_shift_toy.png)" in md
    js = json.loads((tmp_path / "metrics.json").read_text())
    assert js["baseline"] == ["baseline", "symbol"]
    summ = pd.DataFrame(js["tables"]["summary"])
    assert len(summ) == 3 * (3 + 3)  # 3 models x (baseline x 3 scorings + 3 symbol-only settings)
    assert set(summ["setting"]) == {"baseline", "gold_A", "gold_B", "rare"}
    assert (summ[(summ.setting == "baseline") & (summ.scoring == "symbol")]["delta_acc"] == 0).all()
    pq = pd.read_parquet(tmp_path / "metrics.parquet")
    assert {"summary", "kendall", "rank_shift", "recall", "forced_gold"} <= set(pq["table"])
    fg = pd.DataFrame(js["tables"]["forced_gold"])
    assert sorted(fg["forced_gold"].unique()) == [0, 1]
    assert len(pd.DataFrame(js["tables"]["pride"])) == 3 * 2  # symbol, hybrid (cloze is not rotated)
    assert files["report"] == tmp_path / "report.md"


def test_md_table():
    assert md_table(pd.DataFrame({"a": [1.0, float("nan")], "b": ["x|y", "z"]})) == \
        "| a | b |\n|---|---|\n| 1.00 | x\\|y |\n|  | z |\n"
    assert md_table(pd.DataFrame()) == "_(none)_\n"


@pytest.mark.slow
def test_write_report_per_dataset_baseline(tmp_path):
    rows = synthetic_rows()
    rows += [dict(r, dataset="toy2") for r in rows]
    base = {"*": ("baseline", "symbol"), "toy2": ("baseline", "cloze")}
    write_report(rows, tmp_path, baseline=base, n_boot=50, pride_fraction=0.5)
    md = (tmp_path / "report.md").read_text()
    assert "toy: `baseline / symbol`; toy2: `baseline / cloze`" in md
    assert (tmp_path / "rank_shift_toy2.png").exists()
    js = json.loads((tmp_path / "metrics.json").read_text())
    assert js["baseline"] == {"*": ["baseline", "symbol"], "toy2": ["baseline", "cloze"]}
    s = pd.DataFrame(js["tables"]["summary"])
    assert (s[(s.dataset == "toy2") & (s.setting == "baseline") & (s.scoring == "cloze")]["delta_acc"] == 0).all()
