"""cluster.yaml against Ray's own cluster-launcher validation (what `ray up` runs before it
touches a cloud): ``prepare_config`` (defaults, node-type limits) then ``validate_config`` (the
JSON schema shipped as ray/autoscaler/ray-schema.json plus Ray's cross-field checks)."""

from __future__ import annotations

import copy
import re
import shlex

import pytest
import yaml

from rayeval.config import REPO_ROOT

CLUSTER_YAML = REPO_ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _validate(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_ray_validates_cluster_yaml(raw):
    prepared = _validate(raw)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # prepare_config fills the head's max_workers with 0: nothing else launches head nodes
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_ray_validator_is_strict():
    """The validator really runs: a typo'd key, a wrong type and an unknown head type all fail."""
    import jsonschema

    base = yaml.safe_load(CLUSTER_YAML.read_text())
    bad = copy.deepcopy(base)
    bad["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)
    bad = copy.deepcopy(base)
    bad["available_node_types"]["gpu_a10g"]["max_workers"] = "six"
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)
    bad = copy.deepcopy(base)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError):
        _validate(bad)


def test_head_is_cpu_and_workers_are_gpu(raw):
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {n: t for n, t in types.items() if n != raw["head_node_type"]}
    assert gpu_types, "no worker group"
    for name, t in gpu_types.items():
        res = t["resources"]
        assert res["GPU"] >= 1, name
        # the custom resource configs use to pin engines to GPU nodes, one unit per GPU
        assert res["gpu_node"] == res["GPU"], name
        assert t["min_workers"] == 0, f"{name}: GPU groups autoscale from zero"
        assert re.match(r"^(g5|g6|g6e|p4d|p5)\.", t["node_config"]["InstanceType"]), name
    assert sum(t["max_workers"] for t in gpu_types.values()) <= raw["max_workers"]


def test_setup_installs_the_gpu_extra_from_the_mounted_repo(raw):
    mounts = raw["file_mounts"]
    repo_remote = next(r for r, local in mounts.items() if local == ".")
    setup = " ".join(raw["setup_commands"])
    assert f'"{repo_remote}[gpu]"' in setup
    # the extra exists in pyproject.toml and pulls vLLM
    import tomllib

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert any(d.startswith("vllm") for d in pyproject["project"]["optional-dependencies"]["gpu"])


def test_token_auth_on_every_node(raw):
    """Every `ray start` runs with RAY_AUTH_MODE=token and every node gets the same token file."""
    assert "/home/ubuntu/.ray/auth_token" in raw["file_mounts"]
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    for c in starts:
        assert "RAY_AUTH_MODE=token" in c, c
        assert "disabled" not in c
    for c in ray_starts:  # Serve's flags, read by its processes on every node (see SERVE_ENV)
        assert "RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in c and "RAY_SERVE_ENABLE_HA_PROXY=1" in c, c
    head = next(c for c in raw["head_start_ray_commands"] if "ray start" in c)
    argv = shlex.split(head.split(";")[-1])
    assert "--head" in argv and "--autoscaling-config=~/ray_bootstrap_config.yaml" in argv


def test_start_commands_use_real_ray_start_flags(raw):
    """Each --flag in the start commands is an option of this Ray's `ray start`."""
    from ray.scripts.scripts import start

    known = {o for p in start.params for o in p.opts}
    for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        if "ray start" not in c:
            continue
        for tok in shlex.split(c.split(";")[-1]):
            if tok.startswith("--"):
                assert tok.split("=")[0] in known, tok


def test_file_mounts_point_at_real_local_paths(raw):
    """`ray up` runs from the repo root: every local side of file_mounts must exist there (the
    token file is per user: ~/.ray/auth_token, created by `ray get-auth-token --generate`)."""
    for remote, local in raw["file_mounts"].items():
        assert remote.startswith("/home/ubuntu/"), remote
        if local.startswith("~"):
            assert local == "~/.ray/auth_token"
            continue
        assert (REPO_ROOT / local).resolve().is_dir(), local
    # the data mount is where rayeval looks for it on the nodes
    setup = " ".join(raw["setup_commands"])
    data_remote = next(r for r, local in raw["file_mounts"].items() if local.endswith("shared/data"))
    assert f"RAYEVAL_DATA={data_remote}" in setup
