"""The driver: one Tune experiment per router, the best router exported with its calibrated
thresholds, the report."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rayeval.tune.config import METRIC, THRESHOLDS_FILE, CalibrationSpec, RouterSpec, TuneConfig
from rayeval.tune.data import TuneData, _train_embeddings, evaluate_router, prepare_data
from rayeval.tune.space import default_params, is_iterative, max_epochs, search_space
from rayeval.tune.trials import calibrate_trial, train_router_trial


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
    """JSON for numpy values (as routers save them); anything else (paths ...) as its string."""
    from rayeval.route.routers.base import _json_default

    try:
        return _json_default(o)
    except TypeError:
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
