"""Hyperparameter tuning and threshold calibration of routers with Ray Tune.

``rayeval tune CONFIG.yaml [--out DIR] [--resume]`` runs, for each router of the config:

1. **Search** (one Tune experiment per router, ``<out>/experiments/<router>``): the router's
   declared ``SEARCH_SPACE`` (overridable in the config) becomes ``ray.tune`` domains; every
   trial fits the router on the *train* split and reports validation APGR/CPT on the *valid*
   split.  Iterative routers (those with an ``epochs`` argument: MF, the classifiers) report
   at ASHA's rungs (or every epoch), so the ASHA scheduler stops weak trials early; one-shot
   routers (kNN, logistic, SW ranking, ...) report once.  Every report carries a checkpoint
   (the router in its ``save`` format + the epoch reached), so errored or interrupted trials
   resume (``--resume`` -> ``Tuner.restore``).  The data (Outcomes + cached embeddings) is
   shipped once to the object store (``tune.with_parameters``).  The router's default
   configuration is one of the trials (``points_to_evaluate``), and it is also fitted outside
   the search so its held-out APGR can be compared with the winner's.
2. **Export**: the best trial over all routers (by validation APGR) -> ``<out>/best/``: the router
   folder (``Router.load(<out>/best)`` works) with ``thresholds.json``.
3. **Calibration** (Tune experiment ``<out>/experiments/calibrate``, one trial per target
   strong-call share or cost budget): the threshold is the score quantile on the valid split
   (the calibration split), and the achieved share / quality / PGR are reported on the held-out
   *test* split.  The thresholds go into ``<out>/best/thresholds.json``.

Python API: ``run(config_or_path, out=None, resume=False) -> dict`` (summary),
``load_tuned(dir) -> (router, thresholds_doc)``, ``search_space(router, overrides, grid)``,
``TuneConfig.from_yaml(path)``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import typer

from rayeval.config import from_dict, load_yaml, resolve_config

METRIC = "valid_apgr"  # what the search maximises
THRESHOLDS_FILE = "thresholds.json"


# ============================================================================================
# Config.
# ============================================================================================
@dataclass
class DataSpec:
    source: str = "routellm:mmlu"  # routellm:<bench> | routerbench:<task> | eval:<parquet> | Outcomes parquet
    subsample: Optional[int] = None  # number of queries kept (random, seeded); None = all
    seed: int = 0
    valid_fraction: float = 0.2  # validation (search metric + threshold calibration)
    test_fraction: float = 0.2  # held out: reported, never used for choices
    embedders: list[str] = field(default_factory=lambda: ["minilm-l6"])


@dataclass
class RouterSpec:
    name: str = "knn"
    num_samples: int = 4
    params: dict[str, Any] = field(default_factory=dict)  # fixed constructor arguments
    space: dict[str, Any] = field(default_factory=dict)  # overrides/extends the router's SEARCH_SPACE
    include_default: bool = True  # evaluate the router's default configuration as one trial


@dataclass
class SchedulerSpec:
    type: str = "asha"  # asha | fifo
    grace_period: int = 1
    reduction_factor: float = 2
    max_t: Optional[int] = None  # default: the largest epoch count a trial can have
    report_every_epoch: bool = False  # report after every epoch (else at ASHA's rungs; each point is a refit)


@dataclass
class SearchSpec:
    type: str = "random"  # random | grid | optuna
    seed: int = 0


@dataclass
class CalibrationSpec:
    targets: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    budgets: list[float] = field(default_factory=list)  # mean cost per query -> strong share
    cost_strong: float = 1.0
    cost_weak: float = 0.0


@dataclass
class TuneConfig:
    name: str = "tune"
    data: DataSpec = field(default_factory=DataSpec)
    routers: list[RouterSpec] = field(default_factory=lambda: [RouterSpec()])
    search: SearchSpec = field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources_per_trial: dict[str, float] = field(default_factory=lambda: {"cpu": 1})
    max_concurrent_trials: Optional[int] = None
    max_failures: int = 2  # per-trial automatic retries (from the last checkpoint), e.g. after an OOM kill
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    out: str = "runs/tune"
    num_cpus: Optional[float] = None  # local Ray cluster size (ignored when connecting)
    fail_once_marker: Optional[str] = None  # testing: a trial raises once while this file exists

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "tune config") -> "TuneConfig":
        cfg = cls.parse(d, where)
        cfg.validate(where)
        return cfg

    @classmethod
    def parse(cls, d: dict[str, Any], where: str = "tune config") -> "TuneConfig":
        """The config's keys at every level (unknown ones are errors), not yet validated."""
        d = dict(d)
        sub = {"data": DataSpec, "search": SearchSpec, "scheduler": SchedulerSpec, "calibration": CalibrationSpec}
        for k, typ in sub.items():
            if k in d:
                d[k] = from_dict(typ, d[k] or {}, f"{where}: {k}")
        if "routers" in d:
            rs = d["routers"]
            if isinstance(rs, dict):  # {name: {num_samples: ..}} shorthand
                rs = [{"name": n, **(v or {})} for n, v in rs.items()]
            d["routers"] = [from_dict(RouterSpec, r, f"{where}: routers[{i}]") for i, r in enumerate(rs)]
        return from_dict(cls, d, where)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TuneConfig":
        path = resolve_config(path)
        return cls.from_dict(load_yaml(path), str(path))

    def validate(self, where: str = "tune config") -> None:
        from rayeval.route.routers import ROUTERS

        for i, r in enumerate(self.routers):
            if r.name not in ROUTERS:
                raise ValueError(f"{where}: routers[{i}].name: unknown router {r.name!r}; known: {sorted(ROUTERS)}")
            if r.num_samples < 1:
                raise ValueError(f"{where}: routers[{i}].num_samples: must be >= 1 ({r.name})")
            for key in ("params", "space"):
                bad = sorted(set(getattr(r, key)) - set(ROUTERS[r.name].param_names()))
                if bad:
                    raise ValueError(f"{where}: routers[{i}].{key}: {r.name} has no parameter(s) {bad}; "
                                     f"it takes {ROUTERS[r.name].param_names()}")
        if len({r.name for r in self.routers}) != len(self.routers):
            raise ValueError(f"{where}: a router is listed twice")
        if self.search.type not in ("random", "grid", "optuna"):
            raise ValueError(f"{where}: search.type: must be random, grid or optuna, got {self.search.type!r}")
        if self.scheduler.type not in ("asha", "fifo"):
            raise ValueError(f"{where}: scheduler.type: must be asha or fifo, got {self.scheduler.type!r}")
        f = self.data.valid_fraction + self.data.test_fraction
        if not (0 < self.data.valid_fraction < 1 and 0 < self.data.test_fraction < 1 and f < 1):
            raise ValueError(f"{where}: data.valid_fraction, data.test_fraction: need each in (0, 1) and their sum < 1")
        for i, t in enumerate(self.calibration.targets):
            if not 0 <= t <= 1:
                raise ValueError(f"{where}: calibration.targets[{i}]: target {t} outside [0, 1]")


# ============================================================================================
# Search spaces: the routers' plain SEARCH_SPACE values -> ray.tune domains.
# ============================================================================================
_DISTS = ("loguniform", "uniform", "randint", "choice", "grid")


def to_domain(value: Any, grid: bool = False):
    """Translate one plain search-space value into a Tune domain.

    * ``[a, b, c]`` -> ``tune.choice`` (``tune.grid_search`` when ``grid``)
    * ``("loguniform", lo, hi)`` / ``("uniform", lo, hi)`` / ``("randint", lo, hi)`` (tuples, as
      routers declare them) or ``{loguniform: [lo, hi]}`` (YAML form) -> the Tune distribution
      (``randint``'s upper bound is exclusive, as in Tune)
    * ``{choice: [...]}`` / ``{grid: [...]}`` -> choice / grid search
    * anything else -> a fixed value
    """
    from ray import tune

    if isinstance(value, tuple) and value and value[0] in _DISTS:
        kind, args = value[0], list(value[1:])
    elif isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _DISTS:
        kind, args = next(iter(value.items()))
        args = list(args) if isinstance(args, (list, tuple)) else [args]
    elif isinstance(value, list):
        kind, args = ("grid" if grid else "choice"), value
    else:
        return value
    if kind in ("choice", "grid"):
        if not args:
            raise ValueError("empty choice list in a search space")
        return tune.grid_search(list(args)) if (grid or kind == "grid") else tune.choice(list(args))
    if len(args) != 2:
        raise ValueError(f"{kind} wants [low, high], got {args}")
    lo, hi = args
    return {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[kind](lo, hi)


def search_space(router: str, overrides: dict | None = None, params: dict | None = None,
                 grid: bool = False) -> dict[str, Any]:
    """Tune ``param_space`` for a router: its ``SEARCH_SPACE`` updated with ``overrides``, fixed
    ``params`` on top, and ``router`` = the name (a fixed entry the trainable reads)."""
    from rayeval.route.routers import ROUTERS

    plain = {**ROUTERS[router].search_space(), **(overrides or {})}
    space = {k: to_domain(v, grid) for k, v in plain.items()}
    space.update(params or {})
    space["router"] = router
    return space


def default_params(router: str, space: dict) -> dict[str, Any]:
    """The constructor defaults of the searched parameters (the 'untuned' configuration)."""
    import inspect

    from rayeval.route.routers import ROUTERS

    sig = inspect.signature(ROUTERS[router].__init__)
    return {k: sig.parameters[k].default for k in space
            if k in sig.parameters and sig.parameters[k].default is not inspect.Parameter.empty
            and _is_domain(space[k])}


def _is_domain(v) -> bool:
    from ray.tune.search.sample import Domain

    return isinstance(v, Domain) or (isinstance(v, dict) and "grid_search" in v)


def _router_params(config: dict) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "router"}


# ============================================================================================
# Data: split once, ship once.
# ============================================================================================
@dataclass
class TuneData:
    """Train / valid / test Outcomes and their embeddings per embedder (shipped to trials once)."""

    train: Any
    valid: Any
    test: Any
    emb: dict[str, dict[str, np.ndarray]]  # embedder -> split -> (n, d)
    info: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str):
        return getattr(self, name)

    def embeddings(self, split: str, embedder: str | None) -> np.ndarray | None:
        if embedder is None:
            return None
        if embedder not in self.emb:
            raise ValueError(f"no embeddings for {embedder!r}; add it to data.embedders ({sorted(self.emb)})")
        return self.emb[embedder][split]


def load_outcomes(source: str):
    from rayeval.route.sources import load_outcomes as load

    return load(source, "tuning")


def prepare_data(spec: DataSpec, outcomes=None) -> TuneData:
    """Load, subsample and split the data by question (seeded); embed each split (cached)."""
    from rayeval.route.evaluate import embeddings_for

    o = outcomes if outcomes is not None else load_outcomes(spec.source)
    rng = np.random.default_rng(spec.seed)
    idx = rng.permutation(len(o))
    if spec.subsample and spec.subsample < len(o):
        idx = idx[: spec.subsample]
    n = len(idx)
    n_valid, n_test = int(round(spec.valid_fraction * n)), int(round(spec.test_fraction * n))
    parts = {"test": np.sort(idx[:n_test]), "valid": np.sort(idx[n_test:n_test + n_valid]),
             "train": np.sort(idx[n_test + n_valid:])}
    full_emb = {e: embeddings_for(o, e) for e in spec.embedders}
    subsets = {k: o.subset(v) for k, v in parts.items()}
    emb = {e: {k: a[v] for k, v in parts.items()} for e, a in full_emb.items()}
    strong, weak = subsets["train"].strong_weak()
    info = {"source": spec.source, "n": n, **{f"n_{k}": len(v) for k, v in parts.items()},
            "strong": strong, "weak": weak, "seed": spec.seed}
    return TuneData(subsets["train"], subsets["valid"], subsets["test"], emb, info)


def evaluate_router(router, data: TuneData, split: str) -> dict[str, float]:
    """APGR (RouteLLM's computation), paper APGR, CPT(50%), CPT(80%) of a fitted router on a split."""
    from rayeval.route.evaluate import summarize

    o = data.split(split)
    emb = data.embeddings(split, getattr(router, "embedder", None)) if router.needs_embeddings else None
    p = router.win_probability(o.texts, emb, groups=o.groups)
    s = summarize(p, o, n_boot=0, strong=router.strong_, weak=router.weak_)
    return {"apgr": s["apgr"], "apgr_paper": s["apgr_paper"], "cpt50": s["cpt50"], "cpt80": s["cpt80"]}


def _train_embeddings(router, data: TuneData) -> np.ndarray | None:
    return data.embeddings("train", getattr(router, "embedder", None)) if router.needs_embeddings else None


# ============================================================================================
# Iterative routers: trained for growing epoch counts, reported at ASHA's rungs.
# ============================================================================================
def is_iterative(router: str) -> bool:
    """Routers with an ``epochs`` constructor argument (MF, BERT classifier, causal-LM classifier)."""
    from rayeval.route.routers import ROUTERS

    return "epochs" in ROUTERS[router].param_names()


def epoch_points(total: int, grace: int = 1, rf: float = 2, every: bool = False) -> list[int]:
    """Epoch counts at which an iterative trial reports: ASHA's rungs ``grace * rf**k`` below
    ``total``, then ``total`` (``every``: 1, 2, ..., total).  Each point is an exact
    ``Router(epochs=point).fit``, so a reported checkpoint is the router that configuration gives."""
    total = max(1, int(total))
    if every:
        return list(range(1, total + 1))
    pts, k = set(), 0
    while grace * rf ** k < total:
        pts.add(max(1, int(round(grace * rf ** k))))
        k += 1
    return sorted(pts | {total})


def max_epochs(router: str, space: dict) -> int:
    """The most epochs a trial of this router can train (1 for one-shot routers)."""
    if not is_iterative(router):
        return 1
    from ray.tune.search.sample import Categorical, Integer

    v = space.get("epochs")
    if isinstance(v, dict) and "grid_search" in v:
        return int(max(v["grid_search"]))
    if isinstance(v, Categorical):
        return int(max(v.categories))
    if isinstance(v, Integer):
        return int(v.upper) - 1  # tune.randint's upper bound is exclusive
    if v is None:
        import inspect

        from rayeval.route.routers import ROUTERS

        return int(inspect.signature(ROUTERS[router].__init__).parameters["epochs"].default)
    return int(v)


# ============================================================================================
# Trainables.
# ============================================================================================
def _set_threads() -> None:
    n = int(os.environ.get("RAYEVAL_TORCH_THREADS", "0") or 0)
    try:
        import ray

        n = n or int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1) or 1)
    except Exception:  # noqa: BLE001  (outside Ray)
        n = n or 1
    try:
        import torch

        torch.set_num_threads(max(1, n))
    except ImportError:  # pragma: no cover
        pass


def _resolve(data):
    """Trials receive the data as one shared object-store reference."""
    import ray

    return ray.get(data) if isinstance(data, ray.ObjectRef) else data


def _maybe_fail(marker: str | None, epoch: int) -> None:
    """Testing hook: the first trial to reach epoch 2 (or a one-shot fit) while ``marker``
    exists removes it and raises, as a crashed trial would."""
    if marker and epoch >= 2:
        try:
            os.remove(marker)
        except FileNotFoundError:
            return
        raise RuntimeError(f"injected failure at epoch {epoch} (marker {marker})")


def train_router_trial(config: dict, data: TuneData, schedule: dict | None = None,
                       fail_once_marker: str | None = None) -> None:
    """Tune trainable: fit ``config['router']`` (the rest of ``config``: constructor arguments)
    on ``data.train`` and report validation APGR/CPT with a checkpoint holding the router folder.

    Iterative routers report at every point of ``epoch_points(epochs, **schedule)`` (so ASHA,
    whose time attribute is ``epoch``, can stop them at its rungs), one-shot routers once.
    A restored trial skips the points its checkpoint already covers."""
    import ray
    from ray import tune

    from rayeval.route.routers import Router, make_router

    _set_threads()
    data = _resolve(data)
    name, params = config["router"], _router_params(config)
    node = ray.get_runtime_context().get_node_id()  # where the trial ran (trials.csv)
    ckpt = tune.get_checkpoint()
    done, t0 = 0, time.time()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            done = json.loads((Path(d) / "progress.json").read_text())["epoch"]

    def report(router, epoch: int, total: int) -> None:
        metrics = {f"valid_{k}": v for k, v in evaluate_router(router, data, "valid").items()}
        metrics.update(epoch=epoch, epochs=total, finished=epoch >= total, fit_seconds=time.time() - t0,
                       node=node)
        with tempfile.TemporaryDirectory() as d:
            router.save(Path(d) / "router")
            (Path(d) / "progress.json").write_text(json.dumps({"epoch": epoch, "epochs": total}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    if is_iterative(name):
        total = int(make_router(name, **params).epochs)
        for k in epoch_points(total, **(schedule or {})):
            if k <= done:
                continue
            r = make_router(name, **{**params, "epochs": k})
            r.fit(data.train, _train_embeddings(r, data))
            _maybe_fail(fail_once_marker, k)
            report(r, k, total)
        return
    if ckpt is not None:  # a one-shot router is done once it has a checkpoint
        with ckpt.as_directory() as d:
            report(Router.load(Path(d) / "router"), 1, 1)
        return
    r = make_router(name, **params)
    r.fit(data.train, _train_embeddings(r, data))
    _maybe_fail(fail_once_marker, 2)
    report(r, 1, 1)


def calibrate_trial(config: dict, data: TuneData, router) -> None:
    """Tune trainable: threshold for ``config['target_share']`` on the valid (calibration)
    split; achieved share, quality and PGR of that threshold on the held-out test split."""
    from ray import tune

    from rayeval.route import metrics as M
    from rayeval.route.evaluate import calibrate

    _set_threads()
    data = _resolve(data)
    r = router
    share = float(config["target"]["target_share"])

    def scores(split):
        o = data.split(split)
        emb = data.embeddings(split, getattr(r, "embedder", None)) if r.needs_embeddings else None
        return r.win_probability(o.texts, emb, groups=o.groups), o

    cal, o_cal = scores("valid")
    test, o_test = scores("test")
    thr = calibrate(cal, [share])[share]
    s, w = o_test.pair_arrays(r.strong_, r.weak_)
    sel = test >= thr
    q = float(np.where(sel, s, w).mean())
    tune.report({"target_share": share, "budget": float("nan") if config["target"]["budget"] is None else float(config["target"]["budget"]), "threshold": thr,
                 "calibration_share": float((cal >= thr).mean()), "achieved_share": float(sel.mean()),
                 "drift": float(sel.mean() - share), "quality": q, "q_strong": float(s.mean()),
                 "q_weak": float(w.mean()), "pgr": float(M.pgr(q, w.mean(), s.mean()))})


# ============================================================================================
# Driver.
# ============================================================================================
def _searcher(cfg: TuneConfig, points: list[dict], max_concurrent: int | None):
    if cfg.search.type == "optuna":
        try:
            from ray.tune.search import ConcurrencyLimiter
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:  # pragma: no cover
            raise RuntimeError("search.type optuna needs `pip install optuna`") from e
        s = OptunaSearch(points_to_evaluate=points or None, seed=cfg.search.seed)
        return ConcurrencyLimiter(s, max_concurrent=max_concurrent) if max_concurrent else s
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=points or None, random_state=cfg.search.seed,
                                 max_concurrent=max_concurrent or 0)


def _scheduler(cfg: TuneConfig, max_t: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    max_t = int(cfg.scheduler.max_t or max_t)
    if cfg.scheduler.type == "fifo" or max_t <= cfg.scheduler.grace_period:
        return FIFOScheduler()  # one-shot routers report once: nothing for ASHA to stop
    return ASHAScheduler(time_attr="epoch", max_t=max_t,
                         grace_period=cfg.scheduler.grace_period, reduction_factor=cfg.scheduler.reduction_factor)


def _schedule(cfg: TuneConfig) -> dict:
    sc = cfg.scheduler
    return {"grace": sc.grace_period, "rf": sc.reduction_factor, "every": sc.report_every_epoch}


def _resources(cfg: TuneConfig) -> dict[str, float]:
    r = dict(cfg.resources_per_trial)
    return {("cpu" if k.lower() == "cpu" else "gpu" if k.lower() == "gpu" else k): v for k, v in r.items()}


def _tuner(trainable, path: Path, resume: bool, make_new, restore_kw: dict | None = None):
    """Restore the experiment at ``path`` when resuming and it exists, else build a new one."""
    from ray import tune

    if resume and tune.Tuner.can_restore(str(path)):
        return tune.Tuner.restore(str(path), trainable=trainable, **(restore_kw or {})), True
    if path.exists() and not resume:
        shutil.rmtree(path)  # a fresh run replaces an old experiment of the same name
    return make_new(), False


def tune_router(cfg: TuneConfig, spec: RouterSpec, data_ref: TuneData, exp_dir: Path, resume: bool = False,
                log=print):
    """One Tune experiment for one router.  Returns the ResultGrid."""
    from ray import tune

    space = search_space(spec.name, spec.space, spec.params, grid=cfg.search.type == "grid")
    points = []
    if spec.include_default:
        d = default_params(spec.name, space)
        if d:
            points.append(d)
    max_t = max([max_epochs(spec.name, space)] + [int(p["epochs"]) for p in points
                                                   if is_iterative(spec.name) and "epochs" in p])
    trainable = tune.with_resources(
        tune.with_parameters(train_router_trial, data=data_ref, fail_once_marker=cfg.fail_once_marker,
                             schedule=_schedule(cfg)),
        _resources(cfg))
    conc = cfg.max_concurrent_trials

    def make():
        return tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=spec.num_samples,
                                        search_alg=_searcher(cfg, points, conc), scheduler=_scheduler(cfg, max_t),
                                        reuse_actors=True),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=str(exp_dir), verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures)))

    tuner, restored = _tuner(trainable, exp_dir / spec.name, resume, make, {"resume_errored": True})
    log(f"[tune] {spec.name}: {'resuming' if restored else 'starting'} {exp_dir / spec.name} "
        f"({spec.num_samples} samples, max_t={max_t})")
    grid = tuner.fit()
    _check_complete(grid, spec.num_samples * _grid_size(space), f"{spec.name} search")
    return grid


def _grid_size(space: dict) -> int:
    return int(np.prod([len(v["grid_search"]) for v in space.values() if isinstance(v, dict) and "grid_search" in v]
                       or [1]))


def _check_complete(grid, expected: int, what: str) -> None:
    """``Tuner.fit`` returns normally after Ctrl-C/SIGINT (the experiment state is saved, trials
    left RUNNING/PENDING): stop the job there instead of exporting half a search."""
    done = grid.num_terminated + grid.num_errors
    if done < len(grid) or len(grid) < expected:
        raise Interrupted(f"{what} was interrupted ({done} of {expected} trials finished); "
                          f"rerun with --resume to continue it")


def trials_table(grid, router: str) -> pd.DataFrame:
    rows = []
    for res in grid:
        m = res.metrics or {}
        cfg = {k: v for k, v in (res.config or {}).items() if k != "router"}
        rows.append({"router": router, "trial_id": m.get("trial_id"), "params": json.dumps(cfg, default=str),
                     METRIC: m.get(METRIC), "valid_apgr_paper": m.get("valid_apgr_paper"),
                     "valid_cpt50": m.get("valid_cpt50"), "valid_cpt80": m.get("valid_cpt80"),
                     "epoch": m.get("epoch"), "epochs": m.get("epochs"),
                     "iterations": m.get("training_iteration"), "node": m.get("node"),
                     "stopped_early": bool(m) and res.error is None and not m.get("finished", True),
                     "error": None if res.error is None else str(res.error).splitlines()[0][:200],
                     "path": res.path})
    return pd.DataFrame(rows)


def export(best_router_dir: Path, out_dir: Path, doc: dict) -> Path:
    """``out_dir``: the router folder (``Router.load(out_dir)``) + ``thresholds.json``."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(best_router_dir, out_dir)
    (out_dir / THRESHOLDS_FILE).write_text(json.dumps(doc, indent=2, default=_json))
    return out_dir


def load_tuned(folder: str | Path):
    """(router, thresholds document) of an exported folder; ``doc['thresholds']`` maps the target
    share (a string such as ``"0.5"``) to the score threshold: route strong iff P >= threshold."""
    from rayeval.route.routers import Router

    folder = Path(folder)
    return Router.load(folder), json.loads((folder / THRESHOLDS_FILE).read_text())


def _json(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def calibration_targets(c: CalibrationSpec) -> list[dict]:
    """Strong-call shares to calibrate: the targets, plus each cost budget turned into the share
    whose mean cost per query is the budget."""
    out = [{"target_share": float(t), "budget": None} for t in c.targets]
    span = c.cost_strong - c.cost_weak
    for b in c.budgets:
        share = min(1.0, max(0.0, (b - c.cost_weak) / span)) if span > 0 else 1.0
        out.append({"target_share": share, "budget": float(b)})
    return out


def calibrate_router(cfg: TuneConfig, router_dir: Path, data_ref: TuneData, exp_dir: Path,
                     resume: bool = False, log=print) -> pd.DataFrame:
    """One Tune experiment, one trial per calibration target."""
    from ray import tune

    targets = calibration_targets(cfg.calibration)
    from rayeval.route.routers import Router

    trainable = tune.with_resources(tune.with_parameters(calibrate_trial, data=data_ref,
                                                         router=Router.load(router_dir)), _resources(cfg))

    def make():
        return tune.Tuner(trainable, param_space={"target": tune.grid_search(targets)},
                          tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent_trials, reuse_actors=True),
                          run_config=tune.RunConfig(name="calibrate", storage_path=str(exp_dir), verbose=0,
                                                    failure_config=tune.FailureConfig(max_failures=3)))

    tuner, restored = _tuner(trainable, exp_dir / "calibrate", resume, make, {"resume_errored": True})
    log(f"[tune] calibration: {'resuming' if restored else 'starting'} {len(targets)} targets")
    grid = tuner.fit()
    _check_complete(grid, len(targets), "calibration")
    rows = [r.metrics for r in grid if r.error is None and r.metrics]
    errs = [str(r.error) for r in grid if r.error is not None]
    if errs:
        raise RuntimeError(f"calibration trials failed: {errs[0][:500]}")
    cols = ["target_share", "budget", "threshold", "calibration_share", "achieved_share", "drift",
            "quality", "pgr"]
    return pd.DataFrame(rows)[cols].sort_values(["target_share"]).reset_index(drop=True)


def run(config: TuneConfig | str | Path | dict, out: str | Path | None = None, resume: bool = False,
        log=print, outcomes=None) -> dict[str, Any]:
    """The whole tuning job (see the module docstring).  Returns the summary also written to
    ``<out>/summary.json``."""
    from rayeval.cluster import init_ray
    from rayeval.route.routers import Router, make_router

    cfg = config if isinstance(config, TuneConfig) else (
        TuneConfig.from_dict(config) if isinstance(config, dict) else TuneConfig.from_yaml(config))
    out_dir = Path(out or cfg.out)
    if not out_dir.is_absolute():
        out_dir = Path.cwd() / out_dir
    exp_dir = out_dir / "experiments"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=_json))
    t0 = time.time()
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    init_ray(num_cpus=cfg.num_cpus, log_to_driver=False)
    data = prepare_data(cfg.data, outcomes)
    log(f"[tune] data {data.info}")
    import ray

    data_ref = ray.put(data)  # one copy in the object store for every experiment and trial

    tables, bests = [], {}
    for spec in cfg.routers:
        grid = tune_router(cfg, spec, data_ref, exp_dir, resume, log)
        t = trials_table(grid, spec.name)
        tables.append(t)
        errors = t["error"].notna().sum()
        log(f"[tune] {spec.name}: {len(t)} trials, {int(t['stopped_early'].sum())} stopped early by ASHA, "
            f"{errors} errored; best {METRIC} {t[METRIC].max():.4f}")
        if errors:
            raise TrialsFailed(f"{spec.name}: {errors} trial(s) failed (first: {t['error'].dropna().iloc[0]}); "
                               f"rerun with --resume to continue them from their checkpoints")
        bests[spec.name] = grid.get_best_result(metric=METRIC, mode="max", scope="last")
    trials = pd.concat(tables, ignore_index=True)
    trials.to_csv(out_dir / "trials.csv", index=False)

    # Default configurations, fitted outside the search (same splits), for the comparison.
    defaults = {}
    for spec in cfg.routers:
        space = search_space(spec.name, spec.space, spec.params)
        params = {**default_params(spec.name, space), **spec.params}
        r = make_router(spec.name, **params)
        r.fit(data.train, _train_embeddings(r, data))
        defaults[spec.name] = {"params": params, "valid": evaluate_router(r, data, "valid"),
                               "test": evaluate_router(r, data, "test")}

    # Each router's best trial on the held-out split; the best router overall by validation APGR.
    per_router = {}
    for name, res in bests.items():
        with res.checkpoint.as_directory() as d:
            r = Router.load(Path(d) / "router")
        per_router[name] = {"params": r.get_params(), "trial_id": res.metrics.get("trial_id"),
                            "valid": evaluate_router(r, data, "valid"), "test": evaluate_router(r, data, "test"),
                            "default": defaults[name]}
    name = max(bests, key=lambda n: bests[n].metrics[METRIC])
    spec, res = next(sp for sp in cfg.routers if sp.name == name), bests[name]
    with res.checkpoint.as_directory() as d:
        router = Router.load(Path(d) / "router")
        staging = out_dir / ".best_router"
        if staging.exists():
            shutil.rmtree(staging)
        shutil.copytree(Path(d) / "router", staging)
    best_test, best_valid = per_router[name]["test"], per_router[name]["valid"]
    best_dir = out_dir / "best"
    doc = {"router": spec.name, "params": router.get_params(), "strong": router.strong_, "weak": router.weak_,
           "thresholds": {}, "valid": best_valid, "test": best_test, "valid_apgr": best_valid["apgr"],
           "test_apgr": best_test["apgr"], "default": defaults[spec.name], "trial_id": res.metrics.get("trial_id"),
           "experiment": str(exp_dir / spec.name), "data": data.info, "calibration": []}
    export(staging, best_dir, doc)
    shutil.rmtree(staging)

    cal = calibrate_router(cfg, best_dir, data_ref, exp_dir, resume, log)
    doc["thresholds"] = {_share_key(t): float(th) for t, th in zip(cal["target_share"], cal["threshold"])}
    doc["calibration"] = cal.to_dict("records")
    doc["calibrated_on"] = "valid split (tuning validation); achieved share/quality on the held-out test split"
    (best_dir / THRESHOLDS_FILE).write_text(json.dumps(doc, indent=2, default=_json))

    summary = {"out": str(out_dir), "best_dir": str(best_dir), "experiments": str(exp_dir),
               "best": {"router": spec.name, "params": router.get_params(), "valid": best_valid, "test": best_test},
               "defaults": defaults, "per_router": per_router, "n_trials": len(trials),
               "n_stopped_early": int(trials["stopped_early"].sum()),
               "trials_per_router": trials.groupby("router").size().to_dict(),
               "best_per_router": trials.groupby("router")[METRIC].max().to_dict(),
               "data": data.info, "seconds": round(time.time() - t0, 1)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_json))
    (out_dir / "report.md").write_text(report_md(summary, trials, cal))
    log(f"[tune] best {spec.name} {router.get_params()}: valid APGR {best_valid['apgr']:.4f}, "
        f"test APGR {best_test['apgr']:.4f} (default: test {defaults[spec.name]['test']['apgr']:.4f}) -> {best_dir}")
    return summary


class TrialsFailed(RuntimeError):
    """Some trials errored; the experiment can be resumed."""


class Interrupted(TrialsFailed):
    """The run was stopped (Ctrl-C / SIGINT) before every trial finished; it can be resumed."""


def _share_key(t: float) -> str:
    return f"{float(t):g}"


def _short(params: dict) -> str:
    skip = {"embedder", "strong", "weak", "seed", "tie_mode"}
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items() if k not in skip)


def report_md(summary: dict, trials: pd.DataFrame, cal: pd.DataFrame) -> str:
    b = summary["best"]
    lines = ["# Router tuning", "", f"data: {summary['data']}", "",
             f"{summary['n_trials']} trials, {summary['n_stopped_early']} stopped early by ASHA, "
             f"{summary['seconds']} s.", "",
             f"Exported: **{b['router']}** {b['params']}", "",
             "| router | configuration | valid APGR | test APGR | test CPT(50%) | test CPT(80%) |",
             "|---|---|---|---|---|---|"]
    for name, pr in summary["per_router"].items():
        for label, d in (("default", pr["default"]), ("tuned", pr)):
            lines.append(f"| {name} | {label} {_short(d['params'])} | {d['valid']['apgr']:.4f} | "
                         f"{d['test']['apgr']:.4f} | {d['test']['cpt50']:.3f} | {d['test']['cpt80']:.3f} |")
    lines += ["", "## Calibration (held-out test split)", "",
        "| target share | budget | threshold | achieved share | quality | PGR |", "|---|---|---|---|---|---|"]
    for _, r in cal.iterrows():
        bud = "" if r["budget"] is None or (isinstance(r["budget"], float) and math.isnan(r["budget"])) else r["budget"]
        lines.append(f"| {r['target_share']:.2f} | {bud} | {r['threshold']:.4f} | {r['achieved_share']:.3f} | "
                     f"{r['quality']:.4f} | {r['pgr']:.3f} |")
    return "\n".join(lines) + "\n"


# ============================================================================================
# CLI: ``rayeval tune CONFIG.yaml [--out DIR] [--resume]``.
# ============================================================================================
# A group whose callback is the command (so ``rayeval tune CONFIG`` works once mounted with
# ``add_typer``); interspersed args let options follow the CONFIG argument.
app = typer.Typer(help="Tune routers with Ray Tune (search + ASHA), calibrate thresholds, export the best.",
                  pretty_exceptions_show_locals=False, context_settings={"allow_interspersed_args": True},
                  subcommand_metavar="")


@app.callback(invoke_without_command=True)
def tune_cmd(config: str = typer.Argument(..., metavar="CONFIG", help="tune YAML, or a packaged name (tune_small)"),
             out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: config's out)"),
             resume: bool = typer.Option(False, "--resume", help="continue the experiments under --out "
                                                                 "(Tuner.restore: unfinished and errored trials)")):
    """Search each router's space, export the best router + thresholds.json to OUT/best."""
    from rayeval.check import check_tune, fail_on_problems

    fail_on_problems(check_tune(config))
    try:
        summary = run(config, out, resume, log=typer.echo)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    except Interrupted as e:
        typer.echo(f"interrupted: {e}", err=True)
        raise typer.Exit(130)
    except TrialsFailed as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(3)
    typer.echo(json.dumps({k: summary[k] for k in ("best_dir", "best", "n_trials", "n_stopped_early", "seconds")},
                          default=_json))


if __name__ == "__main__":  # pragma: no cover
    app()
