"""The MCQ data layer on the real shared files, and every kind of malformed input."""

import json

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from rayeval.cli import app
from rayeval.data.loaders import load_items, summarize
from rayeval.data.schema import DataValidationError, items_from_arrow, items_to_arrow

runner = CliRunner()


def test_mmlu_counts(shared_data):
    res = load_items(shared_data / "mmlu")
    s = summarize(res.items)
    assert s["by_split"] == {"dev": 285, "test": 14042}
    assert s["subjects"] == 57
    assert not res.rejects
    assert all(it.n_choices == 4 for it in res.items)
    test = load_items(shared_data / "mmlu", split="test", subjects=["marketing"])
    assert len(test.items) == 234
    first = test.items[0]
    assert first.question.startswith("This is a hierarchy of effects")
    assert first.choices == ("ADD.", "AIDA.", "PESTLE.", "SWOT.") and first.gold == 1


def test_arc_counts_with_odd_options(shared_data):
    res = load_items(shared_data / "arc_challenge" / "test.jsonl")
    s = summarize(res.items)
    assert s["items"] == 1172
    assert s["by_n_choices"] == {3: 4, 4: 1165, 5: 3}
    numeric = [it for it in res.items if it.labels and it.labels[0] == "1"]
    assert len(numeric) == 22
    for it in numeric:  # numeric answer keys resolve to the right index
        assert it.labels[it.gold] == json.loads(open(it.meta["source"].rsplit(":", 1)[0]).readlines()[
            int(it.meta["source"].rsplit(":", 1)[1]) - 1])["answerKey"]


def test_cli_inspect_mmlu(shared_data):
    r = runner.invoke(app, ["data", "inspect", str(shared_data / "mmlu"), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["items"] == 14327 and s["by_split"]["test"] == 14042 and s["subjects"] == 57


def test_arrow_roundtrip(shared_data):
    items = load_items(shared_data / "arc_challenge" / "dev.jsonl").items
    t = items_to_arrow(items)
    assert isinstance(t, pa.Table) and t.num_rows == 299
    back = items_from_arrow(t)
    assert [(b.id, b.choices, b.gold) for b in back] == [(i.id, i.choices, i.gold) for i in items]


BAD_MMLU = (
    b'"Good question?",a,b,c,d,A\n'
    b'"Missing a choice?",a,b,c,B\n'
    b'"Gold out of range?",a,b,c,d,F\n'
    b',a,b,c,d,A\n'
    b'"Bad bytes \xff\xfe here",a,b,c,d,A\n'
    b'"Another good one?",a,b,c,d,D\n'
)


def test_malformed_mmlu_every_row_reported(tmp_path):
    d = tmp_path / "mm"
    d.mkdir()
    f = d / "toy_test.csv"
    f.write_bytes(BAD_MMLU)
    with pytest.raises(DataValidationError) as ei:
        load_items(d)
    errs = {e.line: e.message for e in ei.value.errors}
    assert set(errs) == {2, 3, 4, 5}
    assert "choice is missing" in errs[2]
    assert "gold" in errs[3]
    assert "empty question" in errs[4]
    assert "encoding" in errs[5]
    assert all(str(e).startswith(f"{f}:") for e in ei.value.errors)

    res = load_items(d, skip_invalid=True)
    assert [it.question for it in res.items] == ["Good question?", "Another good one?"]
    out = res.write_rejects(tmp_path / "rejects.jsonl")
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [2, 3, 4, 5] and all(r["file"] == str(f) for r in rows)


def test_malformed_cli_exit_and_skip(tmp_path):
    d = tmp_path / "mm"
    d.mkdir()
    (d / "toy_test.csv").write_bytes(BAD_MMLU)
    r = runner.invoke(app, ["data", "inspect", str(d)])
    assert r.exit_code == 1
    assert f"{d / 'toy_test.csv'}:3:" in r.stderr
    rej = tmp_path / "rej.jsonl"
    r = runner.invoke(app, ["data", "inspect", str(d), "--skip-invalid", "--rejects", str(rej), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["items"] == 2 and len(rej.read_text().splitlines()) == 4


def test_generic_jsonl_duplicate_and_mapping(tmp_path):
    f = tmp_path / "g.jsonl"
    rows = [
        {"qid": "x1", "q": "2+2?", "opts": ["3", "4"], "ans": 1},
        {"qid": "x1", "q": "dup?", "opts": ["a", "b"], "ans": 0},
        {"qid": "x2", "q": "three options?", "opts": ["a", "b", "c"], "ans": "C"},
        {"qid": "x3", "q": "gold too big", "opts": ["a", "b"], "ans": 5},
        {"qid": "x4", "q": "missing opts"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    cmap = {"id": "qid", "question": "q", "choices": "opts", "gold": "ans"}
    with pytest.raises(DataValidationError) as ei:
        load_items(f, columns=cmap)
    errs = {e.line: e.message for e in ei.value.errors}
    assert "duplicate id 'x1'" in errs[2]
    assert "out of range" in errs[4]
    assert "missing field 'opts'" in errs[5]
    assert "invalid JSON" in errs[6]
    res = load_items(f, columns=cmap, skip_invalid=True)
    assert [(i.id, i.gold) for i in res.items] == [("x1", 1), ("x2", 2)]


def test_generic_csv_and_parquet_columns(tmp_path):
    import pyarrow.parquet as pq

    f = tmp_path / "g.csv"
    f.write_text("question,a,b,c,answer\nWhat?,x,y,z,B\n")
    items = load_items(f, columns="question=question,choices=a|b|c,gold=answer,id=,subject=").items
    assert items[0].choices == ("x", "y", "z") and items[0].gold == 1
    p = tmp_path / "g.parquet"
    pq.write_table(pa.table({"question": ["Q1", "Q2"], "choices": [["a", "b"], ["c", "d", "e"]], "gold": [0, 2]}), p)
    items = load_items(p).items
    assert [i.n_choices for i in items] == [2, 3] and items[1].gold == 2


@pytest.mark.ray
def test_ray_dataset_output(shared_data):
    from rayeval.cluster import init_ray
    from rayeval.data.loaders import to_ray_dataset

    init_ray()
    items = load_items(shared_data / "mmlu", split="dev").items
    ds = to_ray_dataset(items)
    assert ds.count() == 285
    assert set(ds.schema().names) >= {"id", "question", "choices", "gold"}
