"""The Tune trainables: one router fit (reported at ASHA's rungs for iterative routers) and one
threshold calibration."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from rayeval.tune.data import TuneData, evaluate_router, _train_embeddings
from rayeval.tune.space import _router_params, epoch_points, is_iterative


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
