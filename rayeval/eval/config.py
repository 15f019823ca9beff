"""EvalConfig: what to evaluate (models x datasets x settings x scorings), as data.

    cfg = load_eval_config("rayeval/configs/eval_small.yaml")   # or EvalConfig.from_dict(d)

Every problem raises ConfigError naming the field, e.g.
``settings[2].perturbations[0]: unknown perturbation 'shufle'; known: [...]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rayeval.config import ConfigProblems, from_dict, load_yaml, resolve_config
from rayeval.eval import perturb
from rayeval.eval.prompts import Shots, get_template
from rayeval.eval.scoring import Scoring, get_scoring
from rayeval.eval.stats import CORRECTIONS

METRIC_KEYS = ("n_boot", "ci", "pride_fraction", "alpha", "correction")



class ConfigError(ValueError):
    """A config problem naming its field; ``lines``: one per problem when there are several."""

    def __init__(self, msg: str = "", lines: list[str] | None = None):
        self.lines = lines or [msg]
        super().__init__(msg or "\n".join(self.lines))


def _typed(cls, d: Any, where: str):
    """One section's keys and value types (pydantic, :func:`rayeval.config.from_dict`): every
    problem at once, each naming its field (``datasets[0].limit: expected int, got 'ten'``)."""
    try:
        return from_dict(cls, d, where)
    except ConfigProblems as e:
        top = where == "config"   # the file's top level: fields are named as they are ("seed: ...")
        lines = [(p if top else f"{where}{'' if p.startswith('[') else '.'}{p}") + f": {m}" if p else f"{where}: {m}"
                 for p, m in e.items]
        raise ConfigError(lines=lines) from None


@dataclass
class EvalDoc:
    """The top level of an eval YAML as written: its keys and their types (the sections are typed
    where they are parsed: :class:`DatasetSpec`, settings, :class:`Baseline`, protocols)."""

    name: str
    models: list[str]
    datasets: list[dict[str, Any]]
    settings: list[dict[str, Any]]
    scorings: list[Any] | None = None
    seed: int = 0
    batch_size: int = 64
    engine: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    protocols: Any = None
    output_dir: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str                          # "mmlu" | "arc_challenge" (what the loaders know) or any label
    path: str | None = None            # default: <data_root>/<name>
    split: str = "test"
    dev_split: str = "dev"             # where in-context examples come from
    subjects: list[str] | None = None  # None: all subjects
    limit: int | None = None           # items per subject (MMLU) or in total (ARC); None: all
    template: str = "mmlu"             # default prompt template for settings that name none


@dataclass(frozen=True)
class Setting:
    name: str
    perturbations: list[Any] = field(default_factory=list)
    template: str | None = None        # None: the dataset's template
    shots: Shots = field(default_factory=Shots)
    cyclic: float = 0.0                # share of items also evaluated under every cyclic rotation (1.0 = all)
    scorings: list[str] | None = None  # labels of the config's scorings to run here (None: all)
    datasets: list[str] | None = None  # names of the config's datasets this setting applies to (None: all)
    seeds: int = 1                     # run K independent draws of its randomness (see expand_seeds)
    # Render the prompt through each model's chat template: "single" (the whole prompt as one user
    # turn) or "multiturn" (each in-context example a user turn and an assistant answer); None: raw text.
    chat: str | None = None
    models: list[str] | None = None    # names of the config's models this setting applies to (None: all)


SEED_MARK = "@seed"   # replicate j >= 1 of setting "x" is named "x@seed<j>"; replicate 0 keeps "x"


def base_setting(name: str) -> str:
    """The setting a seed replicate was expanded from ("shuffle@seed2" -> "shuffle")."""
    return name.split(SEED_MARK)[0]


def expand_seeds(s: Setting, where: str) -> list[Setting]:
    """A setting with ``seeds: K`` as K settings: itself (replicate 0, the same draws as without
    seeds) and "<name>@seed<j>" for j = 1..K-1, whose random perturbations and sampled in-context
    examples draw with replicate j.  A setting with nothing random cannot take seeds > 1."""
    if s.seeds == 1:
        return [s]
    random_specs = [i for i, p in enumerate(s.perturbations) if perturb.build(p).name in perturb.RANDOM]
    if not random_specs and not s.shots.sampled:
        raise ConfigError(f"{where}.seeds: setting {s.name!r} has nothing random to repeat (random perturbations: "
                          f"{sorted(perturb.RANDOM)}; sampled shots: source ood/trivial/self_incorrect)")
    out = [replace(s, seeds=1)]
    for j in range(1, s.seeds):
        specs = [dict(perturb.build(p).spec, seed=j) if i in random_specs else p for i, p in enumerate(s.perturbations)]
        shots = replace(s.shots, seed=j) if s.shots.sampled else s.shots
        out.append(replace(s, name=f"{s.name}{SEED_MARK}{j}", perturbations=specs, shots=shots, seeds=1))
    return out


@dataclass(frozen=True)
class Baseline:
    setting: str = "baseline"
    scoring: str = "symbol"
    # per-dataset overrides, e.g. {arc_challenge: {scoring: cloze}} (the paper's ARC baseline)
    datasets: dict[str, dict[str, str]] = field(default_factory=dict)

    def pairs(self) -> "tuple[str, str] | dict[str, tuple[str, str]]":
        if not self.datasets:
            return (self.setting, self.scoring)
        out = {"*": (self.setting, self.scoring)}
        for ds, o in self.datasets.items():
            out[ds] = (o.get("setting", self.setting), o.get("scoring", self.scoring))
        return out


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol inside a grid: its reference setting and scoring, and the perturbed
    settings (run with the same scoring) whose rankings measure its stability."""

    baseline: str
    scoring: str
    settings: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "scoring": self.scoring, "settings": list(self.settings)}


@dataclass(frozen=True)
class EvalConfig:
    name: str
    models: list[str]
    datasets: list[DatasetSpec]
    settings: list[Setting]
    scorings: list[Scoring] = field(default_factory=lambda: [Scoring("symbol")])
    seed: int = 0
    batch_size: int = 64
    engine: dict[str, Any] = field(default_factory=dict)
    baseline: Baseline = field(default_factory=Baseline)
    metrics: dict[str, Any] = field(default_factory=dict)   # METRIC_KEYS
    protocols: dict[str, Protocol] = field(default_factory=dict)  # e.g. standard vs robust, compared in the report
    output_dir: str = "runs/{name}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalConfig":
        return parse_config(d)

    def report_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for metrics.compute_all / report.write_report from this config."""
        frac = self.metrics.get("pride_fraction")
        if frac is None:
            frac = next((s.cyclic for s in self.settings if s.name == self.baseline.setting and s.cyclic > 0), 0.05)
        kw = {"baseline": self.baseline.pairs(), "n_boot": int(self.metrics.get("n_boot", 1000)),
              "ci": float(self.metrics.get("ci", 0.95)), "seed": self.seed, "pride_fraction": float(frac)}
        # significance level and multiple-testing control of the paired tests (compute_all's defaults otherwise)
        kw.update({k: self.metrics[k] for k in ("alpha", "correction") if k in self.metrics})
        if self.protocols:
            kw["protocols"] = {n: p.as_dict() for n, p in self.protocols.items()}
        return kw

    def setting(self, name: str) -> Setting:
        for s in self.settings:
            if s.name == name:
                return s
        raise KeyError(name)


def _list(d: dict, key: str, where: str, required: bool = True) -> list:
    v = d.get(key)
    if v is None and not required:
        return []
    if not isinstance(v, list) or (required and not v):
        raise ConfigError(f"{where}{key}: expected a non-empty list, got {v!r}")
    return v


def _int(v: Any, where: str, lo: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
        raise ConfigError(f"{where}: expected an integer{f' >= {lo}' if lo is not None else ''}, got {v!r}")
    return v


CHAT_MODES = ("single", "multiturn")


def _chat_mode(v: Any, where: str) -> str | None:
    """``chat: false | true | single | multiturn`` (true = multiturn, lm-eval's fewshot_as_multiturn)."""
    if v is None or v is False:
        return None
    if v is True:
        return "multiturn"
    if v not in CHAT_MODES:
        raise ConfigError(f"{where}.chat: expected false, true or one of {list(CHAT_MODES)}, got {v!r}")
    return v


def parse_setting(d: Any, where: str) -> Setting:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    d = dict(d)
    try:  # the shorthands: shots: 5, chat: true, cyclic: true
        d["shots"] = Shots.parse(d.get("shots"))
    except ValueError as e:
        raise ConfigError(f"{where}.{e}" if str(e).startswith("shots") else f"{where}.shots: {e}") from None
    if "chat" in d:
        d["chat"] = _chat_mode(d["chat"], where)
    if d.get("cyclic") is True:
        d["cyclic"] = 1.0
    if "perturbations" in d and d["perturbations"] is None:
        d["perturbations"] = []
    st = _typed(Setting, d, where)
    if not st.name:
        raise ConfigError(f"{where}.name: required, a non-empty string")
    for j, spec in enumerate(st.perturbations):
        try:
            perturb.build(spec)
        except ValueError as e:
            raise ConfigError(f"{where}.perturbations[{j}]: {e}") from None
    if st.template is not None:
        try:
            get_template(st.template)
        except ValueError as e:
            raise ConfigError(f"{where}.template: {e}") from None
    if not 0 <= st.cyclic <= 1:
        raise ConfigError(f"{where}.cyclic: expected a share in [0, 1] (or true), got {st.cyclic!r}")
    for key in ("scorings", "datasets", "models"):
        if getattr(st, key) is not None and not getattr(st, key):
            raise ConfigError(f"{where}.{key}: expected a non-empty list of names or null, got []")
    if SEED_MARK in st.name:
        raise ConfigError(f"{where}.name: {st.name!r} contains {SEED_MARK!r}, which names seed replicates")
    _int(st.seeds, f"{where}.seeds", 1)
    return st


def parse_config(d: dict[str, Any]) -> EvalConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"config: expected a mapping, got {type(d).__name__}")
    _typed(EvalDoc, d, "config")
    d = dict(d)
    if not d["name"]:
        raise ConfigError("name: required, a non-empty string")
    models = _list(d, "models", "")
    for i, m in enumerate(models):
        if not isinstance(m, str) or not m:
            raise ConfigError(f"models[{i}]: expected a model name, got {m!r}")
    if len(set(models)) != len(models):
        raise ConfigError(f"models: duplicate names in {models}")
    datasets = []
    for i, ds in enumerate(_list(d, "datasets", "")):
        where = f"datasets[{i}]"
        spec = _typed(DatasetSpec, ds, where)
        if not spec.name:
            raise ConfigError(f"{where}.name: required, a non-empty string")
        if spec.limit is not None:
            _int(spec.limit, f"{where}.limit", 1)
        check_dataset_subjects(ds, where)
        try:
            get_template(spec.template)
        except ValueError as e:
            raise ConfigError(f"{where}.template: {e}") from None
        datasets.append(spec)
    parsed = [parse_setting(s, f"settings[{i}]") for i, s in enumerate(_list(d, "settings", ""))]
    names = [s.name for s in parsed]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"settings: duplicate setting name(s) {dup}")
    scorings = []
    for i, s in enumerate(d.get("scorings") or ["symbol"]):
        try:
            scorings.append(get_scoring(s))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"scorings[{i}]: {e}") from None
    labels = [s.label for s in scorings]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"scorings: duplicate scoring(s) {labels}")
    ds_names = [ds.name for ds in datasets]
    for i, st in enumerate(parsed):
        for key, known in (("scorings", labels), ("datasets", ds_names), ("models", models)):
            bad = [x for x in (getattr(st, key) or []) if x not in known]
            if bad:
                raise ConfigError(f"settings[{i}].{key}: {bad} not among the config's {key} {known}")
    for i, st in enumerate(parsed):
        if st.chat:
            check_chat_models(st, models, f"settings[{i}]")
    settings = [x for i, st in enumerate(parsed) for x in expand_seeds(st, f"settings[{i}]")]
    names = [s.name for s in settings]
    seed = _int(d.get("seed", 0), "seed")
    batch_size = _int(d.get("batch_size", 64), "batch_size", 1)
    engine = d.get("engine") or {}
    if not isinstance(engine, dict):
        raise ConfigError(f"engine: expected a mapping of engine options, got {engine!r}")
    b = _typed(Baseline, d.get("baseline") or {}, "baseline")
    checks = [("baseline", b.setting, b.scoring)]
    for ds, o in b.datasets.items():
        where = f"baseline.datasets.{ds}"
        if ds not in ds_names:
            raise ConfigError(f"{where}: {ds!r} is not one of the datasets {ds_names}")
        if set(o) - {"setting", "scoring"}:
            raise ConfigError(f"{where}: expected a mapping with setting and/or scoring, got {o!r}")
        checks.append((where, o.get("setting", b.setting), o.get("scoring", b.scoring)))
    for where, st, sc in checks:
        if st not in names:
            raise ConfigError(f"{where}.setting: {st!r} is not one of the settings {names}")
        if sc not in labels:
            raise ConfigError(f"{where}.scoring: {sc!r} is not one of the scorings {labels}")
    metrics = d.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise ConfigError(f"metrics: expected a mapping, got {metrics!r}")
    unknown = sorted(set(metrics) - set(METRIC_KEYS))
    if unknown:
        raise ConfigError(f"metrics: unknown key(s) {unknown}; expected some of {sorted(METRIC_KEYS)}")
    if "correction" in metrics and metrics["correction"] not in CORRECTIONS:
        raise ConfigError(f"metrics.correction: {metrics['correction']!r} is not one of {CORRECTIONS}")
    if "alpha" in metrics and not (isinstance(metrics["alpha"], (int, float)) and 0 < metrics["alpha"] < 1):
        raise ConfigError(f"metrics.alpha: expected a number in (0, 1), got {metrics['alpha']!r}")
    protocols = parse_protocols(d.get("protocols"), settings, labels)
    return EvalConfig(name=d["name"], models=list(models), datasets=datasets, settings=settings, scorings=scorings,
                      seed=seed, batch_size=batch_size, engine=dict(engine), baseline=b, metrics=dict(metrics),
                      protocols=protocols, output_dir=str(d.get("output_dir") or "runs/{name}"))


def dataset_path(ds: dict[str, Any]) -> Path:
    """Where a ``datasets:`` entry's files are: its ``path``, else ``<data_root>/<name>``."""
    from rayeval.config import data_root

    return Path(ds["path"]).expanduser() if ds.get("path") else data_root() / ds["name"]


def check_dataset_subjects(ds: dict[str, Any], where: str) -> None:
    """Subjects an MMLU folder on this machine lacks are an error listing the valid ones (the
    loader's filter would drop them silently); other formats, or data not here, are not checked."""
    from rayeval.data.loaders import check_subjects

    try:
        check_subjects(dataset_path(ds), ds.get("subjects"))
    except ValueError as e:
        raise ConfigError(f"{where}.subjects: {e}") from None


def check_chat_models(st: Setting, models: list[str], where: str) -> None:
    """A chat setting needs a chat template in every model it applies to: a base model (or a
    folder whose tokenizer has none) is a config error here, not a silent skip or an actor crash."""
    from rayeval.models import chat_template_status

    for m in st.models or models:
        ok, why = chat_template_status(m)
        if ok is False:
            others = [x for x in (st.models or models) if x != m]
            hint = f"; limit the setting to chat models with models: {others}" if others else ""
            raise ConfigError(f"{where}.chat: model {m!r} has no chat template ({why}){hint}")


def parse_protocols(d: Any, settings: list[Setting], labels: list[str]) -> dict[str, Protocol]:
    """protocols: {name: {baseline: SETTING, scoring: LABEL, settings: [SETTING, ...]}}; every
    setting named must exist and run the protocol's scoring."""
    if d is None:
        return {}
    if not isinstance(d, dict) or not d:
        raise ConfigError(f"protocols: expected a mapping {{name: {{baseline, scoring, settings}}}}, got {d!r}")
    by_name = {s.name: s for s in settings}
    out = {}
    for name, p in d.items():
        where = f"protocols.{name}"
        p = _typed(Protocol, p, where)
        if p.scoring not in labels:
            raise ConfigError(f"{where}.scoring: {p.scoring!r} is not one of the scorings {labels}")
        if not p.settings:
            raise ConfigError(f"{where}.settings: expected a non-empty list of setting names, got []")
        for key, st in [("baseline", p.baseline)] + [(f"settings[{j}]", x) for j, x in enumerate(p.settings)]:
            if st not in by_name:
                raise ConfigError(f"{where}.{key}: {st!r} is not one of the settings {list(by_name)}")
            runs = by_name[st].scorings
            if runs is not None and p.scoring not in runs:
                raise ConfigError(f"{where}.{key}: setting {st!r} does not run scoring {p.scoring!r} (it runs {runs})")
        out[str(name)] = p
    return out


def load_eval_config(path: str | Path) -> EvalConfig:
    """Load a config by path, or by the name of a packaged one ("eval_small")."""
    p = resolve_config(path)
    try:
        return parse_config(load_yaml(p))
    except ConfigError as e:
        raise ConfigError(lines=[f"{p}: {ln}" for ln in e.lines]) from None
