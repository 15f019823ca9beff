"""``rayeval check`` and the checks ``rayeval eval|pipeline|tune`` run before Ray starts: a
held-out matrix of bad inputs, one case per kind of mistake, each a one-line error naming the
file and the field, exit code 2, in under 10 s, with no Ray cluster started; and one good config
per kind (exit 0).  Pure: no Ray, no weights (the fake engine plans with the byte tokenizer)."""

from __future__ import annotations

import copy
import subprocess
import sys
import time

import pytest
import yaml
from typer.testing import CliRunner

from rayeval.cli import app
from rayeval.config import REPO_ROOT

EVAL = {"name": "t", "models": ["m1", "m2"], "engine": {"kind": "fake"}, "scorings": ["symbol"],
        "datasets": [{"name": "mmlu", "split": "test", "dev_split": "dev", "subjects": ["anatomy"], "limit": 2}],
        "settings": [{"name": "baseline"}, {"name": "shuffle", "perturbations": ["shuffle"]}]}
PIPELINE = {"name": "p", "eval": "EVAL", "gold": {"setting": "baseline", "scoring": "symbol"},
            "router": {"name": "knn", "params": {"k": 5}}, "baselines": ["random"],
            "reference": {"when": "never"}, "serve": {"enabled": False}}
TUNE = {"name": "t", "data": {"source": "routellm:mt_bench", "subsample": 50},
        "routers": [{"name": "knn", "num_samples": 1, "params": {"k": 5}}]}
SERVE = yaml.safe_load((REPO_ROOT / "serve_configs" / "local_cpu.yaml").read_text())
BASES = {"eval": EVAL, "pipeline": PIPELINE, "tune": TUNE, "serve": SERVE}


def edit(d, path, value=None, *, rename=None):
    """A copy of ``d`` with the key at ``path`` (a list of keys / indexes) set, or renamed."""
    d = copy.deepcopy(d)
    *parents, last = path
    node = d
    for k in parents:
        node = node[k]
    if rename is not None:
        node[rename] = node.pop(last)
    else:
        node[last] = value
    return d


APP = ["applications", 0, "args"]
# (case, kind, the config, what the problem line must name: the field, then any other text)
MATRIX = [
    ("eval-top-typo", "eval", edit(EVAL, ["models"], rename="modles"), ["unknown key(s) ['modles']"]),
    ("eval-setting-typo", "eval", edit(EVAL, ["settings", 1, "perturbations"], rename="perturbatons"),
     ["settings[1]", "'perturbatons'"]),
    ("eval-dataset-typo", "eval", edit(EVAL, ["datasets", 0, "split"], rename="splitt"), ["datasets[0]", "'splitt'"]),
    ("eval-engine-typo", "eval", edit(edit(EVAL, ["engine"], {"kind": "hf", "dtyp": "float32"}), ["models"],
                                      ["smollm2-135m"]), ["engine", "'dtyp'", "hf engine"]),
    ("eval-perturbation-typo", "eval", edit(EVAL, ["settings", 1, "perturbations"], ["shufle"]),
     ["settings[1].perturbations[0]", "unknown perturbation 'shufle'"]),
    ("pipeline-top-typo", "pipeline", edit(PIPELINE, ["router"], rename="routr"), ["unknown key(s) ['routr']"]),
    ("pipeline-nested-typo", "pipeline", edit(PIPELINE, ["reference", "lmit"], 3), ["reference", "['lmit']"]),
    ("tune-top-typo", "tune", edit(TUNE, ["routers"], rename="routrs"), ["unknown key(s) ['routrs']"]),
    ("tune-nested-typo", "tune", edit(TUNE, ["data", "subsample"], rename="subsampel"), ["data", "['subsampel']"]),
    ("tune-router-typo", "tune", edit(TUNE, ["routers", 0, "num_samples"], rename="num_sampels"),
     ["routers[0]", "['num_sampels']"]),
    ("serve-top-typo", "serve", edit(SERVE, ["proxy_location"], rename="proxy_locaton"), ["['proxy_locaton']"]),
    ("serve-app-typo", "serve", edit(SERVE, ["applications", 0, "route_prefix"], rename="route_prefx"),
     ["applications[0]", "['route_prefx']"]),
    ("serve-args-typo", "serve", edit(SERVE, APP + ["strong_model"], rename="strong_modle"),
     ["applications[0].args", "['strong_modle']"]),
    ("serve-llm-typo", "serve", edit(SERVE, APP + ["llms", "smollm2-135m", "engine_kwargs"], rename="engine_kwarg"),
     ["llms.smollm2-135m", "['engine_kwarg']"]),
    ("serve-vllm-option-typo", "serve", edit(SERVE, APP + ["llms", "gemma3-270m", "engine_kwargs", "kv_cache_memory"], 1),
     ["applications[0].args.llms.gemma3-270m.engine_kwargs", "['kv_cache_memory']", "vLLM"]),
    ("unknown-model", "eval", edit(edit(EVAL, ["engine", "kind"], "hf"), ["models"], ["smollm2-135m", "smollm2-135mm"]),
     ["models[1]", "unknown model 'smollm2-135mm'"]),
    ("unknown-model-serve", "serve", edit(SERVE, APP + ["llms", "gemma3-270m", "model"], "gemma3-270mm"),
     ["applications[0].args.llms.gemma3-270m.model", "unknown model 'gemma3-270mm'"]),
    ("unknown-subject", "eval", edit(EVAL, ["datasets", 0, "subjects"], ["anatomy", "anatmy"]),
     ["datasets[0].subjects", "unknown subject(s) ['anatmy']; known: [", "'marketing'"]),
    ("unknown-split", "eval", edit(EVAL, ["datasets", 0, "split"], "tset"), ["datasets[0].split", "'tset'"]),
    ("unknown-router-pipeline", "pipeline", edit(PIPELINE, ["router", "name"], "knnn"),
     ["router.name", "unknown router 'knnn'"]),
    ("unknown-router-tune", "tune", edit(TUNE, ["routers", 0, "name"], "knnn"), ["routers[0].name", "'knnn'"]),
    ("unknown-router-serve", "serve", edit(SERVE, APP + ["routers", "knnn"], None),
     ["applications[0].args.routers.knnn", "unknown router 'knnn'"]),
    ("bad-router-param-pipeline", "pipeline", edit(PIPELINE, ["router", "params", "weights"], "distance"),
     ["router.params", "no parameter(s) ['weights']", "'weighting'"]),
    ("bad-router-param-tune", "tune", edit(TUNE, ["routers", 0, "params", "weights"], "distance"),
     ["routers[0].params", "no parameter(s) ['weights']"]),
    ("bad-router-param-value", "pipeline", edit(PIPELINE, ["router", "params", "k"], "ten"),
     ["router.params.k", "expected int, got 'ten'"]),
    ("wrong-type-eval", "eval", edit(EVAL, ["datasets", 0, "limit"], "ten"),
     ["datasets[0].limit", "expected int, got 'ten'"]),
    ("wrong-type-pipeline", "pipeline", edit(PIPELINE, ["folds"], "five"), ["folds", "expected int, got 'five'"]),
    ("wrong-type-tune", "tune", edit(TUNE, ["routers", 0, "num_samples"], "two"),
     ["routers[0].num_samples", "expected int, got 'two'"]),
    ("wrong-type-serve", "serve", edit(SERVE, APP + ["max_tokens_limit"], "lots"),
     ["applications[0].args.max_tokens_limit", "expected int"]),
    ("prompt-too-long", "eval", edit(EVAL, ["engine", "max_model_len"], 48),
     ["settings[0]", "prompt too long for m1", "(setting baseline", "tokens > 48"]),
]
CASES = {m[0]: m[2] for m in MATRIX}


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if anything calls ``ray.init``; after it, no Ray is initialized."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append(a) or pytest.fail("ray.init was called"))
    yield calls
    assert not calls and not ray.is_initialized()


def write(tmp_path, kind: str, doc: dict):
    """The config as a YAML file (a pipeline's eval points at a good eval config beside it)."""
    if kind == "pipeline" and doc.get("eval") == "EVAL":
        doc = {**doc, "eval": str(write(tmp_path, "eval", EVAL))}
    p = tmp_path / f"{kind}_{len(list(tmp_path.iterdir()))}.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def invoke(args: list[str]):
    t0 = time.perf_counter()
    r = CliRunner().invoke(app, args)
    return r, time.perf_counter() - t0


@pytest.mark.parametrize("case,kind,doc,names", MATRIX, ids=[m[0] for m in MATRIX])
def test_bad_input_is_one_line_naming_file_and_field(tmp_path, no_ray, case, kind, doc, names):
    path = write(tmp_path, kind, doc)
    r, seconds = invoke(["check", str(path)])
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert seconds < 10, f"{case}: {seconds:.1f} s"
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("note: ")]
    assert lines[-1].endswith("nothing was started") and all(ln.startswith(str(path)) for ln in lines[:-1]), lines
    hits = [ln for ln in lines[:-1] if all(n in ln for n in names)]
    assert len(hits) >= 1, f"no line names {names}:\n" + "\n".join(lines)
    assert r.stdout == ""


@pytest.mark.parametrize("kind", ["eval", "pipeline", "tune", "serve"])
def test_good_config_of_each_kind_is_ok(tmp_path, no_ray, kind):
    path = write(tmp_path, kind, BASES[kind])
    r, seconds = invoke(["check", str(path)])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith(f"ok: {kind} config {path}") and seconds < 10


@pytest.mark.parametrize("name,kind", [("tune_small", "tune"), ("serve_configs/local_cpu.yaml", "serve"),
                                       ("judge_mt_bench", "generate")])
def test_packaged_configs_resolve_by_name(no_ray, name, kind):
    r, _ = invoke(["check", name])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith(f"ok: {kind} config")
    r, _ = invoke(["check", name, "--kind", "judge" if kind == "generate" else kind])
    assert r.exit_code == 0, r.stderr


def test_prompt_lengths_are_checked_with_the_fake_engines_byte_tokenizer(tmp_path, no_ray):
    r, _ = invoke(["check", str(write(tmp_path, "eval", edit(EVAL, ["engine", "max_model_len"], 4096)))])
    assert r.exit_code == 0 and "longest prompt m1 " in r.stdout and "/4096" in r.stdout


@pytest.mark.parametrize("kind,case,line", [
    ("eval", "unknown-subject", "datasets[0].subjects: unknown subject(s) ['anatmy']"),
    ("pipeline", "bad-router-param-pipeline", "router.params: knn has no parameter(s) ['weights']"),
    ("tune", "bad-router-param-tune", "routers[0].params: knn has no parameter(s) ['weights']"),
])
def test_commands_run_the_same_check_before_ray(tmp_path, no_ray, kind, case, line):
    path = write(tmp_path, kind, CASES[case])
    r, seconds = invoke([kind, str(path), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and f"{path}: {line}" in r.stderr and seconds < 10, r.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_kind_and_unknown_file(tmp_path, no_ray):
    r, _ = invoke(["check", "eval_small", "--kind", "evaluation"])
    assert r.exit_code == 2 and "unknown kind 'evaluation'" in r.stderr
    r, _ = invoke(["check", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and f"{tmp_path / 'missing.yaml'}: No such file or directory" in r.stderr


def test_the_eval_path_itself_rejects_an_unknown_subject(tmp_path, shared_data):
    """Not only `rayeval check`: loading the config (and the loader) raise instead of dropping it."""
    from rayeval.data.loaders import load_items
    from rayeval.eval.config import ConfigError, load_eval_config

    path = write(tmp_path, "eval", CASES["unknown-subject"])
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.subjects: unknown subject\(s\) \['anatmy'\]; known: \["):
        load_eval_config(path)
    with pytest.raises(ValueError, match=r"unknown subject\(s\) \['anatmy'\]; known: \[.*'anatomy'"):
        load_items(shared_data / "mmlu", split="test", subjects=["anatomy", "anatmy"])


def test_a_fresh_process_answers_in_seconds(tmp_path):
    """What a user sees: the installed CLI, a new interpreter, one bad subject."""
    path = write(tmp_path, "eval", CASES["unknown-subject"])
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "rayeval.cli", "check", str(path)], capture_output=True, text=True,
                       timeout=60)
    seconds = time.perf_counter() - t0
    assert r.returncode == 2 and f"{path}: datasets[0].subjects: unknown subject(s) ['anatmy']" in r.stderr
    assert seconds < 10, f"{seconds:.1f} s"


def test_a_cpu_host_resolves_the_auto_engine_without_importing_torch():
    """The driver checks and plans before Ray starts; on a host without GPU device nodes the
    engine kind needs no torch import (1.2 s of every run's start)."""
    import glob
    import os

    if not sys.platform.startswith("linux") or glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"):
        pytest.skip("a host with GPU device nodes asks torch")
    code = ("import sys; from rayeval.eval.engines import resolve_kind, hf_dtype; "
            "print(resolve_kind('auto'), hf_dtype('auto'), 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    kind, dtype, imported = r.stdout.split()
    assert kind == "hf" and dtype in ("bfloat16", "float32") and imported == "False"


# ----------------------------------------------------------------------------- the typed config layer

def test_typed_configs_report_every_problem_at_every_level_with_its_path():
    from rayeval.config import ConfigProblems, from_dict
    from rayeval.tune import TuneConfig

    doc = {"data": {"subsampel": 5, "valid_fraction": "most"}, "routers": [{"name": "knn", "num_samples": "two"}],
           "scheduler": {"grace_period": [1]}, "nme": "x"}
    with pytest.raises(ConfigProblems) as e:
        from_dict(TuneConfig, doc, "tune.yaml")
    lines = e.value.lines
    assert any(ln.startswith("tune.yaml: unknown key(s) ['nme']; expected some of [") and "'routers'" in ln for ln in lines)
    assert any(ln.startswith("tune.yaml: data: unknown key(s) ['subsampel']; expected some of [") and "'subsample'" in ln
               for ln in lines)
    assert "tune.yaml: data.valid_fraction: expected float, got 'most'" in lines
    assert "tune.yaml: routers[0].num_samples: expected int, got 'two'" in lines
    assert "tune.yaml: scheduler.grace_period: expected int, got [1]" in lines
    assert len(lines) == 5 and sorted(e.value.unknown) == [("data", "subsampel"), ("nme",)]


def test_typed_configs_build_nested_sections_and_keep_defaults():
    from rayeval.config import from_dict
    from rayeval.prefs.generate import GenerateConfig
    from rayeval.prefs.judge import JudgeConfig
    from rayeval.tune import TuneConfig

    t = from_dict(TuneConfig, {"data": None, "routers": [{"name": "knn", "num_samples": 3}],
                               "resources_per_trial": {"cpu": 2}})
    assert t.data.source == "routellm:mmlu" and t.routers[0].num_samples == 3 and t.routers[0].include_default
    assert t.resources_per_trial == {"cpu": 2.0} and isinstance(t.resources_per_trial["cpu"], float)
    g = GenerateConfig.from_dict({"prompts": "routellm:gsm8k", "sampling": {"max_tokens": 9}})
    assert g.prompts.source == "routellm:gsm8k" and g.sampling.max_tokens == 9 and g.sampling.top_p == 0.95
    with pytest.raises(ValueError, match=r"generate: sampling\.max_tokens: expected int, got 'many'"):
        GenerateConfig.from_dict({"sampling": {"max_tokens": "many"}})
    with pytest.raises(ValueError, match=r"judge: pairwise: unknown key\(s\) \['symbol'\]"):
        JudgeConfig.from_dict({"pairwise": {"template": "{question}{answer_a}{answer_b}", "symbol": ["A"]}})
    with pytest.raises(ValueError, match=r"judge: pairwise\.symbols: expected list, got 'ABC'"):
        JudgeConfig.from_dict({"pairwise": {"template": "{question}{answer_a}{answer_b}", "symbols": "ABC"}})


def test_engine_section_types_are_checked_when_parsed():
    from rayeval.config import ConfigProblems
    from rayeval.runtime import Execution

    with pytest.raises(ConfigProblems) as e:
        Execution.from_engine_dict({"kind": "fake", "actors": "two", "num_cpus": [1]})
    assert e.value.lines == ["engine: actors: expected int, got 'two'", "engine: num_cpus: expected float, got [1]"]
    assert Execution.from_engine_dict({"kind": "fake", "actors": 2, "num_cpus": 1}).num_cpus == 1.0
