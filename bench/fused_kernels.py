"""The HF engine's fused elementwise kernels, measured side by side in ONE run.

    .venv/bin/python bench/fused_kernels.py --out bench/results/kernels-DATE-CPU

Three kernel sets per model, each scoring the same work in interleaved rounds (the order turns each
round; the fastest round of each is reported, so a load spike hurts none), in one process:

  eager       ``fuse: false``: transformers' own modules, one op at a time
  modules     each RMSNorm, the MLP's ``act(gate) * up`` and the model's own ``apply_rotary_pos_emb``
              compiled alone (the kernel set before the decoder layers were fused)
  layers      the default: as ``modules``, plus each decoder layer's residual adds fused into the
              norms beside them and the rotary embedding on halves of the head dimension

Two workloads (``bench/packed_passes.py``'s): zero-shot symbol MMLU questions in one call on every
core (what ``make_engine("hf", model)`` gets), and the paper grid's first ``--paper-works`` work
units in the packaged config's shards on one thread (what each model's actor gets in a grid run).

On a CPU with AVX512-BF16 the bf16 engines run rayeval's C kernels wherever they apply
(``rayeval.eval.fused.c_kernels``): ``modules`` and ``layers`` then measure those;
``RAYEVAL_CPU_KERNELS=0`` measures the compiled functions instead.

For each: seconds, units per second, speed-up against ``modules``, and the prediction agreement with
``modules`` and with an fp32 reference (``fuse: false``, fp32, no prefix sharing: what bf16 rounding
alone moves).  The rotary function is a module global of the model's transformers module, so the
bench swaps it per kernel set.  Results: ``OUT.json`` and ``OUT.md`` with the CPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_speed as es  # noqa: E402
import packed_passes as pp  # noqa: E402
from grid_speed import cpu_info  # noqa: E402
from results_io import write_table  # noqa: E402

SETS = ("eager", "modules", "layers")


def build(model: str, kind: str, threads: int, mod, plain_rotary):
    """An engine with kernel set ``kind``; returns it and the rotary function it needs installed."""
    from rayeval.eval.engines import make_engine
    from rayeval.eval.fused import fuse_elementwise, logsumexp_fp32

    mod.apply_rotary_pos_emb = plain_rotary  # each set installs its own from the module's function
    eng = make_engine("hf", model, {"num_threads": threads, "max_model_len": 2048, "fuse": False})
    if kind != "eager":
        eng.fused = fuse_elementwise(eng.model, layers=kind == "layers", rotary="halves" if kind == "layers" else "module")
        eng._lse = logsumexp_fp32(compiled=True)
    return eng, mod.apply_rotary_pos_emb


def run(model: str, n_q: int, paper_works: int, rounds: int) -> list[dict]:
    import torch

    from rayeval.eval.engines import make_engine

    wl = pp.workloads(model, n_q, 0, paper_works)
    out = []
    for name in ("zero-shot", "paper grid"):
        works, shard, threads = wl[name]
        threads = threads if threads == 1 else len(os.sched_getaffinity(0))
        ref = make_engine("hf", model, {"dtype": "float32", "prefix_sharing": False, "fuse": False, "max_model_len": 2048})
        ref_preds = pp.work_preds(works, pp.score(ref, works, shard))
        # the transformers module whose apply_rotary_pos_emb the model calls (what fused.py patches)
        mod = importlib.import_module(type(ref.model).__module__)
        plain = getattr(mod.apply_rotary_pos_emb, "_rayeval_plain", mod.apply_rotary_pos_emb)
        del ref
        engines = {kind: build(model, kind, threads, mod, plain) for kind in SETS}
        best: dict[str, float] = {}
        preds: dict[str, dict] = {}
        for eng, rot in engines.values():  # warm-up: compiled kernels, allocator
            mod.apply_rotary_pos_emb = rot
            eng.score([r for w in works[:8] for r in w.requests])
        for r in range(rounds):
            for kind in SETS[r % len(SETS):] + SETS[:r % len(SETS)]:
                eng, rot = engines[kind]
                mod.apply_rotary_pos_emb = rot
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                res = pp.score(eng, works, shard)
                dt = time.perf_counter() - t0
                preds[kind] = pp.work_preds(works, res)
                best[kind] = min(best.get(kind, dt), dt)
                print(f"[kernels {time.strftime('%H:%M:%S')}] {model} {name} {kind}: {dt:.2f}s", flush=True)
        mod.apply_rotary_pos_emb = plain
        for kind in SETS:
            eng = engines[kind][0]
            out.append({"model": model, "workload": name, "kernels": kind, "fused": list(getattr(eng, "fused", [])),
                        "works": len(works), "threads": threads, "dtype": eng.dtype,
                        "seconds": round(best[kind], 2), "units_per_s": round(len(works) / best[kind], 2),
                        "speedup_vs_modules": round(best["modules"] / best[kind], 3),
                        "agreement_vs_modules": es.agreement(preds["modules"], preds[kind]),
                        "agreement_vs_fp32": es.agreement(ref_preds, preds[kind])})
            print(json.dumps(out[-1]), flush=True)
        del engines
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--zero-shot-n", type=int, default=456)
    ap.add_argument("--paper-works", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    load0, started = os.getloadavg(), time.strftime("%H:%M UTC", time.gmtime())
    rows = [r for m in a.models.split(",") for r in run(m, a.zero_shot_n, a.paper_works, a.rounds)]
    write_table(a.out, "HF engine: fused kernel sets side by side", cpu_info(), load0, started,
                f"Fastest of {a.rounds} interleaved rounds per set.", rows,
                [("model<", "{model}"), ("workload<", "{workload}"), ("kernels<", "{kernels}"), ("units", "{works}"),
                 ("threads", "{threads}"), ("dtype<", "{dtype}"), ("s", "{seconds}"), ("units/s", "{units_per_s}"),
                 ("speed-up vs modules", "{speedup_vs_modules:.3f}x"), ("agreement vs modules", "{agreement_vs_modules:.3f}"),
                 ("agreement vs fp32", "{agreement_vs_fp32:.3f}")], rounds=a.rounds)

if __name__ == "__main__":
    main()
