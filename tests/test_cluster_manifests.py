"""KubeRay manifests (k8s/*.yaml).

No KubeRay CRD schema ships with Ray or on PyPI, so the KubeRay v1 fields are checked by a strict
JSON schema written here from the ray.io/v1 API (RayService, RayJob, RayClusterSpec: unknown keys
fail, as they would with `kubectl apply --validate=strict`).  What the operator passes on is then
checked with the real validators: every pod template against the Kubernetes OpenAPI schema
(kubernetes-validate), serveConfigV2 with Ray Serve's ``ServeDeploySchema``, runtimeEnvYAML with
Ray's ``RuntimeEnv``, rayStartParams against this Ray's `ray start` options, and the RayJob
entrypoint against the jobs/ entrypoint's own argument parser.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
import sys

import jsonschema
import pytest
import yaml

from rayeval.serve.deploy import SERVE_ENV

from rayeval.config import REPO_ROOT

K8S = REPO_ROOT / "k8s"
RAY_VERSION = "2.60.0"

# ----------------------------------------------------------------------------- KubeRay v1 schema

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_QTY = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"}
_OBJ = {"type": "object"}  # validated separately (pod templates: Kubernetes schema)

_TEMPLATE = {"type": "object", "required": ["spec"], "additionalProperties": False,
             "properties": {"metadata": _OBJ, "spec": {"type": "object", "required": ["containers"]}}}

_HEAD = {
    "type": "object", "required": ["rayStartParams", "template"], "additionalProperties": False,
    "properties": {"rayStartParams": _STR_MAP, "template": _TEMPLATE,
                   "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                   "headService": _OBJ, "enableIngress": {"type": "boolean"},
                   "resources": _STR_MAP, "labels": _STR_MAP},
}
_WORKER = {
    "type": "object", "required": ["groupName", "template"], "additionalProperties": False,
    "properties": {"groupName": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                   "replicas": {"type": "integer", "minimum": 0},
                   "minReplicas": {"type": "integer", "minimum": 0},
                   "maxReplicas": {"type": "integer", "minimum": 0},
                   "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                   "numOfHosts": {"type": "integer", "minimum": 1},
                   "suspend": {"type": "boolean"},
                   "rayStartParams": _STR_MAP, "template": _TEMPLATE, "scaleStrategy": _OBJ,
                   "resources": _STR_MAP, "labels": _STR_MAP},
}
RAY_CLUSTER_SPEC = {
    "type": "object", "required": ["headGroupSpec"], "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
            "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
            "version": {"enum": ["v1", "v2"]},
            "image": {"type": "string"}, "imagePullPolicy": {"type": "string"}, "resources": _OBJ,
            "env": {"type": "array"}, "envFrom": {"type": "array"}, "volumeMounts": {"type": "array"},
            "securityContext": _OBJ}},
        "authOptions": {"type": "object", "additionalProperties": False,
                        "properties": {"mode": {"enum": ["disabled", "token"]}}},
        "headGroupSpec": _HEAD,
        "workerGroupSpecs": {"type": "array", "items": _WORKER},
        "headServiceAnnotations": _STR_MAP, "suspend": {"type": "boolean"}, "managedBy": {"type": "string"},
        "gcsFaultToleranceOptions": _OBJ,
    },
}
_METADATA = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
    "labels": _STR_MAP, "annotations": _STR_MAP, "namespace": {"type": "string"}}}


def _kind(kind: str, spec: dict) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                           "metadata": _METADATA, "spec": spec}}


RAY_SERVICE = _kind("RayService", {
    "type": "object", "required": ["rayClusterConfig", "serveConfigV2"], "additionalProperties": False,
    "properties": {
        "serveConfigV2": {"type": "string"},
        "rayClusterConfig": RAY_CLUSTER_SPEC,
        "upgradeStrategy": {"type": "object", "additionalProperties": False, "properties": {
            "type": {"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]},
            "clusterUpgradeOptions": _OBJ}},
        "serveService": _OBJ, "excludeHeadPodFromServeSvc": {"type": "boolean"},
        "rayClusterDeletionDelaySeconds": {"type": "integer", "minimum": 0},
    },
})
RAY_JOB = _kind("RayJob", {
    "type": "object", "required": ["entrypoint"], "additionalProperties": False,
    "oneOf": [{"required": ["rayClusterSpec"]}, {"required": ["clusterSelector"]}],
    "properties": {
        "entrypoint": {"type": "string", "minLength": 1},
        "runtimeEnvYAML": {"type": "string"},
        "metadata": _STR_MAP, "jobId": {"type": "string"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
        "entrypointResources": {"type": "string"},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "rayClusterSpec": RAY_CLUSTER_SPEC, "clusterSelector": _STR_MAP,
        "submitterPodTemplate": _TEMPLATE, "submitterConfig": _OBJ, "deletionStrategy": _OBJ,
        "managedBy": {"type": "string"}, "suspend": {"type": "boolean"},
    },
})


def load_job(stage: str):
    """jobs/<stage>.py as a module (jobs/ is not a package; it imports its sibling _common)."""
    jobs = str(REPO_ROOT / "jobs")
    if jobs not in sys.path:
        sys.path.insert(0, jobs)
    spec = importlib.util.spec_from_file_location(f"rayeval_job_{stage}", REPO_ROOT / "jobs" / f"{stage}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


@pytest.fixture(scope="module", params=["rayservice.yaml", "rayjob-eval.yaml"])
def manifest(request):
    return request.param, load(request.param)


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]["rayClusterSpec"]


def groups(doc: dict):
    spec = cluster_spec(doc)
    yield "head", spec["headGroupSpec"]
    for g in spec.get("workerGroupSpecs", []):
        yield g["groupName"], g


# ----------------------------------------------------------------------------- tests


def test_kuberay_v1_structure(manifest):
    name, doc = manifest
    schema = RAY_SERVICE if doc["kind"] == "RayService" else RAY_JOB
    jsonschema.validate(doc, schema)


def test_structural_validator_is_strict():
    doc = load("rayservice.yaml")
    doc["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, RAY_SERVICE)
    doc = load("rayjob-eval.yaml")
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1  # not a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, RAY_JOB)
    doc = load("rayjob-eval.yaml")
    doc["apiVersion"] = "ray.io/v1alpha1"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, RAY_JOB)


def test_pod_templates_match_kubernetes_schema(manifest):
    kv = pytest.importorskip("kubernetes_validate")
    name, doc = manifest
    templates = [(g, spec["template"]) for g, spec in groups(doc)]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        templates.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    for group, tpl in templates:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"x-{group}", **tpl.get("metadata", {})},
               "spec": tpl["spec"]}
        try:
            kv.validate(pod, kv.latest_version(), strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{name} {group}: {e.message} at {list(e.path)}")
    pvc = load("pvc.yaml")
    kv.validate(pvc, kv.latest_version(), strict=True)


def test_groups_resources_and_token_auth(manifest):
    name, doc = manifest
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == RAY_VERSION
    import ray

    assert ray.__version__ == RAY_VERSION, "bump rayVersion in k8s/ with the ray pin"
    assert spec["authOptions"]["mode"] == "token", "token auth stays on"
    images = set()
    for group, g in groups(doc):
        containers = g["template"]["spec"]["containers"]
        ray_c = containers[0]
        images.add(ray_c["image"])
        req, lim = ray_c["resources"]["requests"], ray_c["resources"]["limits"]
        assert {"cpu", "memory"} <= set(req) and {"cpu", "memory"} <= set(lim), group
        for env in ray_c.get("env", []):
            assert not (env["name"] == "RAY_AUTH_MODE" and env.get("value") == "disabled")
        params = g["rayStartParams"]
        if group == "head":
            assert params.get("num-gpus") == "0", "no engine on the head"
            assert "nvidia.com/gpu" not in lim
            ports = {p["name"]: p["containerPort"] for p in ray_c["ports"]}
            assert ports["gcs-server"] == 6379 and ports["dashboard"] == 8265
        else:
            gpus = int(lim["nvidia.com/gpu"])
            assert gpus >= 1 and req.get("nvidia.com/gpu") == lim["nvidia.com/gpu"]
            assert params["num-gpus"] == str(gpus)
            # KubeRay passes it as --resources='<json>': JSON inside one level of quotes
            custom = json.loads(params["resources"].strip('"').replace('\\"', '"'))
            assert custom == {"gpu_node": gpus}
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
            mounts = {m["mountPath"] for m in ray_c["volumeMounts"]}
            assert "/dev/shm" in mounts
    assert len(images) == 1, f"head and workers run one image: {images}"


def test_ray_start_params_are_ray_start_options(manifest):
    from ray.scripts.scripts import start

    known = {o.lstrip("-") for p in start.params for o in p.opts}
    name, doc = manifest
    for group, g in groups(doc):
        for k in g["rayStartParams"]:
            assert k in known, f"{name} {group}: `ray start --{k}` does not exist"


def test_serve_config_v2_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    doc = load("rayservice.yaml")
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    parsed = ServeDeploySchema.model_validate(serve_cfg)
    assert parsed.http_options.port == 8000
    ports = {p["name"]: p["containerPort"] for p in
             doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports["serve"] == parsed.http_options.port
    (app,) = parsed.applications
    assert app.import_path == "rayeval.serve.app:build_app"
    assert app.route_prefix == "/"
    # the args are the Serve app's own AppArgs (unknown keys, missing models fail there)
    from rayeval.serve.app import parse_args

    a = parse_args(app.args)
    assert a.strong_model != a.weak_model
    # trained routers live on the mounted PVC
    assert all(d is None or d.startswith("/data/") for d in a.routers.values())
    assert a.routers[a.default_router]
    # every LLM replica fits one GPU worker of the group, and the Router's user_config is a real deployment
    gpus = max(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"])
    for name, spec in a.llms.items():
        opts = spec["deployment"]["ray_actor_options"]
        assert 0 < opts["num_gpus"] <= gpus, name
        assert spec["engine_kwargs"].get("tensor_parallel_size", 1) <= opts["num_gpus"], name
    assert [d.name for d in app.deployments] == ["Router"]
    # the gateway's API key comes from a Secret on every container that can host the ingress
    for group, g in groups(doc):
        env = {e["name"]: e for e in g["template"]["spec"]["containers"][0]["env"]}
        assert env[a.api_key_env]["valueFrom"]["secretKeyRef"]["name"] == "rayeval-api-key", group
        # Serve reads its flags in every process it starts: throughput-optimized Serve + HAProxy on
        # every node (as rayeval's own local deploys run it: rayeval.serve.deploy.SERVE_ENV)
        assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"]["value"] == SERVE_ENV["RAY_SERVE_THROUGHPUT_OPTIMIZED"], group
        assert env["RAY_SERVE_ENABLE_HA_PROXY"]["value"] == "1", group
    mod, _, attr = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(mod), attr))


def test_rayjob_entrypoint_and_runtime_env():
    from ray.runtime_env import RuntimeEnv

    doc = load("rayjob-eval.yaml")
    spec = doc["spec"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    # Ray's own validation of the runtime env fields; working_dir is the image's checkout, which
    # is this repo (k8s/Dockerfile), so check it with the local path
    assert env["working_dir"] == "/home/ray/rayeval"
    RuntimeEnv(**{**env, "working_dir": str(REPO_ROOT)})
    assert env["env_vars"]["RAYEVAL_DATA"] == "/data"
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/eval.py"]
    assert (REPO_ROOT / argv[1]).is_file()
    # the arguments parse with the entrypoint's own parser, and the config is a real eval config
    args = load_job("eval").build_parser().parse_args(argv[2:])
    from rayeval.eval.config import load_eval_config

    cfg = load_eval_config(REPO_ROOT / args.config)
    assert cfg.models and args.out.startswith("/data/")
    assert spec["shutdownAfterJobFinishes"] is True


def test_dockerfile_installs_the_gpu_extra_on_the_pinned_ray_image():
    text = (K8S / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY_VERSION)}-py311-gpu$", text, re.M)
    assert 'pip install --no-cache-dir -e ".[gpu]"' in text
    doc = load("rayjob-eval.yaml")
    # the RayJob's working_dir is the image's checkout
    assert "WORKDIR " + yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["working_dir"] in text
