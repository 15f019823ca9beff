"""Router registry: ``ROUTERS[name]`` -> class; ``make_router(name, **params)``; ``load_router(dir)``."""

from rayeval.route.routers.base import ROUTERS, Router, TrainSet, load_router, make_router, register, training_set
from rayeval.route.routers import simple, pairwise  # noqa: F401  (registers)

try:  # torch/transformers-based routers
    from rayeval.route.routers import classifiers  # noqa: F401
except ImportError:  # pragma: no cover
    pass
from rayeval.route.routers import nway  # noqa: F401

__all__ = ["ROUTERS", "Router", "TrainSet", "load_router", "make_router", "register", "training_set"]
