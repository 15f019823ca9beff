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

from rayeval.tune.config import (METRIC, THRESHOLDS_FILE, CalibrationSpec, DataSpec, RouterSpec,  # noqa: F401
                                 SchedulerSpec, SearchSpec, TuneConfig)
from rayeval.tune.data import TuneData, _train_embeddings, evaluate_router, load_outcomes, prepare_data  # noqa: F401
from rayeval.tune.space import (default_params, epoch_points, is_iterative, max_epochs, search_space,  # noqa: F401
                                to_domain)
from rayeval.tune.trials import calibrate_trial, train_router_trial  # noqa: F401
from rayeval.tune.run import (Interrupted, TrialsFailed, _check_complete, _grid_size, calibrate_router,  # noqa: F401
                              calibration_targets, export, load_tuned, report_md, run, trials_table, tune_router)
from rayeval.tune.cli import app, tune_cmd  # noqa: F401
