"""Prompts: an item (already perturbed) + a template + in-context examples -> a Prompt record.

Templates are data (rayeval/configs/prompts.yaml).  A prompt always ends with the answer cue
("Answer:"); ``text`` shows the options with their symbols (symbol and hybrid scoring),
``cloze_text`` shows the question only (cloze scoring), with examples in the matching style.

In-context examples (``Shots``):
  source "dev"            k examples from the dev split of the item's subject (MMLU standard)
  source "ood"            k dev examples from other subjects (seeded per item)
  source "trivial"        k trivially easy questions (format only) from prompts.yaml
  source "self_correct"   the target question itself, answered correctly, as the one example
  source "self_incorrect" the same with a wrong answer (seeded per item)
  fixed_position: p       every example's answer is moved to position p (paper section 5)
  balanced: true          example answers moved to cycle through the positions (0, 1, 2, 3, 0, ...):
                          mixed positions, no position for the model to copy
  seed: j                 replicate j of the sampled sources (ood, trivial, self_incorrect); 0 = default

Chat (``chat`` of a setting): the same prompt as chat turns, rendered later by each model's own
chat template in the engine layer (the only place text becomes token ids), as lm-eval's
``--apply_chat_template`` does:
  "single"     one user turn holding the whole prompt (header, examples, question, answer cue)
  "multiturn"  the header and first example as the first user turn, each example's answer an
               assistant turn, the question the last user turn (lm-eval's fewshot_as_multiturn)
The scored continuation (" A", " <option>") follows the assistant generation prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from rayeval.config import CONFIG_DIR, ConfigProblems, from_dict, load_yaml
from rayeval.data.schema import MCQItem
from rayeval.eval import perturb

SHOT_SOURCES = ("dev", "ood", "trivial", "self_correct", "self_incorrect")


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    instruction: str = "The following are multiple choice questions (with answers) about {subject}.\n\n"
    question: str = "{question}\n"
    option: str = "{symbol}. {text}\n"
    answer: str = "Answer:"
    example_answer: str = " {symbol}\n\n"
    cloze_example_answer: str = " {text}\n\n"
    symbols: Any = "letters"


@dataclass(frozen=True)
class Shots:
    k: int = 0
    source: str = "dev"
    fixed_position: int | None = None
    balanced: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in SHOT_SOURCES:
            raise ValueError(f"shots.source: {self.source!r} is not one of {SHOT_SOURCES}")
        if not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"shots.k: must be a non-negative integer, got {self.k!r}")
        if self.fixed_position is not None and not isinstance(self.fixed_position, int):
            raise ValueError(f"shots.fixed_position: must be an integer position or null, got {self.fixed_position!r}")
        if not isinstance(self.balanced, bool):
            raise ValueError(f"shots.balanced: must be true or false, got {self.balanced!r}")
        if self.balanced and self.fixed_position is not None:
            raise ValueError("shots.balanced: cannot be combined with fixed_position")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"shots.seed: must be an integer >= 0, got {self.seed!r}")

    @property
    def sampled(self) -> bool:
        """Whether the examples are drawn at random (so another seed gives other examples)."""
        return self.source == "self_incorrect" or (self.k > 0 and self.source in ("ood", "trivial"))

    @classmethod
    def parse(cls, d: "Shots | dict | int | None") -> "Shots":
        if d is None:
            return cls()
        if isinstance(d, Shots):
            return d
        if isinstance(d, int):
            return cls(k=d)
        try:
            return from_dict(cls, dict(d), "shots")
        except ConfigProblems as e:  # "shots.k: expected int, got 'x'", "shots.source: ...", "unknown key(s) ..."
            raise ValueError("; ".join(f"shots.{p}: {m}" if p else m for p, m in e.items)) from None


@dataclass(frozen=True)
class Prompt:
    item_id: str
    subject: str
    text: str                      # options shown, ends with the answer cue
    cloze_text: str                # options hidden, ends with the answer cue
    symbols: tuple[str, ...]       # symbol shown at each position
    options: tuple[str, ...]       # option texts in displayed order
    gold: int                      # gold position in displayed order
    applied: dict[str, Any] = field(default_factory=dict, compare=False)  # template, shots, perturbation meta
    # chat settings: the prompt as (role, content) turns, options shown / hidden; () for raw text
    messages: tuple[tuple[str, str], ...] = ()
    cloze_messages: tuple[tuple[str, str], ...] = ()


# ----------------------------------------------------------------------------- loading

@lru_cache(maxsize=8)
def _load(path: str) -> dict[str, Any]:
    return load_yaml(path)


@lru_cache(maxsize=8)
def _templates(path: str) -> dict[str, PromptTemplate]:
    doc = _load(path)
    return {name: from_dict(PromptTemplate, {"name": name, **d}, f"templates.{name}")
            for name, d in (doc.get("templates") or {}).items()}


def load_templates(path: str | Path | None = None) -> dict[str, PromptTemplate]:
    return dict(_templates(str(path or CONFIG_DIR / "prompts.yaml")))


def get_template(t: str | PromptTemplate | dict, path: str | Path | None = None) -> PromptTemplate:
    if isinstance(t, PromptTemplate):
        return t
    if isinstance(t, dict):
        return from_dict(PromptTemplate, {"name": "inline", **t}, "template")
    templates = _templates(str(path or CONFIG_DIR / "prompts.yaml"))
    if t not in templates:
        raise ValueError(f"unknown prompt template {t!r}; known: {sorted(templates)}")
    return templates[t]


def trivial_examples(path: str | Path | None = None) -> list[MCQItem]:
    return list(_trivial(str(path or CONFIG_DIR / "prompts.yaml")))


@lru_cache(maxsize=8)
def _trivial(path: str) -> tuple[MCQItem, ...]:
    doc = _load(path)
    return tuple(MCQItem(id=f"trivial-{i}", subject="trivial", question=d["question"], choices=tuple(d["choices"]),
                    gold=int(d["gold"])) for i, d in enumerate(doc.get("trivial_examples") or []))


# ----------------------------------------------------------------------------- formatting

def subject_name(subject: str) -> str:
    return subject.replace("_", " ").strip()


def item_symbols(item: MCQItem, template: PromptTemplate) -> tuple[str, ...]:
    syms = item.meta.get("symbols")
    return tuple(syms) if syms else perturb.symbols_for(template.symbols, item.n_choices)


def format_question(item: MCQItem, symbols: Sequence[str], t: PromptTemplate, show_options: bool = True) -> str:
    s = t.question.format(question=item.question.strip())
    if show_options:
        s += "".join(t.option.format(symbol=sym, text=str(c).strip()) for sym, c in zip(symbols, item.choices))
    return s + t.answer


def example_parts(item: MCQItem, answer: int, symbols: Sequence[str], t: PromptTemplate,
                  show_options: bool) -> tuple[str, str]:
    """An in-context example as (question with answer cue, answer text)."""
    fmt = t.example_answer if show_options else t.cloze_example_answer
    return (format_question(item, symbols, t, show_options),
            fmt.format(symbol=symbols[answer], text=str(item.choices[answer]).strip()))


def select_examples(item: MCQItem, shots: Shots, dev_items: Sequence[MCQItem], seed: int) -> list[tuple[MCQItem, int]]:
    """The in-context examples as (item, answer index shown) pairs."""
    if shots.source in ("self_correct", "self_incorrect"):
        if shots.source == "self_correct":
            return [(item, item.gold)]
        rng = perturb.item_rng(seed, item.id, "shots.self_incorrect", replicate=shots.seed)
        wrong = [i for i in range(item.n_choices) if i != item.gold]
        return [(item, int(rng.choice(wrong)))]
    if shots.k == 0:
        return []
    if shots.source == "dev":
        pool = [d for d in dev_items if d.subject == item.subject and d.id != item.id]
        chosen = pool[: shots.k]  # MMLU standard: the first k dev items of the subject, in file order
    else:
        if shots.source == "ood":
            pool = [d for d in dev_items if d.subject != item.subject]
        else:
            pool = trivial_examples()
        rng = perturb.item_rng(seed, item.id, f"shots.{shots.source}", replicate=shots.seed)
        idx = rng.choice(len(pool), size=min(shots.k, len(pool)), replace=False) if pool else []
        chosen = [pool[int(i)] for i in idx]
    if shots.k and len(chosen) < shots.k and shots.source != "trivial":
        # Too few examples is a data problem worth seeing, not silently papering over.
        raise ValueError(f"shots: item {item.id!r} needs {shots.k} {shots.source} examples, found {len(chosen)}")
    out = []
    for i, ex in enumerate(chosen):
        pos = i % ex.n_choices if shots.balanced else shots.fixed_position
        if pos is not None:
            ex = perturb.build({"name": "fix_gold", "position": pos, "keep_special": False})(ex, None)
        out.append((ex, ex.gold))
    return out


CHAT_MODES = ("single", "multiturn")


def chat_turns(head: str, examples: Sequence[tuple[str, str]], question: str, mode: str) -> tuple[tuple[str, str], ...]:
    """The prompt as chat turns: ``examples`` are (question text, answer text) pairs."""
    if mode == "single":
        return (("user", head + "".join(q + a for q, a in examples) + question),)
    if mode != "multiturn":
        raise ValueError(f"chat: {mode!r} is not one of {CHAT_MODES}")
    turns: list[tuple[str, str]] = []
    for i, (q, a) in enumerate(examples):
        turns += [("user", (head if i == 0 else "") + q), ("assistant", a.strip())]
    turns.append(("user", (head if not examples else "") + question))
    return tuple(turns)


def build_prompt(item: MCQItem, template: str | PromptTemplate = "mmlu", shots: Shots | dict | int | None = None,
                 dev_items: Sequence[MCQItem] = (), seed: int = 0, chat: str | None = None) -> Prompt:
    """The Prompt for one (perturbed) item.  Pure: same inputs, same text.  ``chat`` ("single" or
    "multiturn") also gives the prompt as chat turns (``messages``, ``cloze_messages``)."""
    t = get_template(template)
    shots = Shots.parse(shots)
    item = perturb.init_meta(item)
    syms = item_symbols(item, t)
    examples = select_examples(item, shots, dev_items, seed)
    head = t.instruction.format(subject=subject_name(item.subject), k=len(examples))
    shown, hidden = [], []  # (question, answer) of each example, options shown / hidden
    for ex, ans in examples:
        ex_syms = syms if ex.n_choices == len(syms) else perturb.symbols_for(t.symbols, ex.n_choices)
        shown.append(example_parts(ex, ans, ex_syms, t, True))
        hidden.append(example_parts(ex, ans, ex_syms, t, False))
    q_shown, q_hidden = format_question(item, syms, t, True), format_question(item, syms, t, False)
    parts = [head, *(q + a for q, a in shown), q_shown]
    cloze_parts = [head, *(q + a for q, a in hidden), q_hidden]
    applied = {
        "template": t.name,
        "shots": {"k": shots.k, "source": shots.source, "fixed_position": shots.fixed_position,
                  "balanced": shots.balanced, "seed": shots.seed},
        "example_ids": [ex.id for ex, _ in examples],
        "example_answers": [a for _, a in examples],
        "perm": list(item.meta["perm"]),
        "orig_gold": item.meta["orig_gold"],
        "perturbations": item.meta["applied"],
        "conflicts": list(item.meta["conflicts"]),
        "pinned": list(item.meta["pinned"]),
        "refs_symbols": bool(item.meta["refs_symbols"]),
        "chat": chat,
    }
    messages = chat_turns(head, shown, q_shown, chat) if chat else ()
    cloze_messages = chat_turns(head, hidden, q_hidden, chat) if chat else ()
    return Prompt(item_id=item.id, subject=item.subject, text="".join(parts), cloze_text="".join(cloze_parts),
                  symbols=tuple(syms), options=tuple(str(c).strip() for c in item.choices), gold=item.gold,
                  applied=applied, messages=messages, cloze_messages=cloze_messages)
