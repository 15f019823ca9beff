"""Search spaces (the routers' plain ``SEARCH_SPACE`` values -> ``ray.tune`` domains) and the
epoch schedule of iterative routers."""

from __future__ import annotations

from typing import Any




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
