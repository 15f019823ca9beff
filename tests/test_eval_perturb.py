"""Invariants of every perturbation family."""

import csv

import numpy as np
import pytest

from rayeval.config import data_root
from rayeval.data.schema import MCQItem
from rayeval.eval import perturb
from rayeval.eval.prompts import build_prompt


def make_items(n_items=40, n_choices=4):
    return [MCQItem(id=f"q{i}", subject="algebra", question=f"Question {i}?",
                    choices=tuple(f"opt{i}-{j}" for j in range(n_choices)), gold=i % n_choices)
            for i in range(n_items)]


AOTA = MCQItem(id="aota", subject="s", question="Which?", choices=("x", "y", "z", "All of the above"), gold=1)
AOTA_GOLD = MCQItem(id="aota-g", subject="s", question="Which?", choices=("x", "y", "z", "None of the above."), gold=3)


def test_fix_gold_swap_puts_gold_at_position_with_text_unchanged():
    for it in make_items():
        out = perturb.apply(it, [{"name": "fix_gold", "position": 1, "method": "swap"}], seed=0)
        assert out.gold == 1
        assert out.choices[1] == it.choices[it.gold]
        assert sorted(out.choices) == sorted(it.choices)
        # swap: at most two options moved
        assert sum(a != b for a, b in zip(out.choices, it.choices)) in (0, 2)
        assert out.meta["orig_gold"] == it.gold
        assert [it.choices[p] for p in out.meta["perm"]] == list(out.choices)


def test_fix_gold_rotate_is_cyclic():
    it = MCQItem(id="r", subject="s", question="q", choices=("a", "b", "c", "d"), gold=3)
    out = perturb.apply(it, [{"name": "fix_gold", "position": 0, "method": "rotate"}], seed=0)
    assert out.choices == ("d", "a", "b", "c") and out.gold == 0


def test_rotation_by_r():
    it = MCQItem(id="r", subject="s", question="q", choices=("a", "b", "c", "d"), gold=0)
    out = perturb.apply(it, [{"name": "rotate", "r": 1}], seed=0)
    assert out.choices == ("d", "a", "b", "c") and out.gold == 1
    back = perturb.apply(out, [{"name": "rotate", "r": 3}], seed=0)
    assert back.choices == it.choices and back.meta["perm"] == [0, 1, 2, 3]


def test_swap_two_positions():
    it = MCQItem(id="s", subject="s", question="q", choices=("a", "b", "c", "d"), gold=0)
    out = perturb.apply(it, [{"name": "swap", "i": 0, "j": -1}], seed=0)
    assert out.choices == ("d", "b", "c", "a") and out.gold == 3


def test_derangement_moves_every_option():
    for n in (2, 3, 4, 5):
        for it in make_items(30, n):
            out = perturb.apply(it, ["derange"], seed=3)
            assert all(a != b for a, b in zip(out.choices, it.choices))
            assert out.choices[out.gold] == it.choices[it.gold]


def test_shuffle_preserves_multiset_and_tracks_gold():
    moved = 0
    for it in make_items(50, 5):
        out = perturb.apply(it, ["shuffle"], seed=1)
        assert sorted(out.choices) == sorted(it.choices)
        assert out.choices[out.gold] == it.choices[it.gold]
        moved += out.choices != it.choices
    assert moved > 40


def test_compose_tracks_cumulative_perm():
    p = perturb.compose(["shuffle", {"name": "rotate", "r": 2}, "derange"])
    it = make_items(1, 5)[0]
    out = p(it, np.random.default_rng(0))
    assert [it.choices[k] for k in out.meta["perm"]] == list(out.choices)
    assert out.choices[out.gold] == it.choices[it.gold]
    assert [a["name"] for a in out.meta["applied"]] == ["shuffle", "rotate", "derange"]


@pytest.mark.parametrize("spec", ["shuffle", "derange", {"name": "rotate", "r": 1}, {"name": "swap", "i": 0, "j": 3},
                                  {"name": "fix_gold", "position": 0}, {"name": "fix_gold", "position": 2, "method": "rotate"}])
def test_all_of_the_above_stays_last(spec):
    out = perturb.apply(AOTA, [spec], seed=5)
    assert out.choices[3] == "All of the above"
    assert out.choices[out.gold] == "y"
    assert out.meta["pinned"] == [3]


def test_impossible_order_is_flagged():
    out = perturb.apply(AOTA_GOLD, [{"name": "fix_gold", "position": 0}], seed=0)
    assert out.choices == AOTA_GOLD.choices and out.meta["conflicts"]
    forced = perturb.apply(AOTA_GOLD, [{"name": "fix_gold", "position": 0, "keep_special": False}], seed=0)
    assert forced.gold == 0 and not forced.meta["conflicts"]


def test_special_option_regex():
    yes = ["All of the above", "none of the above.", "Both A and B", "All of these options.", "Neither (a) nor (b)",
           "A and C", "all the above", "None of these", "Both of these"]
    no = ["All mammals", "Both parents and children", "Nonetheless", "A cat", "The above-ground part"]
    assert all(perturb.SPECIAL_OPTION.search(s) for s in yes)
    assert not any(perturb.SPECIAL_OPTION.search(s) for s in no)
    assert perturb.REFS_SYMBOLS.search("Both A and B") and not perturb.REFS_SYMBOLS.search("All of the above")


def test_special_share_of_mmlu_is_a_few_percent():
    d = data_root() / "mmlu" / "test"
    if not d.is_dir():
        pytest.skip("no shared MMLU data")
    n = hits = 0
    for f in sorted(d.glob("*_test.csv"))[:57]:
        for r in csv.reader(open(f, encoding="utf-8")):
            n += 1
            hits += bool(perturb.special_positions(r[1:5]))
    assert 0.02 < hits / n < 0.07


@pytest.mark.parametrize("set_name,expected", [("letters", "ABCD"), ("common", "$&#@"), ("rare", "œ§Зü")])
def test_symbol_sets_appear_in_prompt(set_name, expected):
    it = perturb.apply(make_items(1)[0], [{"name": "symbols", "set": set_name}], seed=0)
    p = build_prompt(it, "mmlu")
    assert p.symbols == tuple(expected)
    for sym, opt in zip(expected, it.choices):
        assert f"\n{sym}. {opt}\n" in p.text


def test_custom_symbol_list_and_shuffled_symbols():
    it = perturb.apply(make_items(1)[0], [{"name": "symbols", "set": ["(1)", "(2)", "(3)", "(4)"]}, "shuffle_symbols"],
                       seed=2)
    assert sorted(it.meta["symbols"]) == ["(1)", "(2)", "(3)", "(4)"]
    p = build_prompt(it, "mmlu")
    for sym, opt in zip(it.meta["symbols"], it.choices):
        assert f"{sym}. {opt}" in p.text
    assert it.choices == make_items(1)[0].choices  # texts stay


def test_too_few_symbols_is_a_clear_error():
    with pytest.raises(ValueError, match="has 2 symbols"):
        perturb.apply(make_items(1)[0], [{"name": "symbols", "set": ["x", "y"]}], seed=0)


def test_same_seed_same_prompts_different_seed_different():
    specs = ["shuffle", {"name": "symbols", "set": "rare"}, "shuffle_symbols"]
    items = make_items(30)
    a = [build_prompt(perturb.apply(i, specs, 7)).text for i in items]
    b = [build_prompt(perturb.apply(i, specs, 7)).text for i in reversed(items)][::-1]  # order-free
    c = [build_prompt(perturb.apply(i, specs, 8)).text for i in items]
    assert a == b
    assert a != c


def test_unknown_perturbation_and_bad_params():
    with pytest.raises(ValueError, match="unknown perturbation 'shufle'"):
        perturb.build("shufle")
    with pytest.raises(ValueError, match="bad parameters"):
        perturb.build({"name": "fix_gold", "pos": 1})


def test_fix_gold_position_beyond_option_count_is_flagged():
    it = MCQItem(id="three", subject="s", question="q", choices=("a", "b", "c"), gold=0)
    out = perturb.apply(it, [{"name": "fix_gold", "position": 3}], seed=0)
    assert out.choices == it.choices and "does not exist" in out.meta["conflicts"][0]


def test_options_naming_other_options_pin_everything():
    it = MCQItem(id="ab", subject="s", question="q", choices=("x", "y", "Both A and B", "z"), gold=2)
    for spec in ["shuffle", "derange", {"name": "rotate", "r": 1}, {"name": "fix_gold", "position": 0}]:
        out = perturb.apply(it, [spec], seed=0)
        assert out.choices == it.choices and out.meta["refs_symbols"] and out.meta["conflicts"], spec
