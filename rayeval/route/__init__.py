"""Learned routing between LLMs (RouteLLM-style), evaluated honestly: routers (``routers/``),
their features (``embed``), cross-fitted evaluation and calibration (``evaluate``, ``metrics``),
transfer across benchmarks (``transfer``) and ``rayeval route``.  Their training data is
:mod:`rayeval.prefs`.

    from rayeval.route import make_router, load_router, ROUTERS, cross_val_apgr
    from rayeval.prefs.outcomes import load_routellm, load_routerbench, outcomes_from_eval

Heavy submodules (torch, transformers, ray) load lazily, on first use.
"""

from rayeval.prefs import Outcomes, Preferences  # noqa: F401  (the data routers learn from)


def __getattr__(name):  # lazy re-exports keep `import rayeval.route` cheap
    if name in ("ROUTERS", "Router", "make_router", "load_router"):
        from rayeval.route import routers

        return getattr(routers, name)
    if name in ("cross_fit", "cross_val_apgr", "fit_evaluate", "evaluate_routers", "calibrate"):
        from rayeval.route import evaluate

        return getattr(evaluate, name)
    raise AttributeError(name)
