"""Validate before running: everything a command will need, resolved in seconds, without Ray.

    rayeval check eval_small                  # a YAML path or packaged name; --kind when it cannot be told
    from rayeval.check import check
    check("pipeline_small").problems          # one line per problem: "<file>: <field>: <what>"

One function per config kind (:func:`check_eval`, :func:`check_pipeline`, :func:`check_tune`,
:func:`check_serve`, :func:`check_judge`, :func:`check_generate`); ``rayeval eval``, ``pipeline``
and ``tune`` call theirs before Ray starts.  They reuse each config's own parser (its messages
name the field) and add what the parsers leave to run time: types of the dataclass configs, models
(registry name, existing folder, or org/name hub id), datasets, splits and subjects, data
sources, routers and their constructor parameters, engine options per engine kind (vLLM's are read
from its source, not imported), prompt lengths (``rayeval.eval.plan``, the models' tokenizers
only) and Serve app args.  Nothing here starts Ray or loads model weights.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayeval.config import ConfigProblems, from_dict, type_problem

KINDS = ("eval", "pipeline", "tune", "serve", "judge", "generate")
ROUTELLM_BENCHES = ("mmlu", "gsm8k", "mt_bench")
MAX_TOO_LONG = 20  # prompt-length problems listed per model (then a count)
# A grid of more items than this has only its longest items (question + options, in characters)
# of each subject planned here: seconds, not the minutes the paper's full-MMLU grid takes to expand.
MAX_ITEMS, LONGEST_PER_SUBJECT = 600, 2


@dataclass
class Checked:
    """What a check found: one line per problem naming the file and the field, notes on what
    could not be checked here, and what was resolved (the ``ok`` summary)."""

    kind: str
    path: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    resolved: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, where: str, msg: Any) -> None:
        """Record ``<file>: <where>: <msg>`` (messages of parsers that already name the file keep it);
        a parser's error with several ``lines`` is one problem per line."""
        if len(getattr(msg, "lines", None) or ()) > 1:
            for ln in msg.lines:
                self.problem(where, ln)
            return
        line = " ".join(str(msg).split("\n"))
        line = f"{where}: {line}" if where else line
        if not line.startswith(self.path):
            line = f"{self.path}: {line}"
        if line not in self.problems:
            self.problems.append(line)

    def merge(self, other: "Checked") -> "Checked":
        self.problems += [p for p in other.problems if p not in self.problems]
        self.notes += other.notes
        self.resolved += [f"{other.kind} {other.path}: {r}" for r in other.resolved]
        return self

    def summary(self) -> str:
        return f"ok: {self.kind} config {self.path}" + (f" ({'; '.join(self.resolved)})" if self.resolved else "")


def fail_on_problems(res: Checked) -> None:
    """For the commands: print every problem (stderr, one line each) and exit 2; notes go to stderr too."""
    import typer

    for n in res.notes:
        typer.echo(f"note: {n}", err=True)
    if res.problems:
        for p in res.problems:
            typer.echo(p, err=True)
        typer.echo(f"{len(res.problems)} problem(s) in {res.path}; nothing was started", err=True)
        raise typer.Exit(2)


# ----------------------------------------------------------------------------- shared checks

def model_problem(name: Any) -> str | None:
    """None when ``name`` is a registry model, an existing folder or an org/name hub id."""
    from rayeval.models import get_spec

    if not isinstance(name, str) or not name:
        return f"expected a model name, got {name!r}"
    try:
        spec = get_spec(name)
    except KeyError as e:
        return str(e.args[0])
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") != 1
    if spec.kind == "hf" and looks_local and not Path(name).expanduser().is_dir():
        return f"no model folder {name!r} (and not a hub id of the form org/name)"
    return None


def embedder_problem(name: Any) -> str | None:
    """An embedder is a model name, with ``-static`` for its static featurizer."""
    from rayeval.route.embed import STATIC_SUFFIX

    base = name[: -len(STATIC_SUFFIX)] if isinstance(name, str) and name.endswith(STATIC_SUFFIX) else name
    return model_problem(base)


def check_models(res: Checked, names: Any, where: str) -> list[str]:
    """Problems for each unknown model of a list; returns the names that resolve."""
    if not isinstance(names, list):
        return []
    good = []
    for i, m in enumerate(names):
        why = model_problem(m)
        if why:
            res.problem(f"{where}[{i}]", why)
        else:
            good.append(m)
            if "/" in m and not Path(m).expanduser().is_dir():
                res.notes.append(f"{where}[{i}]: {m!r} is a hub id, fetched when an engine loads it")
    return good


def source_problem(source: Any, prompts: bool = False) -> str | None:
    """None when a data source resolves here: ``routellm:<bench>``, ``routerbench:<task>[:split]``,
    ``battles:<jsonl>``, ``eval:<parquet or run dir>``, a parquet file; with ``prompts``, also
    ``mt_bench`` and any file (``rayeval augment generate``'s prompt sources)."""
    from rayeval.config import data_root

    from rayeval.prefs.sources import parse_source

    if not isinstance(source, str) or not source:
        return f"expected a data source, got {source!r}"
    if prompts and source == "mt_bench":
        return None if (data_root() / "routellm_evals" / "mt_bench" / "question.jsonl").exists() else \
            f"{source!r}: MT-Bench questions not found under {data_root()}"
    try:
        s = parse_source(source)
    except ValueError as e:
        if not prompts:  # prompt sources may be any file
            return str(e)
        s = None
    if s is None:
        need = Path(source).expanduser()
    elif s.kind == "routellm":
        bench = s.name.lower().replace("-", "_")
        if bench not in ROUTELLM_BENCHES:
            return f"unknown RouteLLM benchmark {s.name!r} in {source!r}; known: {list(ROUTELLM_BENCHES)}"
        need = data_root() / "routellm_evals" / bench
    elif s.kind == "routerbench":
        need = data_root() / "routerbench_zs" / f"{s.name}_{s.split}.csv"
    else:
        need = s.path
    return None if need.exists() else f"{source!r}: {need} not found"


def router_problems(name: Any, params: Any, at_name: str, at_params: str) -> list[str]:
    """An unknown router, a parameter its constructor does not take, or a value of the wrong type
    (constructors only store their arguments: building one here is free)."""
    from rayeval.route.routers import ROUTERS, make_router

    if name not in ROUTERS:
        return [f"{at_name}: unknown router {name!r}; known: {sorted(ROUTERS)}"]
    params = {} if params is None else params
    if not isinstance(params, dict):
        return [f"{at_params}: expected a mapping of {name} parameters, got {params!r}"]
    cls = ROUTERS[name]
    bad = sorted(set(params) - set(cls.param_names()))
    if bad:
        return [f"{at_params}: {name} has no parameter(s) {bad}; it takes {cls.param_names()}"]
    try:
        hints = typing.get_type_hints(cls.__init__)
    except (NameError, TypeError):
        hints = {}
    out = [f"{at_params}.{k}: {why}" for k, v in params.items() if k in hints and (why := type_problem(v, hints[k]))]
    if out:
        return out
    try:
        r = make_router(name, **params)
    except (TypeError, ValueError) as e:
        return [f"{at_params}: {e}"]
    if "embedder" in params and embedder_problem(params["embedder"]):
        out.append(f"{at_params}.embedder: {embedder_problem(params['embedder'])}")
    for j, m in enumerate(getattr(r, "members", None) or []):  # blend: each member is a router spec
        at = f"{at_params}.members[{j}]"
        out += router_problems(m.get("name"), m.get("params"), f"{at}.name", f"{at}.params") if isinstance(m, dict) \
            else [f"{at}: expected {{name, params}}, got {m!r}"]
    return out


@functools.lru_cache(maxsize=None)
def vllm_options() -> frozenset[str] | None:
    """Keyword arguments ``vllm.LLM`` / ``AsyncEngineArgs`` take, read from vLLM's source with
    ``ast`` (importing vLLM takes 15 s here); None when vLLM is not installed."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    names: set[str] = set()
    for rel, classes in (("engine/arg_utils.py", ("EngineArgs", "AsyncEngineArgs")), ("entrypoints/llm.py", ("LLM",))):
        try:
            tree = ast.parse((root / rel).read_text(encoding="utf-8"))
        except (OSError, SyntaxError):
            return None
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name in classes:
                for b in node.body:
                    if isinstance(b, ast.AnnAssign) and isinstance(b.target, ast.Name):
                        names.add(b.target.id)
                    elif isinstance(b, ast.FunctionDef) and b.name == "__init__":
                        names.update(a.arg for a in b.args.args + b.args.kwonlyargs)
    names.discard("self")
    return frozenset(names) or None


def vllm_option_problems(res: Checked, options: dict, where: str) -> None:
    opts = vllm_options()
    if opts is None:
        res.notes.append(f"{where}: vLLM is not installed here; its options are not checked")
        return
    bad = sorted(set(options) - opts)
    if bad:
        res.problem(where, f"option(s) {bad} are not vLLM engine arguments (vllm.LLM / EngineArgs)")


def check_engine(res: Checked, engine: Any, where: str = "engine"):
    """The ``engine:`` section as the run resolves it on this host (``Execution.from_engine_dict``:
    the kind, options per kind); the Execution, or None after a problem."""
    from rayeval.runtime import Execution

    if not isinstance(engine, dict):
        res.problem(where, f"expected a mapping of engine options, got {engine!r}")
        return None
    try:
        ex = Execution.from_engine_dict(engine)
    except ConfigProblems as e:
        for path, msg in e.items:
            res.problem(f"{where}.{path}" if path else where, msg)
        return None
    except ValueError as e:
        res.problem("", re.sub(r"^engine\b", where, str(e)))
        return None
    if ex.kind == "vllm":
        vllm_option_problems(res, ex.engine_kwargs, where)
    return ex


def _open(config: Any, kind: str, default: str | None = None) -> tuple[Checked, dict | None]:
    """The config's file (a path, a packaged name, or a path under the repo) and its YAML mapping."""
    from rayeval.config import REPO_ROOT, load_yaml
    from rayeval.config import resolve_config

    name = str(config if config is not None else default)
    p = Path(name)
    if not p.exists() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p
    try:
        p = resolve_config(p if p.exists() else name)
    except FileNotFoundError:
        res = Checked(kind, name)
        res.problem("", f"No such file or directory, nor a packaged config named {Path(name).stem!r}")
        return res, None
    res = Checked(kind, str(p))
    try:
        return res, load_yaml(p)
    except ValueError as e:
        res.problem("", str(e))
        return res, None


def _drop(doc: Any, loc: tuple) -> Any:
    """``doc`` without the key at ``loc`` (a copy along the way)."""
    if not loc or not isinstance(doc, (dict, list)):
        return doc
    head, rest = loc[0], loc[1:]
    if isinstance(doc, dict):
        if not rest:
            return {k: v for k, v in doc.items() if k != head}
        return {k: (_drop(v, rest) if k == head else v) for k, v in doc.items()}
    return [(_drop(v, rest) if i == head else v) for i, v in enumerate(doc)]


def _parse(res: Checked, doc: dict, build, validate=None, at: str = ""):
    """A dataclass config: ``build`` (its parser, :func:`rayeval.config.from_dict` inside) reports
    unknown keys and wrong types at every level, one problem each; after unknown keys alone the
    rest is parsed without them, so the later checks still run.  Then its own ``validate``.
    Returns (the dataclass, or None when it did not parse; whether it is all valid).  ``at``: the
    field path of ``doc`` in its file."""
    valid = True
    try:
        cfg = build(doc)
    except ConfigProblems as e:
        for path, msg in e.items:
            res.problem(".".join(x for x in (at, path) if x) if not path.startswith("[") else at + path, msg)
        if not e.unknown or any(not m.startswith("unknown key") for _, m in e.items):
            return None, False
        for loc in e.unknown:
            doc = _drop(doc, loc)
        valid = False
        try:
            cfg = build(doc)
        except (ValueError, TypeError) as e2:
            res.problem("", e2)
            return None, False
    except (ValueError, TypeError) as e:
        res.problem("", e)
        return None, False
    try:
        validate and validate(cfg)
    except ValueError as e:
        res.problem(at, e)
        return cfg, False
    except (TypeError, AttributeError, KeyError):  # a wrong type, reported above
        return cfg, False
    return cfg, valid


# ----------------------------------------------------------------------------- eval

def check_eval(config: Any, *, engine: dict | None = None, plan: bool = True) -> Checked:
    """An eval config (``rayeval eval``): its parser per setting and for the rest, models, datasets
    and splits (subjects: the parser), the engine section, then (``plan``) the grid's prompts
    against each model's context, naming item and setting.  ``engine`` overrides keys of the
    config's engine section (``rayeval eval --engine``)."""
    from rayeval.eval.config import ConfigError, EvalConfig, EvalDoc, _typed, parse_config, parse_setting

    res, doc = _open(config, "eval")
    if doc is None:
        return res
    try:
        _typed(EvalDoc, doc, "config")  # the top level's keys and types
    except ConfigError as e:
        res.problem("", e)
    settings = doc.get("settings") if isinstance(doc.get("settings"), list) else []
    for i, s in enumerate(settings):  # every setting, not only the first bad one
        try:
            parse_setting(s, f"settings[{i}]")
        except ConfigError as e:
            res.problem("", e)
    try:
        cfg = parse_config({k: v for k, v in doc.items() if k in {f.name for f in dataclasses.fields(EvalConfig)}})
    except (ValueError, TypeError) as e:
        res.problem("", e)
        cfg = None
    eng = doc.get("engine") or {}
    eng = {**eng, **(engine or {})} if isinstance(eng, dict) else eng
    ex = check_engine(res, eng)
    models = doc.get("models")
    if isinstance(eng, dict) and eng.get("kind") == "fake":  # the fake engine loads nothing: names are labels
        models = [m for m in models or [] if isinstance(m, str)]
    else:
        models = check_models(res, models, "models")
    for i, ds in enumerate(doc.get("datasets") if isinstance(doc.get("datasets"), list) else []):
        if isinstance(ds, dict) and isinstance(ds.get("name"), str):
            check_dataset(res, ds, f"datasets[{i}]")
    if cfg is None or ex is None:
        return res
    res.resolved.append(f"{len(cfg.models)} model(s), {len(cfg.datasets)} dataset(s), {len(cfg.settings)} "
                        f"setting(s), engine {ex.kind}")
    if plan and res.ok:
        check_prompt_lengths(res, cfg, ex, models, settings)
    return res


def check_dataset(res: Checked, ds: dict, where: str) -> None:
    """The dataset's files exist here and hold its split (MMLU and ARC folders)."""
    from rayeval.data.loaders import detect_format, mmlu_layout
    from rayeval.eval.config import ConfigError, check_dataset_subjects, dataset_path

    if str(ds.get("path") or "").startswith("hf://"):
        res.notes.append(f"{where}: hub dataset {ds['path']!r}, fetched when it loads")
        return
    p = dataset_path(ds)
    if not p.exists():
        res.problem(where, f"no data for {ds['name']!r} at {p} (set path:, or $RAYEVAL_DATA)")
        return
    split = ds.get("split", "test")
    layout = mmlu_layout(p)
    splits = layout[1] if layout else sorted(f.stem for f in p.glob("*.jsonl")) \
        if p.is_dir() and detect_format(p) == "arc" else None
    if splits is not None and split not in splits:
        res.problem(f"{where}.split", f"no split {split!r} in {p}; splits: {splits}")
    try:  # the parser's check too, reached here even when another section stopped the parser
        check_dataset_subjects(ds, where)
    except ConfigError as e:
        res.problem("", e)


def check_prompt_lengths(res: Checked, cfg, ex, models: list[str], settings: list) -> None:
    """Every prompt of the grid against each model's context (the engine's ``max_model_len``, else
    the model's own), with its tokenizer only: ``rayeval.eval.plan`` (no weights, no Ray)."""
    from rayeval.data.schema import DataValidationError
    from rayeval.eval.config import base_setting
    from rayeval.eval.pipeline import load_config_items, make_shards
    from rayeval.eval.plan import plan_works
    from rayeval.eval.scoring import expand

    try:
        loaded = load_config_items(cfg)
    except DataValidationError as e:
        for r in e.errors[:MAX_TOO_LONG]:
            res.problem("datasets", r)
        return
    except (ValueError, FileNotFoundError) as e:
        res.problem("datasets", e)
        return
    n_items = sum(len(items) for _, items, _ in loaded)
    if n_items > MAX_ITEMS:
        loaded = [(name, longest_items(items, LONGEST_PER_SUBJECT), dev) for name, items, dev in loaded]
        res.notes.append(f"prompt lengths checked on the {LONGEST_PER_SUBJECT} longest items of each subject, "
                         f"{sum(len(i) for _, i, _ in loaded)} of {n_items} (`rayeval plan` checks them all, and "
                         "`rayeval eval` does before Ray starts)")
    works = [w for name, items, dev in loaded for w in expand(items, dev, cfg, dataset=name)]
    limit = ex.engine_kwargs.get("max_model_len")
    try:
        grid = plan_works(make_shards(works, cfg.batch_size), models, config=cfg.name, engine=ex.kind,
                          context_limit=limit)
    except ValueError as e:  # a request the tokenizer cannot encode (a chat turn without a template)
        res.problem("settings", e)
        return
    index = {s.get("name"): i for i, s in enumerate(settings) if isinstance(s, dict)}
    from rayeval.models import REGISTRY, is_prepared

    for m in grid.models:
        if not m.context_limit:
            why = (f"not prepared (rayeval models prepare {m.model})" if m.model in REGISTRY and not is_prepared(m.model)
                   else "no context length known here (set engine.max_model_len)")
            res.notes.append(f"prompt lengths for {m.model} not checked: {why}")
        for t in m.too_long[:MAX_TOO_LONG]:
            name = re.search(r"\(setting (.+?), scoring", t)
            i = index.get(base_setting(name.group(1))) if name else None
            res.problem(f"settings[{i}]" if i is not None else "settings",
                        f"prompt too long for {m.model}: {t} (engine.max_model_len or the model's context)")
        if len(m.too_long) > MAX_TOO_LONG:
            res.problem("settings", f"{len(m.too_long) - MAX_TOO_LONG} more prompt(s) too long for {m.model}")
    res.resolved.append(f"{grid.works} work units; longest prompt "
                        + ", ".join(f"{m.model} {m.max_len}/{m.context_limit or '?'}" for m in grid.models))


def longest_items(items: list, k: int) -> list:
    """The ``k`` items of each subject with the longest question and options (characters)."""
    by: dict[str, list] = {}
    for it in items:
        by.setdefault(it.subject, []).append(it)
    return [it for g in by.values()
            for it in sorted(g, key=lambda i: len(i.question) + sum(map(len, i.choices)), reverse=True)[:k]]


# ----------------------------------------------------------------------------- pipeline

def check_pipeline(config: Any = None, *, serve: bool | None = None, engine: dict | None = None,
                   plan: bool = True) -> Checked:
    """A pipeline config (``rayeval pipeline``): its keys and values, the router and baselines, the
    eval config it runs (and its gold setting/scoring and pair), the reference data, and the Serve
    config when the run deploys it (``serve``: the command's --serve/--no-serve)."""
    from rayeval.workflow import WorkflowConfig

    res, doc = _open(config, "pipeline", default="pipeline_small")
    if doc is None:
        return res
    cfg, valid = _parse(res, doc, lambda d: from_dict(WorkflowConfig, d, res.path),
                        lambda c: c.validate(res.path))
    if cfg is None:
        return res
    r = cfg.router if isinstance(cfg.router, dict) else {}  # (a wrong type is reported by _parse)
    bad = sorted(set(r) - {"name", "params"})
    if bad:
        res.problem("router", f"unknown key(s) {bad}; expected name, params")
    for p in router_problems(r.get("name"), r.get("params"), "router.name", "router.params") if r else []:
        res.problem("", p)
    for i, b in enumerate(cfg.baselines if isinstance(cfg.baselines, list) else []):
        for p in router_problems(b, {}, f"baselines[{i}]", f"baselines[{i}]"):
            res.problem("", p)
    ref = cfg.reference if isinstance(cfg.reference, dict) else {"when": "never"}
    if ref.get("when", "noise") != "never" and source_problem(ref.get("data", "routellm:mmlu")):
        res.problem("reference.data", source_problem(ref.get("data", "routellm:mmlu")))
    if isinstance(cfg.eval, str):
        ev = check_eval(cfg.eval, engine=engine, plan=plan)
        if not Path(ev.path).is_file():
            res.problem("eval", f"{cfg.eval!r}: no such eval config (a YAML path or a packaged name)")
        else:
            res.merge(ev)
            if valid:
                check_gold(res, cfg, ev.path)
    sv = cfg.serve if isinstance(cfg.serve, dict) else {}
    if sv.get("enabled", True) if serve is None else serve:
        res.merge(check_serve(sv.get("config", "serve_configs/local_cpu.yaml")))
    res.resolved.append(f"router {r.get('name')}, baselines {cfg.baselines}")
    return res


def check_gold(res: Checked, cfg, eval_path: str) -> None:
    """The gold (setting, scoring) per dataset and the pair must exist in the eval config."""
    from rayeval.eval.config import ConfigError, load_eval_config

    try:
        ev = load_eval_config(eval_path)
    except (ConfigError, ValueError):
        return  # reported by check_eval
    settings, labels = {s.name for s in ev.settings}, [s.label for s in ev.scorings]
    ds_names = [d.name for d in ev.datasets]
    for ds, o in [("", cfg.gold)] + [(d, o) for d, o in (cfg.gold.get("datasets") or {}).items()]:
        where = f"gold.datasets.{ds}" if ds else "gold"
        if ds and ds not in ds_names:
            res.problem(where, f"{ds!r} is not a dataset of {eval_path} {ds_names}")
        st, sc = o.get("setting", cfg.gold["setting"]), o.get("scoring", cfg.gold["scoring"])
        if st not in settings:
            res.problem(f"{where}.setting", f"{st!r} is not a setting of {eval_path} {sorted(settings)}")
        if sc not in labels:
            res.problem(f"{where}.scoring", f"{sc!r} is not a scoring of {eval_path} {labels}")
    for i, m in enumerate(cfg.pair or []):
        if m not in ev.models:
            res.problem(f"pair[{i}]", f"{m!r} is not a model of {eval_path} {ev.models}")


# ----------------------------------------------------------------------------- tune

def check_tune(config: Any) -> Checked:
    """A tune config (``rayeval tune``): keys at every level, values' types, its validation, each
    router's fixed parameters (constructed), the data source and the embedders."""
    from rayeval.tune import TuneConfig

    res, doc = _open(config, "tune")
    if doc is None:
        return res
    cfg, _ = _parse(res, doc, lambda d: TuneConfig.parse(d, res.path),
                    lambda c: c.validate(res.path))
    if cfg is None:
        return res
    for i, r in enumerate(cfg.routers):
        for p in router_problems(r.name, r.params, f"routers[{i}].name", f"routers[{i}].params"):
            res.problem("", p)
    why = source_problem(cfg.data.source)
    if why:
        res.problem("data.source", why)
    for i, e in enumerate(cfg.data.embedders if isinstance(cfg.data.embedders, list) else []):
        if embedder_problem(e):
            res.problem(f"data.embedders[{i}]", embedder_problem(e))
    res.resolved.append(f"routers {[r.name for r in cfg.routers]} on {cfg.data.source}")
    return res


# ----------------------------------------------------------------------------- serve

RAYEVAL_APP = "rayeval.serve.app:"
ROUTER_USER_CONFIG = ("routers", "default_router", "thresholds", "strong_model", "weak_model", "default_threshold")


def _loc(loc: Sequence) -> str:
    return "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")


def check_serve(config: Any) -> Checked:
    """A Serve config (``python -m rayeval.serve.deploy``, ``serve run``): Ray Serve's own schema
    (every error), then each rayeval application's args: keys and types, models, LLM entries and
    their vLLM options, routers (a known router, or a trained folder), thresholds, the embedder,
    and the Router deployment's hot ``user_config``."""
    from ray.serve.schema import ServeDeploySchema

    res, doc = _open(config, "serve")
    if doc is None:
        return res
    for loc, bad, known in unknown_schema_keys(ServeDeploySchema, doc):  # Serve itself ignores them
        res.problem(_loc(loc), f"unknown key(s) {bad}; known: {known}")
    try:
        ServeDeploySchema.model_validate(doc)
    except Exception as e:  # pydantic.ValidationError: one problem per error, at its location
        errs = e.errors() if hasattr(e, "errors") else [{"loc": (), "msg": str(e)}]
        for err in errs:
            res.problem(_loc(err["loc"]), err["msg"])
    apps = doc.get("applications") if isinstance(doc.get("applications"), list) else []
    for i, app in enumerate(apps):
        if isinstance(app, dict) and str(app.get("import_path", "")).startswith(RAYEVAL_APP):
            check_app_args(res, app, f"applications[{i}]")
    res.resolved.append(f"{len(apps)} application(s)")
    return res


def unknown_schema_keys(model: Any, value: Any, loc: tuple = ()) -> list[tuple[tuple, list[str], list[str]]]:
    """(location, unknown keys, known keys) of a mapping against a pydantic model and the models
    its fields hold (Ray Serve's schemas ignore unknown keys, so a typo would never take effect)."""
    if not isinstance(value, dict):
        return []
    fields = model.model_fields
    known = sorted(set(fields) | {f.alias for f in fields.values() if f.alias})
    bad = sorted(set(value) - set(known))
    out = [(loc, bad, known)] if bad else []
    for n, f in fields.items():
        sub, v = _model_of(f.annotation), value.get(n)
        if sub is not None and isinstance(v, list):
            out += [x for i, item in enumerate(v) for x in unknown_schema_keys(sub, item, loc + (n, i))]
        elif sub is not None:
            out += unknown_schema_keys(sub, v, loc + (n,))
    return out


def _model_of(tp: Any) -> Any:
    """The pydantic model a field holds (itself, optional, or a list of it); None otherwise."""
    from pydantic import BaseModel

    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    if typing.get_origin(tp) in (list, typing.Union, types.UnionType) and len(args) == 1:
        return _model_of(args[0])
    return None


def check_app_args(res: Checked, app: dict, where: str) -> None:
    import inspect

    from rayeval.serve.app import AppArgs
    from rayeval.serve.routing import Embedder

    args = app.get("args") or {}
    if not isinstance(args, dict):
        res.problem(f"{where}.args", f"expected a mapping, got {args!r}")
        return
    a, valid = _parse(res, args, lambda d: from_dict(AppArgs, d, f"{where}.args"), AppArgs.validate,
                      at=f"{where}.args")
    if not valid:  # the checks below read llms, routers, thresholds and embedder as their types say
        return
    for n, entry in a.llms.items():
        entry = entry or {}
        why = model_problem(entry.get("model") or n)
        if why:
            res.problem(f"{where}.args.llms.{n}.model", why)
        if isinstance(entry.get("engine_kwargs"), dict):
            vllm_option_problems(res, entry["engine_kwargs"], f"{where}.args.llms.{n}.engine_kwargs")
    check_served_routers(res, a.routers, a.thresholds, f"{where}.args")
    if any(d is None for d in a.routers.values()):
        why = source_problem(a.default_router_data)
        if why:
            res.problem(f"{where}.args.default_router_data", why)
    known = set(inspect.signature(Embedder.func_or_class.__init__).parameters) - {"self"}
    bad = sorted(set(a.embedder) - known - {"deployment"})
    if bad:
        res.problem(f"{where}.args.embedder", f"unknown key(s) {bad}; known: {sorted(known | {'deployment'})}")
    elif embedder_problem(a.embedder.get("model", "minilm-l6")):
        res.problem(f"{where}.args.embedder.model", embedder_problem(a.embedder.get("model", "minilm-l6")))
    for j, dep in enumerate(app.get("deployments") or []):
        if isinstance(dep, dict) and dep.get("name") == "Router" and isinstance(dep.get("user_config"), dict):
            uc, at = dep["user_config"], f"{where}.deployments[{j}].user_config"
            bad = sorted(set(uc) - set(ROUTER_USER_CONFIG))
            if bad:
                res.problem(at, f"unknown key(s) {bad}; known: {list(ROUTER_USER_CONFIG)}")
            routers = {**a.routers, **(uc.get("routers") or {})}
            if uc.get("default_router") is not None and uc["default_router"] not in routers:
                res.problem(f"{at}.default_router", f"{uc['default_router']!r} is not among routers {sorted(routers)}")
            check_served_routers(res, uc.get("routers") or {}, uc.get("thresholds") or {}, at)


def check_served_routers(res: Checked, routers: dict, thresholds: dict, where: str) -> None:
    """A served router is a trained folder, or null: a known router (``<router>-static`` for its
    static-featurizer variant) trained at build time; thresholds are in [0, 1]."""
    from rayeval.route.embed import STATIC_SUFFIX
    from rayeval.route.routers import ROUTERS

    for n, d in routers.items():
        if d is None:
            kind = n[: -len(STATIC_SUFFIX)] if n.endswith(STATIC_SUFFIX) else n
            if kind not in ROUTERS:
                res.problem(f"{where}.routers.{n}", f"unknown router {kind!r} (null trains a default one); "
                                                    f"known: {sorted(ROUTERS)}")
        elif not (Path(str(d)).expanduser() / "router.json").exists():
            res.problem(f"{where}.routers.{n}", f"{d} is not a trained router folder (no router.json)")
    for n, t in thresholds.items():
        if type_problem(t, float) or isinstance(t, bool) or not 0 <= float(t) <= 1:
            res.problem(f"{where}.thresholds.{n}", f"expected a threshold in [0, 1], got {t!r}")


# ----------------------------------------------------------------------------- generate / judge

def check_generate(config: Any) -> Checked:
    """``rayeval augment generate``'s config: its parser, types, models, prompt source, engine."""
    from rayeval.prefs.generate import GenerateConfig

    res, doc = _open(config, "generate")
    if doc is None:
        return res
    doc = {k: v for k, v in doc.items() if k != "judge"}
    cfg, valid = _parse(res, doc, lambda d: GenerateConfig.from_dict(d, res.path))
    if not valid:
        return res
    check_models(res, cfg.models, "models")
    why = source_problem(cfg.prompts.source, prompts=True)
    if why:
        res.problem("prompts.source", why)
    check_engine(res, cfg.engine)
    res.resolved.append(f"models {cfg.models}, prompts {cfg.prompts.source}")
    return res


def check_judge(config: Any) -> Checked:
    """``rayeval augment judge``'s config (its ``judge:`` section): parser, types, model, engine."""
    from rayeval.prefs.judge import JudgeConfig

    res, doc = _open(config, "judge")
    if doc is None:
        return res
    sec = dict(doc.get("judge") or {}) if "judge" in doc else dict(doc)
    if "judge" in doc:
        sec.setdefault("name", doc.get("name", "judge"))
    where = f"{res.path}:judge" if "judge" in doc else res.path
    cfg, valid = _parse(res, sec, lambda d: JudgeConfig.from_dict(d, where))
    if not valid:
        return res
    if model_problem(cfg.model):
        res.problem("judge.model", model_problem(cfg.model))
    check_engine(res, cfg.engine, "judge.engine")
    res.resolved.append(f"judge {cfg.model}, mode {cfg.mode}")
    return res


# ----------------------------------------------------------------------------- front door

CHECKS = {"eval": check_eval, "pipeline": check_pipeline, "tune": check_tune, "serve": check_serve,
          "judge": check_judge, "generate": check_generate}


def guess_kinds(path: str, doc: dict) -> list[str]:
    """The config's kind(s) from its keys, else from its (packaged) name."""
    keys = set(doc)
    if "applications" in keys:
        return ["serve"]
    if keys & {"settings", "datasets", "scorings"}:
        return ["eval"]
    if keys & {"routers", "search", "scheduler", "calibration"}:
        return ["tune"]
    if keys & {"gold", "eval", "pair", "baselines", "router"}:
        return ["pipeline"]
    gen, judge = bool(keys & {"prompts", "sampling", "models"}), "judge" in keys or bool(keys & {"mode", "rule"})
    if gen or judge:
        return ["generate"] * gen + ["judge"] * judge
    stem = Path(path).stem
    return [k for k in KINDS if stem.startswith(k)][:1]


def check(config: str, kind: str | None = None, *, engine: dict | None = None) -> Checked:
    """Check one config of any kind (guessed when ``kind`` is None)."""
    if kind is not None and kind not in CHECKS:
        res = Checked(kind, str(config))
        res.problem("--kind", f"unknown kind {kind!r}; one of {list(KINDS)}")
        return res
    res, doc = _open(config, kind or "config")
    if doc is None:
        return res
    kinds = [kind] if kind else guess_kinds(res.path, doc)
    if not kinds:
        res.problem("", f"cannot tell what kind of config this is; give --kind ({'|'.join(KINDS)})")
        return res
    out = None
    for k in kinds:
        kw = {"engine": engine} if k in ("eval", "pipeline") else {}
        got = CHECKS[k](res.path, **kw)
        out = got if out is None else out.merge(got)
    return out
