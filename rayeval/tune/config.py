"""The tuning job's config: data, routers and their spaces, search, scheduler, calibration."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


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
        """The config's keys and types at every level (pydantic; unknown keys are errors), not
        yet validated against the router registry."""
        d = dict(d)
        if isinstance(d.get("routers"), dict):  # {name: {num_samples: ..}} shorthand
            d["routers"] = [{"name": n, **(v or {})} for n, v in d["routers"].items()]
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
