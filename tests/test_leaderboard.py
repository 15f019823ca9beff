"""Leaderboards from per-item correctness tables: formats, errors, hand-computed tests, RouterBench."""

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from rayeval.cli import app
from rayeval.eval.leaderboard import CorrectnessError, leaderboard, read_correctness, write_leaderboard


def wide_csv(path, n=40):
    """top: 36/40 right; twin: top with 2 lost and 1 gained (35/40); low: 20/40, right only on even items."""
    lines = ["sample_id,prompt,top,twin,low,top|total_cost,twin|total_cost,low|total_cost"]
    for k in range(n):
        top = int(k < 36)
        twin = 0 if k in (0, 1) else 1 if k == 39 else top
        low = int(k % 2 == 0)
        lines.append(f"q{k},\"text, {k}\",{top}.0,{twin},{'True' if low else 'False'},0.01,0.02,0.001")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_wide_table_hand_computed(tmp_path):
    rows, notes = read_correctness([str(wide_csv(tmp_path / "toy.csv"))])
    assert notes == [] and set(rows["dataset"]) == {"toy"} and len(rows) == 120
    t = leaderboard(rows, n_boot=300)
    per = t["leaderboard"].set_index("model")
    assert per["acc"].to_dict() == pytest.approx({"top": 90.0, "twin": 87.5, "low": 50.0})
    assert per["rank"].to_dict() == {"top": 1, "twin": 2, "low": 3}
    assert per.loc["low", ["rank_lo", "rank_hi"]].tolist() == [3, 3]
    assert per["usd_per_1k_items"].to_dict() == pytest.approx({"top": 10.0, "twin": 20.0, "low": 1.0})
    assert per["group"].to_dict() == {"top": 1, "twin": 1, "low": 2}
    pw = t["pairwise"].set_index(["model_a", "model_b"])
    # top vs twin: 2 vs 1 discordant -> exact p = 2 * P(X <= 1 | 3, 1/2) = 1
    assert pw.loc[("top", "twin"), ["n_only_a", "n_only_b", "p_mcnemar"]].tolist() == [2, 1, 1.0]
    # top vs low: top alone right on the 18 odd items < 36, low alone right on even items >= 36 (36, 38)
    assert pw.loc[("top", "low"), ["n_only_a", "n_only_b"]].tolist() == [18, 2]
    assert pw.loc[("top", "low"), "p_mcnemar"] == pytest.approx(2 * (1 + 20 + 190) / 2 ** 20)
    assert pw.loc[("top", "low"), "p_adj"] == pytest.approx(3 * 2 * 211 / 2 ** 20)  # smallest of 3: Holm x3
    g = t["groups"]
    assert g["models"].tolist() == ["top, twin", "low"]


def test_ids_spread_over_rows_are_joined_and_conflicts_named(tmp_path):
    p = tmp_path / "spread.csv"
    p.write_text("id,a,b\nx1,1,\nx2,0,1\nx1,,0\nx3,1,1\n")
    rows, notes = read_correctness([f"d={p}"])
    assert len(rows) == 6 and rows.set_index(["item_id", "model"]).loc[("x1", "b"), "correct"] == 0
    assert notes == ["d: 1 item id(s) spread over several rows (each model's result given once) were joined"]
    p.write_text("id,a,b\nx1,1,\nx2,0,1\nx1,0,0\n")
    with pytest.raises(CorrectnessError, match=r"model 'a' has more than one result for item 'x1' "
                                               r"\(spread.csv line 2, spread.csv line 4\)"):
        read_correctness([str(p)])


def test_files_joined_into_one_dataset_and_partial_items_dropped(tmp_path):
    (tmp_path / "tr.csv").write_text("id,a,b\n1,1,0\n2,1,1\n")
    (tmp_path / "te.csv").write_text("id,a,b\n3,0,\n4,1,0\n")
    rows, notes = read_correctness([f"both={tmp_path / 'tr.csv'},{tmp_path / 'te.csv'}"])
    assert sorted(rows["item_id"].unique()) == ["1", "2", "4"]
    assert notes == ["both: dropped 1 item(s) that not every model answered"]
    (tmp_path / "te.csv").write_text("id,a,b\n2,0,1\n")
    with pytest.raises(CorrectnessError, match=r"model 'a' has more than one result for item '2'"):
        read_correctness([f"both={tmp_path / 'tr.csv'},{tmp_path / 'te.csv'}"])


def test_bad_input_names_file_column_row(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("id,a,b\n1,1,0\n2,0.5,1\n")
    with pytest.raises(CorrectnessError, match=r"bad.csv: column 'a' line 3: value '0.5' is not 0/1/True/False"):
        read_correctness([str(p)], models=["a", "b"])
    with pytest.raises(CorrectnessError, match=r"found 1 model column\(s\) of 0/1 values \(\['b'\]\)"):
        read_correctness([str(p)])
    with pytest.raises(CorrectnessError, match=r"model column\(s\) \['c'\] not found"):
        read_correctness([str(p)], models=["a", "c"])
    with pytest.raises(CorrectnessError, match=r"no id column 'item'"):
        read_correctness([str(p)], id_col="item")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(CorrectnessError, match=r"unsupported format '.txt'"):
        read_correctness([str(tmp_path / "x.txt")])
    with pytest.raises(CorrectnessError, match="no such file"):
        read_correctness([str(tmp_path / "missing.csv")])


def test_rayeval_rows_give_one_leaderboard_per_condition(tmp_path):
    rows = []
    for k in range(30):
        for setting in ("baseline", "shuffle"):
            for model, ok in (("m1", k < 27), ("m2", (k < 12) if setting == "baseline" else (k < 28))):
                rows.append(dict(model=model, dataset="mmlu", setting=setting, scoring="symbol", item_id=f"i{k}",
                                 correct=ok, rotation=0))
                rows.append(dict(model=model, dataset="mmlu", setting=setting, scoring="symbol", item_id=f"i{k}",
                                 correct=False, rotation=1))  # a cyclic rotation: not part of the leaderboard
    pd.DataFrame(rows).to_parquet(tmp_path / "rows.parquet")
    got, notes = read_correctness([str(tmp_path / "rows.parquet")])
    assert notes == [] and len(got) == 2 * 2 * 30  # rotation-1 rows left out
    per = leaderboard(got, n_boot=200)["leaderboard"].set_index(["setting", "model"])
    assert per.loc[("baseline", "m1"), "acc"] == pytest.approx(90.0)
    assert per.loc[("baseline", "m2"), "rank"] == 2 and per.loc[("shuffle", "m2"), "rank"] == 1
    assert per.loc[("baseline", "m2"), "group"] == 2 and per.loc[("shuffle", "m2"), "group"] == 1


def test_cli_writes_report(tmp_path):
    wide_csv(tmp_path / "toy.csv")
    r = CliRunner().invoke(app, ["leaderboard", f"toy={tmp_path / 'toy.csv'}", "--out", str(tmp_path / "o"),
                                 "--n-boot", "200", "--correction", "fdr_bh"])
    assert r.exit_code == 0, r.output
    assert "toy\tgroup 1\ttop, twin" in r.output
    md = (tmp_path / "o" / "leaderboard.md").read_text()
    assert "## toy" in md and "| 1 | top, twin |" in md and "fdr_bh" in md
    for f in ("leaderboard_toy.png", "pairwise_toy.png"):
        assert (tmp_path / "o" / f).read_bytes()[:4] == b"\x89PNG"
    js = json.loads((tmp_path / "o" / "leaderboard.json").read_text())
    assert js["correction"] == "fdr_bh" and len(js["tables"]["pairwise"]) == 3
    r = CliRunner().invoke(app, ["leaderboard", str(tmp_path / "toy.csv"), "--out", str(tmp_path / "o"),
                                 "--correction", "bh"])
    assert r.exit_code == 2 and "correction: 'bh' is not one of" in " ".join(r.output.split())


def test_routerbench_arc_leaderboard(shared_data, tmp_path):
    d = shared_data / "routerbench_zs"
    files = [d / "arc_challenge_train.csv", d / "arc_challenge_test.csv"]
    rows, notes = read_correctness(["arc=" + ",".join(map(str, files))])
    assert notes and "14 item id(s) spread over several rows" in notes[0]
    # the same accuracies straight from the CSVs: one result per (id, model), NaN = no result
    raw = pd.concat([pd.read_csv(f) for f in files])
    gpt4 = raw.groupby("sample_id")["gpt-4-1106-preview"].max()
    t = leaderboard(rows, n_boot=200)
    per = t["leaderboard"].set_index("model")
    assert len(per) == 11 and per["n"].iloc[0] == raw["sample_id"].nunique() == len(gpt4.dropna())
    assert per.loc["gpt-4-1106-preview", "acc"] == pytest.approx(100 * gpt4.mean())
    assert per.loc["gpt-4-1106-preview", ["rank", "rank_lo", "rank_hi", "group"]].tolist() == [1, 1, 1, 1]
    assert (per["rank_lo"] <= per["rank"]).all() and (per["rank"] <= per["rank_hi"]).all()
    out = write_leaderboard(t, tmp_path)
    assert out["leaderboard_arc"].exists() and "## arc" in out["report"].read_text()
