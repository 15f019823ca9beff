"""The HF engine's forward-pass schedules, measured side by side in ONE run.

    .venv/bin/python bench/packed_passes.py --out bench/results/packed-DATE-CPU

Three workloads per model, each scored by every variant in interleaved rounds (the order turns
each round; the fastest round of each variant is reported, so a load spike hurts none):

  zero-shot   zero-shot symbol MMLU questions (``grid_speed`` part A's three subjects), one call,
              every core (what ``make_engine("hf", model)`` gets)
  main grid   the main job's grid (``eval_pipeline``: 6 settings, three scorings on the baseline)
              in prompt order, its first ``--works`` work units in shards of 128, one thread
              (what each model gets in the main job's actor)
  paper grid  the paper grid (``eval_paper_grid``: 25 settings, three scorings) on grid_speed's
              end-to-end slice, its first ``--paper-works`` units in the packaged config's shards
              (256), one thread: deep, narrow prefix tries

  padded      ``packed: false``: a trie level per pass, rows right-padded to the longest
              (``min_fill`` bucketing keeps padding small, at the price of many small passes)
  levels      packed passes, but a trie level per pass (the schedule before passes ran across
              levels; reproduced here by replacing the engine's ``_passes``)
  packed      the default: a pass is one sequence of real tokens up to ``max_tokens_per_batch``
              for the linear layers, from one trie level or several; attention per group of rows

For each: seconds, questions or work units per second, forward passes, tokens the linear layers
processed (padding included), and the largest log-probability difference and the prediction
agreement against the first variant (per work unit).  Results: ``OUT.json`` and ``OUT.md`` with the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_speed as es  # noqa: E402
from results_io import write_table  # noqa: E402
from grid_speed import SUBJECTS, cpu_info  # noqa: E402


def counting(eng):
    """Wrap the engine's pass functions to count passes and processed tokens."""
    c = {"passes": 0, "processed": 0}
    fwd, packed = eng._forward, eng._forward_packed

    def padded_pass(batch, trie, *a):
        c["passes"] += 1
        c["processed"] += len(batch) * max(sum(trie.hi[x] - trie.lo[x] for x in row) for row in batch)
        return fwd(batch, trie, *a)

    def packed_pass(groups, trie, *a):
        c["passes"] += 1
        c["processed"] += sum(trie.hi[x] - trie.lo[x] for g in groups for row in g for x in row)
        return packed(groups, trie, *a)

    eng._forward, eng._forward_packed = padded_pass, packed_pass
    return c


def level_passes(eng):
    """Make ``eng`` run a trie level per packed pass (the schedule before cross-level passes)."""
    passes = eng._passes
    eng._passes = lambda trie: passes(trie, per_level=True)
    return eng


def workloads(model: str, n_q: int, n_works: int, paper_works: int):
    from grid_speed import grid_config

    from rayeval.eval.config import load_eval_config
    from rayeval.eval.pipeline import build_work, make_shards

    cfg = es.make_config(model, SUBJECTS[:3], es.per_subject_limit(n_q, SUBJECTS[:3]), 64)
    zs, _ = build_work(cfg)
    zs = [w for s in make_shards(zs, len(zs)) for w in s]
    grid, _ = build_work(load_eval_config("eval_pipeline"))
    grid = [w for s in make_shards(grid, 10**9) for w in s][:n_works]
    paper = grid_config([model], 2, 25, 25, "paper_grid", cache=False)
    pw, _ = build_work(paper)
    pw = [w for s in make_shards(pw, paper.batch_size) for w in s][:paper_works]
    return {"zero-shot": (zs, None, len(zs)), "main grid": (grid, 128, 1), "paper grid": (pw, paper.batch_size, 1)}

def work_preds(works, results) -> dict:
    """Every work unit's prediction (a unit: item x setting x scoring x rotation)."""
    from rayeval.eval.scoring import reduce_all

    return {(r["dataset"], r["setting"], r["scoring"], r["item_id"], r["rotation"]): int(r["prediction"])
            for r in reduce_all(works, results)}


def score(eng, works, shard):
    res = []
    step = shard or len(works)
    for i in range(0, len(works), step):
        res += eng.score([r for w in works[i:i + step] for r in w.requests])
    return res


def run(model: str, n_q: int, n_works: int, paper_works: int, rounds: int, variants: list[str]) -> list[dict]:
    import torch

    from rayeval.eval.engines import make_engine

    out = []
    for name, (works, shard, threads) in workloads(model, n_q, n_works, paper_works).items():
        threads = threads if threads == 1 else len(os.sched_getaffinity(0))
        engines = {}
        for v in variants:
            e = make_engine("hf", model, {"packed": v != "padded", "num_threads": threads, "max_model_len": 2048})
            engines[v] = level_passes(e) if v == "levels" else e
        counts = {v: counting(e) for v, e in engines.items()}
        best: dict[str, dict] = {}
        results: dict[str, list] = {}
        for e in engines.values():   # warm-up: compiled kernels, allocator
            e.score([r for w in works[:4] for r in w.requests])
        for r in range(rounds):
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                eng = engines[v]
                torch.set_num_threads(threads)
                counts[v].update(passes=0, processed=0)
                t0 = time.perf_counter()
                res = score(eng, works, shard)
                dt = time.perf_counter() - t0
                results[v] = res
                if v not in best or dt < best[v]["seconds"]:
                    best[v] = {"seconds": dt, **counts[v]}
                print(f"[packed {time.strftime('%H:%M:%S')}] {model} {name} {v}: {dt:.1f}s", flush=True)
        ref = variants[0]
        a = [x for r in results[ref] for x in (r.symbol_logprobs or r.continuation_logprobs or [])]
        pa = work_preds(works, results[ref])
        for v in variants:
            s = best[v]
            b = [x for r in results[v] for x in (r.symbol_logprobs or r.continuation_logprobs or [])]
            out.append({"model": model, "workload": name, "variant": v, "works": len(works), "threads": threads,
                        "dtype": engines[v].dtype, "seconds": round(s["seconds"], 2),
                        "units_per_s": round(len(works) / s["seconds"], 2), "passes": s["passes"],
                        "tokens_processed": s["processed"], "reference": ref,
                        "speedup_vs_reference": round(best[ref]["seconds"] / s["seconds"], 3),
                        "max_abs_logprob_diff": max(abs(x - y) for x, y in zip(a, b)),
                        "prediction_agreement": es.agreement(pa, work_preds(works, results[v]))})
            print(json.dumps(out[-1]), flush=True)
        del engines
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--zero-shot-n", type=int, default=456)
    ap.add_argument("--works", type=int, default=256)
    ap.add_argument("--paper-works", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--variants", default="padded,levels,packed", help="the first is the reference")
    a = ap.parse_args()
    variants = a.variants.split(",")
    load0, started = os.getloadavg(), time.strftime("%H:%M UTC", time.gmtime())
    rows = [r for m in a.models.split(",") for r in run(m, a.zero_shot_n, a.works, a.paper_works, a.rounds, variants)]
    write_table(a.out, "HF engine: forward-pass schedules side by side", cpu_info(), load0, started,
                f"Fastest of {a.rounds} interleaved rounds per variant.", rows,
                [("model<", "{model}"), ("workload<", "{workload}"), ("variant<", "{variant}"), ("units", "{works}"),
                 ("threads", "{threads}"), ("dtype<", "{dtype}"), ("s", "{seconds}"), ("units/s", "{units_per_s}"),
                 ("passes", "{passes}"), ("tokens processed", "{tokens_processed:,}"),
                 (f"speed-up vs {variants[0]}", "{speedup_vs_reference:.2f}x"),
                 ("max abs logprob diff", "{max_abs_logprob_diff:.1e}"), ("prediction agreement", "{prediction_agreement:.3f}")],
                rounds=a.rounds)

if __name__ == "__main__":
    main()
