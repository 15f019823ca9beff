"""Grid benchmark: work sharing and engine efficiency, measured side by side in ONE run.

    .venv/bin/python bench/grid_speed.py --out bench/results/grid-DATE          # defaults below
    .venv/bin/python bench/grid_speed.py --zero-shot-n 532 --e2e-subjects 4 --e2e-items 25 --e2e-arc 50

Part A, zero-shot symbol scoring (MMLU, three subjects), per model:
  rayeval         ``make_engine("hf", model)`` with its defaults (what a single-model run gets)
  roofline        the same run's best matmul rate on the model's own layer shapes (bf16, fp32) and
                  the FLOPs each question needs (``eval_speed.roofline``): questions/s no
                  implementation that computes every prompt token can beat
  lm-eval HF      lm-eval 0.4.13's HF backend on the same questions (lm-eval's MMLU prompt), at the
                  dtype the roofline found fastest here, 64 per batch, the same threads
Part B, the paper grid (``eval_paper_grid``: 25 settings, three scorings) on a slice, both models:
  plan            tokens requested, the prefix-trie minimum and what rayeval computes (``rayeval
                  plan``) on the slice the targets name (--plan-subjects x --plan-items + --plan-arc)
  end to end      ``run_eval`` (Ray Data, one actor, engine ``auto``, empty score cache) against
                  lm-eval running every (setting, scoring) as its own task on exactly rayeval's
                  prompts (one ``simple_evaluate`` over all tasks), on a smaller slice; predictions
                  compared on the raw log-likelihood argmax.  rayeval runs three times (first,
                  between lm-eval's two models, after them; a score cache of its own each) and
                  the ratio takes the median: lm-eval's minutes average over the host's phases
                  (some hosts' matmul rate moves 3x within minutes), one rayeval minute does not.
                  Each timed step is bracketed by a probe of the host's matmul rate (``probe``),
                  listed in the report.  lm-eval's batch per model is the
                  largest power of two up to 64 whose log-probabilities (batch x longest sequence
                  x vocabulary, lm-eval holds them all) fit in half the available memory: Gemma-3's
                  262k-wide rows at every position of a few-shot prompt do not fit at 64
  added setting   the slice without one setting, then the full slice on the same score cache: what
                  the second run computed against that setting's share of the plan

Results: ``OUT.json`` and ``OUT.md`` (CPU model and flags, load, every figure and ratio).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_speed as es  # noqa: E402

SUBJECTS = ["high_school_geography", "us_foreign_policy", "marketing", "high_school_biology"]


def log(msg: str) -> None:
    print(f"[grid {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_info() -> dict:
    model, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    keep = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    return {"model": model, "flags": keep, "cores": len(os.sched_getaffinity(0))}


# Some hosts change speed within a run (a neighbour on the same physical cores: this one's bf16
# matmuls ran at 2,600 and at 850 GFLOP/s minutes apart).  A ratio of two timings is only a ratio
# of the two evaluators where both ran in the same phase, so each timed step is bracketed by a
# short probe of the matmul rate, and the report shows them side by side.
PROBES: list[dict] = []


def probe(label: str, warm_s: float = 0.2, rounds: int = 5, reps: int = 12) -> float:
    """bf16 (fp32 without native bf16) matmul rate on SmolLM2's MLP shape at every core, GFLOP/s,
    recorded in ``PROBES`` under ``label``: the fastest of ``rounds`` rounds of ``reps`` products
    after ``warm_s`` seconds of them (the threads wake, the rate settles); 0.4-1 s."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    dt = torch.bfloat16 if _bf16() else torch.float32
    x, w = torch.randn(4096, 576, dtype=dt), torch.randn(1536, 576, dtype=dt)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warm_s:
        torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(x, w)
        best = min(best, (time.perf_counter() - t0) / reps)
    torch.set_num_threads(threads)
    g = 2 * 4096 * 576 * 1536 / best / 1e9
    PROBES.append({"label": label, "time": time.strftime("%H:%M:%S"), "gflops": round(g)})
    return g


# ----------------------------------------------------------------------------- part A

def zero_shot(model: str, n_q: int, env, tmp: Path, rounds: int = 3) -> dict:
    import torch

    from rayeval.eval.engines import make_engine
    from rayeval.models import resolve_model

    subjects = SUBJECTS[:3]
    works, reqs = es.zero_shot_questions(model, subjects, n_q)
    gold = {w.prompt.item_id: w.prompt.gold for w in works}
    n = len(works)
    t0 = time.perf_counter()
    eng = make_engine("hf", model)
    # A warm-up call on the same questions: the compiled elementwise kernels specialise on their
    # first shapes and recompile once for dynamic ones (seconds, once per engine; a run of more
    # than a few hundred questions pays it once).  Then the fastest of ``rounds`` timed calls,
    # as the roofline takes the fastest of its rounds.
    eng.score(reqs)
    start_s = time.perf_counter() - t0
    probe(f"{model} zero-shot: before rayeval")
    times = []
    for _ in range(rounds):
        eng.stats = {k: 0 for k in eng.stats}
        t0 = time.perf_counter()
        res = eng.score(reqs)
        times.append(time.perf_counter() - t0)
    probe(f"{model} zero-shot: after rayeval")
    dt = min(times)
    preds = es.preds_from_results(works, res)
    out = {"n": n, "rayeval": {"q_per_s": n / dt, "seconds": dt, "rounds_s": times, "start_and_warm_up_s": start_s,
                                "median_q_per_s": n / sorted(times)[len(times) // 2],
                                "dtype": eng.dtype, "threads": torch.get_num_threads(),
                                "attention": eng.identity.get("attention", "sdpa"),
                                "acc": es.accuracy(preds, gold), "stats": dict(eng.stats)}}
    log(f"{model}: rayeval default engine {n / dt:.2f} q/s (rounds {[round(t, 2) for t in times]} s; {eng.dtype}, "
        f"{torch.get_num_threads()} threads)")
    roof = es.roofline(eng, reqs, torch, rows_options=(1024, 4096, 8192), reps=10, rounds=3)
    out["roofline"] = roof
    out["rayeval"]["pct_of_roofline"] = 100 * out["rayeval"]["q_per_s"] / roof["ceiling_q_per_s"]
    # rayeval computes only the trie's tokens: its own bound is the ceiling scaled by what it skips
    st = out["rayeval"]["stats"]
    out["rayeval"]["sharing_bound_q_per_s"] = roof["ceiling_q_per_s"] * st["tokens_requested"] / max(st["tokens_computed"], 1)
    threads = torch.get_num_threads()
    del eng
    if eng_dtype_is_bf16(out["rayeval"]["dtype"]):
        # the numerics reference: fp32, every prompt alone (no sharing, eager kernels); how far bf16
        # itself moves predictions on these near-chance models, against which lm-eval's agreement reads
        ref = make_engine("hf", model, {"dtype": "float32", "prefix_sharing": False, "fuse": False})
        t0 = time.perf_counter()
        ref_preds = es.preds_from_results(works, ref.score(reqs))
        out["fp32_reference"] = {"seconds": time.perf_counter() - t0, "acc": es.accuracy(ref_preds, gold),
                                 "agreement_rayeval_bf16": es.agreement(preds, ref_preds)}
        log(f"{model}: fp32 reference agrees with rayeval bf16 on {out['fp32_reference']['agreement_rayeval_bf16']:.3f}")
        del ref
    else:
        ref_preds = None
    if env is not None:
        tasks, idmap = es.lmeval_zero_shot_tasks(subjects, n_q, tmp / model)
        dtype = roof["best"].split("/")[0]
        probe(f"{model} zero-shot: before lm-eval")
        d = es.run_lmeval("hf", str(resolve_model(model)), dict(env), tmp / model, tasks, idmap, dtype=dtype,
                          batch_size=64, extra_env={"OMP_NUM_THREADS": str(threads)}, add_bos=_bos(model))
        probe(f"{model} zero-shot: after lm-eval")
        agree = es.agreement(preds, d["preds"])
        out["lm_eval_hf"] = {"q_per_s": n / d["eval_s"], "seconds": d["eval_s"], "dtype": dtype,
                             "acc": es.accuracy(d["preds"], gold), "agreement_with_rayeval": agree}
        if ref_preds is not None:
            out["lm_eval_hf"]["agreement_with_fp32_reference"] = es.agreement(d["preds"], ref_preds)
        out["rayeval"]["x_lm_eval"] = out["rayeval"]["q_per_s"] / out["lm_eval_hf"]["q_per_s"]
        # where a ratio to lm-eval is bounded on this host: lm-eval's own share of the roofline, and
        # the most rayeval could reach at the bound of what it computes (the sharing bound)
        lm_q = out["lm_eval_hf"]["q_per_s"]
        out["lm_eval_hf"]["pct_of_roofline"] = 100 * lm_q / roof["ceiling_q_per_s"]
        out["rayeval"]["best_x_lm_eval"] = out["rayeval"]["sharing_bound_q_per_s"] / lm_q
        log(f"{model}: lm-eval HF {n / d['eval_s']:.2f} q/s ({dtype}); rayeval = {out['rayeval']['x_lm_eval']:.2f}x, "
            f"agreement {agree:.3f}")
    return out


# ----------------------------------------------------------------------------- part B

def eng_dtype_is_bf16(dtype: str) -> bool:
    return str(dtype) in ("bfloat16", "torch.bfloat16")


def grid_config(models, subjects: int, items: int, arc: int, name: str, drop: str | None = None,
                cache: bool | str = True, pools: str = "model"):
    from rayeval.config import CONFIG_DIR, load_yaml
    from rayeval.eval.config import parse_config

    d = load_yaml(CONFIG_DIR / "eval_paper_grid.yaml")
    d["name"] = name
    d["models"] = list(models)  # works per shard: the packaged config's (a shard is one engine call)
    d["engine"] = {"kind": "auto", "max_model_len": 2048, "cache": cache, "pools": pools}
    d["metrics"] = {"n_boot": 100}
    d["datasets"] = [{"name": "mmlu", "split": "test", "dev_split": "dev", "subjects": SUBJECTS[:subjects],
                      "limit": items, "template": "mmlu"},
                     {"name": "arc_challenge", "split": "test", "dev_split": "dev", "limit": arc, "template": "arc"}]
    if drop:
        d["settings"] = [s for s in d["settings"] if s["name"] != drop]
    return parse_config(d)


def lmeval_grid_tasks(works, tmp: Path) -> tuple[list[str], dict[str, tuple]]:
    """One lm-eval task per (dataset, setting, scoring) with rayeval's exact prompts and options."""
    tdir = tmp / "lmeval_tasks"  # where eval_speed.run_lmeval points lm-eval
    tdir.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple, list] = {}
    for w in works:
        groups.setdefault((w.dataset, w.setting, w.scoring.label), []).append(w)
    tasks, idmap = [], {}
    for i, ((ds, st, sc), ws) in enumerate(sorted(groups.items())):
        task = f"rayeval_grid_{i:03d}"
        with open(tdir / f"{task}.jsonl", "w", encoding="utf-8") as f:
            for d, w in enumerate(ws):
                r = w.requests[0]
                choices = [" " + s for s in r.symbols] if r.symbols is not None else list(r.continuations)
                f.write(json.dumps({"text": r.prompt, "choices": choices, "gold": w.prompt.gold}) + "\n")
                idmap[f"{task}/{d}"] = (ds, st, sc, w.prompt.item_id, w.rotation)
        spec = {"task": task, "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(tdir / f"{task}.jsonl")}}, "test_split": "test",
                "output_type": "multiple_choice", "doc_to_text": "{{text}}", "doc_to_choice": "{{choices}}",
                "doc_to_target": "gold", "target_delimiter": "",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                "metadata": {"version": 1.0}}
        (tdir / f"{task}.yaml").write_text(json.dumps(spec, indent=1))
        tasks.append(task)
    return tasks, idmap


def grid(models, a, env, tmp: Path, out: dict, save, zs: dict | None = None) -> dict:
    """Fills ``out`` step by step (``save`` after each), so a run stopped half way keeps what it measured."""
    from rayeval.eval.pipeline import build_work
    from rayeval.eval.plan import plan_config
    from rayeval.models import resolve_model

    # plan on the slice the targets name
    cfg = grid_config(models, a.plan_subjects, a.plan_items, a.plan_arc, "grid_plan")
    p = plan_config(cfg, use_cache=False)
    out["plan"] = p.to_dict()
    save()
    for m in p.models:
        log(f"plan {m.model}: requested {m.tokens_requested:,}, trie {m.trie_minimum:,}, to compute {m.to_compute:,} "
            f"({m.to_compute / m.trie_minimum:.3f}x trie, {m.sharing:.2f}x less than requested)")
    # end to end, rayeval
    # An empty score cache of its own (the engine's ``cache:`` path; $RAYEVAL_CACHE would also move
    # the prepared models, and the run would convert them again)
    from rayeval.eval.pipeline import run_eval

    cfg = grid_config(models, a.e2e_subjects, a.e2e_items, a.e2e_arc, "grid_e2e", cache=str(tmp / "cache_e2e"))
    probe("grid: before rayeval")
    t0 = time.perf_counter()
    res = run_eval(cfg, tmp / "e2e", resume=False, report=False)
    wall = time.perf_counter() - t0
    probe("grid: after rayeval")
    out["rayeval_e2e"] = {"wall_s": wall, "rows": res["rows"], "accounting": res["accounting"], "runs_s": [wall]}
    save()
    log(f"rayeval end to end: {wall:.1f}s, {res['rows']} rows")
    import pandas as pd

    rows = pd.read_parquet(tmp / "e2e" / "rows.parquet")
    if a.e2e_shared:  # the same run with every model's engine in one actor (engine.pools: shared)
        t0 = time.perf_counter()
        shared = run_eval(grid_config(models, a.e2e_subjects, a.e2e_items, a.e2e_arc, "grid_e2e",
                                      cache=str(tmp / "cache_e2e_shared"), pools="shared"),
                          tmp / "e2e_shared", resume=False, report=False)
        out["rayeval_e2e_shared"] = {"wall_s": time.perf_counter() - t0, "accounting": shared["accounting"]}
        other = pd.read_parquet(tmp / "e2e_shared" / "rows.parquet")
        out["rayeval_e2e_shared"]["same_predictions"] = float((rows.pred_none.values == other.pred_none.values).mean())
        save()
        log(f"rayeval end to end, one shared actor: {out['rayeval_e2e_shared']['wall_s']:.1f}s "
            f"(pool per model {wall:.1f}s); same predictions {out['rayeval_e2e_shared']['same_predictions']:.4f}")
    works, _ = build_work(cfg)
    if env is not None:
        # lm-eval runs with no Ray beside it (the local cluster's helper actors use ~1% of a core
        # while idle); the added-setting runs below start one again
        from rayeval.cluster import shutdown

        shutdown()

        def again(label: str) -> None:
            """rayeval's end-to-end run once more (a score cache of its own, empty), Ray shut down
            after it: lm-eval's minutes average over the host's phases, one rayeval run does not,
            so rayeval runs between and after lm-eval's models too and the ratio takes the median."""
            probe(f"grid: before rayeval ({label})")
            t0 = time.perf_counter()
            run_eval(grid_config(models, a.e2e_subjects, a.e2e_items, a.e2e_arc, "grid_e2e",
                                 cache=str(tmp / f"cache_e2e_{label}")), tmp / f"e2e_{label}", resume=False, report=False)
            out["rayeval_e2e"]["runs_s"].append(time.perf_counter() - t0)
            probe(f"grid: after rayeval ({label})")
            shutdown()
            log(f"rayeval end to end again ({label}): {out['rayeval_e2e']['runs_s'][-1]:.1f}s")
            save()

        tasks, idmap = lmeval_grid_tasks(works, tmp)
        out["lm_eval_hf"] = {}
        for k, model in enumerate(models):
            if k:
                again(f"before lm-eval {model}")
            batch = lmeval_batch(model, works)
            d = None
            probe(f"grid: before lm-eval {model}")
            for b in (batch, max(1, batch // 4)):  # a second try only if the estimate was off
                try:
                    d = es.run_lmeval("hf", str(resolve_model(model)), dict(env), tmp, tasks, {k: k for k in idmap},
                                      dtype="float32" if not _bf16() else "bfloat16", batch_size=b,
                                      extra_env={"OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))}, timeout=5400,
                                      add_bos=_bos(model))
                    d["batch_size"] = b
                    break
                except RuntimeError as e:  # e.g. killed for memory
                    out["lm_eval_hf"][model] = {"error": f"batch {b}: " + str(e).splitlines()[0]}
                    log(f"lm-eval HF {model}: batch {b}: {str(e).splitlines()[0]}")
                    save()
                    if b == 1:
                        break
            probe(f"grid: after lm-eval {model}")
            if d is None:
                continue
            mine = rows[rows.model == model].set_index(["dataset", "setting", "scoring", "item_id", "rotation"])
            same = sum(int(mine.loc[idmap[k], "pred_none"]) == v for k, v in d["preds"].items())
            out["lm_eval_hf"][model] = {"eval_s": d["eval_s"], "wall_s": d["wall_s"], "n_requests": d["n_requests"],
                                        "agreement": same / len(d["preds"]), "docs": len(d["preds"]),
                                        "batch_size": d["batch_size"]}
            log(f"lm-eval HF {model}: eval {d['eval_s']:.1f}s (wall {d['wall_s']:.1f}s), agreement "
                f"{same / len(d['preds']):.4f}")
            save()
        again("after lm-eval")
        runs = sorted(out["rayeval_e2e"]["runs_s"])
        wall = out["rayeval_e2e"]["median_s"] = runs[len(runs) // 2]
        lm_total = sum(v.get("wall_s", 0.0) for v in out["lm_eval_hf"].values())
        out["e2e_ratio"] = lm_total / wall
        out["e2e_ratio_first_run"] = lm_total / out["rayeval_e2e"]["wall_s"]
        failed = [m for m, v in out["lm_eval_hf"].items() if "error" in v]
        if failed:
            out["e2e_ratio_note"] = f"lm-eval failed on {', '.join(failed)}: its time counts as 0 s, rayeval's includes it"
        log(f"end to end: lm-eval {lm_total:.1f}s vs rayeval {wall:.1f}s (median of "
            f"{[round(x, 1) for x in out['rayeval_e2e']['runs_s']]}) = {out['e2e_ratio']:.2f}x")
        if zs and all(m in zs and "floor_params" in zs[m]["roofline"] for m in models):
            # the least time any exact evaluator needs on this host: the trie's tokens through the
            # linear weights none can skip, at this run's fastest matmul rate (all cores) for each
            # model's own shapes; attention, the head and starting count nothing
            acc = out["rayeval_e2e"]["accounting"]["models"]
            floor = {m: 2 * zs[m]["roofline"]["floor_params"] * acc[m]["trie_minimum"]
                     / (zs[m]["roofline"]["matmul_gflops"][zs[m]["roofline"]["best"]] * 1e9) for m in models}
            out["e2e_floor"] = {"models_s": floor, "matmul_s": sum(floor.values()),
                                "best_ratio": lm_total / sum(floor.values())}
            save()
            log(f"end to end: the matmul floor of any exact evaluator is {sum(floor.values()):.1f}s: "
                f"lm-eval / floor = {out['e2e_floor']['best_ratio']:.2f}x")
    # an added setting on a finished grid
    drop = a.added_setting
    added = str(tmp / "cache_added")
    run_eval(grid_config(models, a.e2e_subjects, a.e2e_items, a.e2e_arc, "grid_minus", drop=drop, cache=added),
             tmp / "minus", resume=False, report=False)
    t0 = time.perf_counter()
    full = run_eval(grid_config(models, a.e2e_subjects, a.e2e_items, a.e2e_arc, "grid_e2e", cache=added), tmp / "plus",
                    resume=False, report=False)
    out["added_setting"] = {"setting": drop, "wall_s": time.perf_counter() - t0, "models": {}}
    only = grid_config(models, a.e2e_subjects, a.e2e_items, a.e2e_arc, "grid_only")
    only = dataclasses.replace(only, settings=[s for s in only.settings if s.name == drop])
    share = plan_config(only, use_cache=False)
    whole = plan_config(cfg, use_cache=False)
    for m, ms, mw in zip(models, share.models, whole.models):
        got = full["accounting"]["models"][m]["tokens_computed"]
        out["added_setting"]["models"][m] = {"computed": got, "setting_alone": ms.to_compute,
                                             "full_grid": mw.to_compute, "ratio_to_share": got / max(ms.to_compute, 1)}
        log(f"added setting {drop} ({m}): computed {got:,} tokens; the setting alone plans {ms.to_compute:,}, "
            f"the whole grid {mw.to_compute:,}")
    return out


def lmeval_batch(model: str, works) -> int:
    """lm-eval's batch for this model on these works: the largest power of two up to 64 whose
    log-probabilities (batch x longest sequence x vocabulary, model dtype, with as much again for
    lm-eval's log-softmax and the logit soft-capping temporaries: 8 bytes an entry) fit in half
    of MemAvailable."""
    from transformers import AutoConfig, AutoTokenizer

    from rayeval.models import resolve_model

    path = str(resolve_model(model))
    cfg = AutoConfig.from_pretrained(path)
    vocab = int(getattr(cfg, "vocab_size", None) or cfg.get_text_config().vocab_size)
    tok = AutoTokenizer.from_pretrained(path)
    texts = sorted({r.prompt + max((c for c in (r.continuations or ("",))), key=len)
                    for w in works for r in w.requests}, key=len)[-32:]  # the longest by characters
    longest = max(len(tok(t)["input_ids"]) for t in texts) + 1
    avail = next(int(x.split()[1]) * 1024 for x in open("/proc/meminfo") if x.startswith("MemAvailable"))
    b = 64
    while b > 1 and b * longest * vocab * 8 > avail / 2:
        b //= 2
    log(f"lm-eval batch for {model}: {b} (longest sequence {longest} tokens, vocabulary {vocab:,}, "
        f"{avail / 2**30:.1f} GiB available)")
    return b


def _bos(model: str) -> bool:
    from rayeval.models import get_spec

    return get_spec(model).add_bos


def _bf16() -> bool:
    from rayeval.eval.engines import cpu_has_bf16

    return cpu_has_bf16()


def render(R: dict) -> str:
    c = R["cpu"]
    L = [f"# Grid benchmark, {R['date']}", "",
         f"CPU: {c['model']}, {c['cores']} cores; flags {' '.join(c['flags'])}; native bf16: {R['native_bf16']}. "
         f"Load average {R['loadavg_start'][0]:.1f} at start, "
         + (f"{R['loadavg_end'][0]:.1f} at end." if R.get("loadavg_end") else "no reading at the end (the run stopped early).")
         , ""]
    if R.get("zero_shot"):
        nan = float("nan")
        L += ["## Zero-shot symbol scoring (MMLU, three subjects)", "",
              "| model | questions | rayeval default (q/s) | roofline ceiling (q/s) | % of roofline | sharing bound (q/s) | "
              "lm-eval HF (q/s) | rayeval / lm-eval | agreement | fp32 ref vs rayeval / vs lm-eval |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m, z in R["zero_shot"].items():
            r, lm, ref = z["rayeval"], z.get("lm_eval_hf", {}), z.get("fp32_reference", {})
            L.append(f"| {m} | {z['n']} | {r['q_per_s']:.2f} ({r['dtype']}, {r['threads']}t, {r.get('attention', 'sdpa')}) | "
                     f"{z['roofline']['ceiling_q_per_s']:.2f} ({z['roofline']['best']}) | {r['pct_of_roofline']:.1f}% | "
                     f"{r.get('sharing_bound_q_per_s', nan):.1f} | "
                     f"{lm.get('q_per_s', nan):.2f} | {r.get('x_lm_eval', nan):.2f}x | "
                     f"{lm.get('agreement_with_rayeval', nan):.3f} | "
                     f"{ref.get('agreement_rayeval_bf16', nan):.3f} / {lm.get('agreement_with_fp32_reference', nan):.3f} |")
        L += ["", "rayeval: `make_engine(\"hf\", model)` with its defaults; one warm-up call on the same questions "
              "(engine start and kernel compilation: " + ", ".join(
                  f"{m} {z['rayeval'].get('start_and_warm_up_s', nan):.0f} s" for m, z in R["zero_shot"].items())
              + "), then the fastest of three timed calls (median: " + ", ".join(
                  f"{m} {z['rayeval'].get('median_q_per_s', nan):.1f} q/s" for m, z in R["zero_shot"].items())
              + "), as the roofline is the fastest of its rounds. lm-eval: one timed `simple_evaluate`, "
              "model load excluded."]
        for m, z in R["zero_shot"].items():
            r, lm = z["rayeval"], z.get("lm_eval_hf", {})
            if "pct_of_roofline" in lm:
                L += ["", f"{m}: lm-eval runs at {lm['pct_of_roofline']:.1f}% of the roofline; 4x lm-eval is "
                      f"{4 * lm['q_per_s']:.1f} q/s, and the sharing bound {r['sharing_bound_q_per_s']:.1f} q/s allows "
                      f"at most {r['best_x_lm_eval']:.2f}x on this host."]
        L += ["", "Sharing bound: the ceiling x tokens the prompts hold / tokens rayeval computes (the subject "
              "header is shared). fp32 reference: rayeval's HF engine in fp32 with every prompt alone (no sharing, "
              "eager kernels); its agreement with each bf16 run is how much bf16 rounding alone moves predictions."]
        L += ["", "Matmul rates measured in this run (GFLOP/s): " + "; ".join(
            f"{m}: " + ", ".join(f"{k} {v:.0f}" for k, v in z["roofline"]["matmul_gflops"].items())
            for m, z in R["zero_shot"].items()), ""]
    g = R.get("grid")
    if g and "plan" in g:
        L += ["## Paper grid slice: tokens", "", "| model | tokens requested | trie minimum | rayeval computes | "
              "/ trie | requested / computed |", "|---|---:|---:|---:|---:|---:|"]
        for m in g["plan"]["models"]:
            L.append(f"| {m['model']} | {m['tokens_requested']:,} | {m['trie_minimum']:,} | {m['to_compute']:,} | "
                     f"{m['to_compute'] / m['trie_minimum']:.3f}x | {m['sharing']:.2f}x |")
        L += ["", f"Slice for the token counts: {R['args']['plan_subjects']} MMLU subjects x {R['args']['plan_items']} "
              f"items + {R['args']['plan_arc']} ARC items, all 25 settings of eval_paper_grid, their scorings.", ""]
        if "lm_eval_hf" in g and "rayeval_e2e" in g:
            L += ["## Paper grid slice: end to end against lm-eval", "",
                  f"Slice: {R['args']['e2e_subjects']} MMLU subject(s) x {R['args']['e2e_items']} items + "
                  f"{R['args']['e2e_arc']} ARC items, all settings and scorings, both models.", "",
                  f"rayeval `run_eval` (Ray Data, engine auto, empty cache): {g['rayeval_e2e']['wall_s']:.1f} s, "
                  f"{g['rayeval_e2e']['rows']} rows; stages: " + ", ".join(
                      f"{k} {v}" for k, v in g['rayeval_e2e']['accounting'].get('stages', {}).items()) + "; per model: "
                  + ", ".join(f"{m} engine {v.get('engine_s')} s, {v.get('tokens_computed', 0):,} tokens computed of "
                              f"{v.get('tokens_requested', 0):,} requested"
                              for m, v in g['rayeval_e2e']['accounting'].get('models', {}).items()) + ".", "",
                  "| model | lm-eval HF wall s | lm-eval requests | prediction agreement |", "|---|---:|---:|---:|"]
            for m, v in g["lm_eval_hf"].items():
                if "error" in v:
                    L.append(f"| {m} | {v['error']} | | |")
                    continue
                L.append(f"| {m} | {v['wall_s']:.1f} (batch {v.get('batch_size', 64)}) | {v['n_requests']:,} | "
                         f"{v['agreement']:.4f} ({v['docs']} docs) |")
            sh = g.get("rayeval_e2e_shared")
            if sh:
                L += ["", f"Side by side in this run: the default (`engine.pools: model`, an actor per model, each "
                      f"engine alone in its process) {g['rayeval_e2e']['wall_s']:.1f} s; `pools: shared` (one actor "
                      f"hosting both engines, side by side in threads) {sh['wall_s']:.1f} s, engines " + ", ".join(
                          f"{m} {v.get('engine_s')} s" for m, v in sh['accounting'].get('models', {}).items())
                      + f" ({sh['wall_s'] / g['rayeval_e2e']['wall_s']:.2f}x the default's wall); same predictions "
                      f"on {sh['same_predictions']:.2%} of rows."]
            if "e2e_ratio" in g:
                runs = g["rayeval_e2e"].get("runs_s", [])
                L += ["", f"**End to end: lm-eval / rayeval = {g['e2e_ratio']:.2f}x**"
                      + (f" ({g['e2e_ratio_note']})" if g.get("e2e_ratio_note") else "")
                      + (f": rayeval's median of {len(runs)} runs, " + " / ".join(f"{x:.1f}" for x in runs)
                         + " s (the first, one between lm-eval's models, one after them; lm-eval's minutes average "
                           f"over the host's phases, one rayeval run does not); the first run alone: "
                           f"{g['e2e_ratio_first_run']:.2f}x" if len(runs) > 1 else ""), ""]
            f = g.get("e2e_floor")
            if f:
                L += ["The floor of any exact evaluator on this host: the trie's tokens through the linear weights "
                      "none can skip (every layer's but the last one's query, output and feed-forward), at this run's "
                      "fastest matmul rate for each model's shapes on all cores: " + ", ".join(
                          f"{m} {v:.1f} s" for m, v in f["models_s"].items())
                      + f", {f['matmul_s']:.1f} s in all (attention, the head and start-up count nothing); "
                      f"lm-eval / floor = **{f['best_ratio']:.2f}x**, the most any exact evaluator reaches here "
                      f"(rayeval: {g['e2e_ratio']:.2f}x, its wall "
                      f"{g['rayeval_e2e'].get('median_s', g['rayeval_e2e']['wall_s']) / f['matmul_s']:.2f}x "
                      f"the floor).", ""]
        a = g.get("added_setting")
        if a:
            L += [f"## A finished grid plus one setting (`{a['setting']}`)", "",
                  "| model | tokens computed by the rerun | the setting's own plan | whole grid's plan | rerun / setting |",
                  "|---|---:|---:|---:|---:|"]
            for m, v in a["models"].items():
                L.append(f"| {m} | {v['computed']:,} | {v['setting_alone']:,} | {v['full_grid']:,} | "
                         f"{v['ratio_to_share']:.2f} |")
            L.append("")
    if R.get("probes"):
        L += ["## The host's matmul rate at each timed step", "",
              "bf16 matmuls on SmolLM2's MLP shape (4,096 x 576 x 1,536), every core, the fastest of five rounds "
              "of 12 after 0.2 s of warm-up, in the bench's process between the steps. A ratio of two timings compares the evaluators only where the probes "
              "beside both read alike.", "", "| step | UTC | GFLOP/s |", "|---|---|---:|"]
        L += [f"| {p['label']} | {p['time']} | {p['gflops']:,} |" for p in R["probes"]]
        L.append("")
    return "\n".join(L)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--zero-shot-n", type=int, default=532, help="0 skips part A")
    ap.add_argument("--plan-subjects", type=int, default=4)
    ap.add_argument("--plan-items", type=int, default=25)
    ap.add_argument("--plan-arc", type=int, default=50)
    ap.add_argument("--e2e-subjects", type=int, default=2)
    ap.add_argument("--e2e-items", type=int, default=25)
    ap.add_argument("--e2e-arc", type=int, default=25)
    ap.add_argument("--added-setting", default="shot5_fixed_B")
    ap.add_argument("--no-e2e-shared", dest="e2e_shared", action="store_false",
                    help="skip the end-to-end run with one actor hosting every model (engine.pools: shared)")
    ap.add_argument("--skip-grid", action="store_true")
    ap.add_argument("--skip-lm-eval", action="store_true")
    ap.add_argument("--lm-eval-path", default=os.environ.get("LMEVAL_PATH", "/tmp/lmeval-site"))
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    tmp = Path(tempfile.mkdtemp(prefix="rayeval-grid-"))
    env = None if a.skip_lm_eval else es.lmeval_env(a.lm_eval_path)
    if env is None and not a.skip_lm_eval:
        log("lm-eval is not importable (see bench/README.md): lm-eval rows skipped")
    R: dict = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_info(),
               "native_bf16": _bf16(), "loadavg_start": os.getloadavg(), "args": vars(a)}

    R["probes"] = PROBES

    def save():
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out + ".json").write_text(json.dumps(R, indent=1, default=str))
            Path(a.out + ".md").write_text(render(R) + "\n")

    if a.zero_shot_n:
        R["zero_shot"] = {}
        for m in models:
            R["zero_shot"][m] = zero_shot(m, a.zero_shot_n, env, tmp)
            save()
    if not a.skip_grid:
        R["grid"] = {}
        grid(models, a, env, tmp, R["grid"], save, R.get("zero_shot"))
    R["loadavg_end"] = os.getloadavg()
    save()
    print(render(R))
    return R


if __name__ == "__main__":  # lm-eval's and Ray's subprocesses need the guard
    main()
