"""Prompt templates and in-context example variants."""

import csv

import pytest

from rayeval.config import data_root
from rayeval.data.schema import MCQItem
from rayeval.eval import perturb
from rayeval.eval.prompts import Shots, build_prompt, get_template, load_templates, trivial_examples

ITEM = MCQItem(id="t1", subject="high_school_biology", question="What carries oxygen in blood?",
               choices=("Platelets", "Hemoglobin", "Plasma", "Lymph"), gold=1)
DEV = [MCQItem(id=f"bio-dev-{i}", subject="high_school_biology", question=f"Bio dev {i}?",
               choices=(f"b{i}a", f"b{i}b", f"b{i}c", f"b{i}d"), gold=i % 4) for i in range(5)] + \
      [MCQItem(id=f"law-dev-{i}", subject="professional_law", question=f"Law dev {i}?",
               choices=(f"l{i}a", f"l{i}b", f"l{i}c", f"l{i}d"), gold=(i + 1) % 4) for i in range(5)]


def test_standard_mmlu_prompt_exact():
    p = build_prompt(ITEM, "mmlu")
    assert p.text == ("The following are multiple choice questions (with answers) about high school biology.\n\n"
                      "What carries oxygen in blood?\nA. Platelets\nB. Hemoglobin\nC. Plasma\nD. Lymph\nAnswer:")
    assert p.cloze_text == ("The following are multiple choice questions (with answers) about high school biology.\n\n"
                            "What carries oxygen in blood?\nAnswer:")
    assert p.symbols == tuple("ABCD") and p.gold == 1 and p.options == ITEM.choices


def test_instruction_variants():
    assert "about" not in build_prompt(ITEM, "no_subject").text.split("\n")[0]
    p = build_prompt(ITEM, "various_subjects", Shots(k=3, source="ood"), DEV)
    assert p.text.startswith("The following are 3 multiple choice questions (with answers) on various subjects, "
                             "followed by a question about high school biology.")
    assert set(load_templates()) >= {"mmlu", "no_subject", "various_subjects", "arc"}
    with pytest.raises(ValueError, match="unknown prompt template"):
        get_template("nope")


def test_k_shot_from_dev_of_same_subject_in_order():
    p = build_prompt(ITEM, "mmlu", {"k": 2}, DEV)
    assert p.applied["example_ids"] == ["bio-dev-0", "bio-dev-1"]
    assert "Bio dev 0?\nA. b0a\nB. b0b\nC. b0c\nD. b0d\nAnswer: A\n\n" in p.text
    assert "Bio dev 1?\nA. b1a\nB. b1b\nC. b1c\nD. b1d\nAnswer: B\n\n" in p.text
    assert p.text.endswith("D. Lymph\nAnswer:")
    assert "Bio dev 1?\nAnswer: b1b\n\n" in p.cloze_text


def test_all_example_answers_fixed_to_one_letter():
    for pos, letter in enumerate("ABCD"):
        p = build_prompt(ITEM, "mmlu", {"k": 5, "fixed_position": pos}, DEV)
        assert p.applied["example_answers"] == [pos] * 5
        assert p.text.count(f"Answer: {letter}\n\n") == 5
        for i in range(5):  # the right text still sits at the shown answer
            assert f"{letter}. b{i}{'abcd'[i % 4]}\n" in p.text


def test_ood_examples_come_from_other_subjects():
    p = build_prompt(ITEM, "mmlu", {"k": 3, "source": "ood"}, DEV)
    assert len(p.applied["example_ids"]) == 3
    assert all(e.startswith("law-dev") for e in p.applied["example_ids"])


def test_trivial_examples():
    assert len(trivial_examples()) >= 5
    p = build_prompt(ITEM, "mmlu", {"k": 3, "source": "trivial"}, DEV)
    assert len(p.applied["example_ids"]) == 3 and all(e.startswith("trivial-") for e in p.applied["example_ids"])
    assert p.text.count("Answer:") == 4


def test_target_question_as_example_correct_and_incorrect():
    p = build_prompt(ITEM, "mmlu", {"source": "self_correct"})
    assert p.text.count("What carries oxygen in blood?") == 2
    assert "D. Lymph\nAnswer: B\n\n" in p.text
    q = build_prompt(ITEM, "mmlu", {"source": "self_incorrect"}, seed=3)
    (ans,) = q.applied["example_answers"]
    assert ans != ITEM.gold and f"D. Lymph\nAnswer: {'ABCD'[ans]}\n\n" in q.text
    assert "Answer: " + ITEM.choices[ans] + "\n\n" in q.cloze_text


def test_examples_share_target_symbols():
    it = perturb.apply(ITEM, [{"name": "symbols", "set": "common"}], seed=0)
    p = build_prompt(it, "mmlu", {"k": 1}, DEV)
    assert "$. b0a\n&. b0b\n#. b0c\n@. b0d\nAnswer: $\n\n" in p.text


def test_too_few_dev_examples_is_an_error():
    with pytest.raises(ValueError, match="needs 9 dev examples"):
        build_prompt(ITEM, "mmlu", {"k": 9}, DEV)
    with pytest.raises(ValueError, match="shots.source"):
        Shots(source="random")


def test_real_mmlu_rows():
    f = data_root() / "mmlu" / "dev" / "anatomy_dev.csv"
    if not f.exists():
        pytest.skip("no shared MMLU data")
    rows = list(csv.reader(open(f, encoding="utf-8")))
    dev = [MCQItem(f"anatomy-dev-{i}", "anatomy", r[0], tuple(r[1:5]), "ABCD".index(r[5])) for i, r in enumerate(rows)]
    p = build_prompt(dev[4], "mmlu", {"k": 4}, dev[:4])
    assert p.text.count("\nAnswer:") == 5 and p.text.endswith("Answer:")
