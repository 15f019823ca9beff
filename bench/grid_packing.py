"""How the HF engine packs a grid's prefix trie into forward passes, measured side by side in ONE run.

    .venv/bin/python bench/grid_packing.py --out bench/results/packing-DATE --works 256

The main job's evaluation grid (``eval_pipeline``: 6 settings, three scorings on the baseline, 160
MMLU/ARC items) in prompt order, its first ``--works`` work units, scored by ``HFEngine`` on one
thread per model (what each model gets in the main job's actor), in shards of ``shard`` works:

  before   shards of 32 works, ``min_fill: 0`` (rows of any length share a forward pass),
           ``head_rows: 0`` (the vocabulary head after every forward pass)
  after    shards of 128 works, ``min_fill: 0.75`` (a row shorter than 3/4 of the longest in its
           pass opens a new pass), ``head_rows: 256`` (the head once over all read positions of a
           call, 256 at a time): the main job's configuration now
  and the three changes one at a time.

For each: seconds, tokens computed (real trie tokens), tokens the forward passes processed
(padding included), passes, tokens/s.  Scores must agree (same jobs, same positions).
Results: ``OUT.json`` and ``OUT.md`` with the CPU model, flags and load.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import cpu_sentence, write_markdown  # noqa: E402
from grid_speed import cpu_info  # noqa: E402

# (name, works per shard, min_fill, head_rows)
VARIANTS = [("before", 32, 0.0, 0), ("packing only", 32, 0.75, 0), ("shards only", 128, 0.0, 0),
            ("head batched only", 32, 0.0, 256), ("after", 128, 0.75, 256)]


def run(model: str, n: int) -> list[dict]:
    from rayeval.eval.config import load_eval_config
    from rayeval.eval.engines import HFEngine, make_engine
    from rayeval.eval.pipeline import build_work, make_shards

    works, _ = build_work(load_eval_config("eval_pipeline"))
    ordered = [w for s in make_shards(works, 10**9) for w in s][:n]
    eng = make_engine("hf", model, {"num_threads": 1, "max_model_len": 1024, "packed": False})  # the padded passes it measures
    passes = {"n": 0, "padded": 0}
    orig = HFEngine._forward

    def counted(self, batch, trie, *a):
        passes["n"] += 1
        passes["padded"] += len(batch) * max(sum(trie.hi[x] - trie.lo[x] for x in row) for row in batch)
        return orig(self, batch, trie, *a)

    HFEngine._forward = counted
    out, ref = [], None
    try:
        for name, shard, fill, head in VARIANTS:
            eng.min_fill, eng.head_rows = fill, head
            passes.update(n=0, padded=0)
            before = eng.stats["tokens_computed"]
            t0 = time.perf_counter()
            scores = []
            for i in range(0, len(ordered), shard):
                res = eng.score([r for w in ordered[i:i + shard] for r in w.requests])
                scores += [x for r in res for x in (r.symbol_logprobs or r.continuation_logprobs or [])]
            dt = time.perf_counter() - t0
            tokens = eng.stats["tokens_computed"] - before
            ref = ref or scores
            out.append({"model": model, "variant": name, "shard_works": shard, "min_fill": fill, "head_rows": head,
                        "seconds": round(dt, 1),
                        "tokens_computed": tokens, "tokens_processed": passes["padded"], "passes": passes["n"],
                        "tokens_per_s": round(tokens / dt, 1),
                        "max_abs_diff_vs_before": max(abs(a - b) for a, b in zip(scores, ref))})
            print(json.dumps(out[-1]), flush=True)
    finally:
        HFEngine._forward = orig
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--works", type=int, default=256)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    a = ap.parse_args()
    load0 = os.getloadavg()
    rows = [r for m in a.models.split(",") for r in run(m, a.works)]
    c = cpu_info()
    res = {"date": _dt.date.today().isoformat(), "cpu": c, "load_start": load0, "load_end": os.getloadavg(),
           "works": a.works, "rows": rows}
    Path(a.out + ".json").write_text(json.dumps(res, indent=1))
    lines = [f"# HF engine packing on the main job's grid ({res['date']})", "",
             cpu_sentence(c, load0, res["load_end"]) + " " + f"First {a.works} work units of `eval_pipeline` in "
             "prompt order, one thread per model, fp32.", "",
             "| model | variant | works/shard | min_fill | head_rows | s | tokens computed | tokens processed (with padding) | "
             "passes | tokens/s | speed-up vs before | max abs diff vs before |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["variant"] == "before")
        lines.append(f"| {r['model']} | {r['variant']} | {r['shard_works']} | {r['min_fill']} | {r['head_rows']} | {r['seconds']} | "
                     f"{r['tokens_computed']:,} | {r['tokens_processed']:,} | {r['passes']} | {r['tokens_per_s']} | "
                     f"{base['seconds'] / r['seconds']:.2f}x | {r['max_abs_diff_vs_before']:.1e} |")
    write_markdown(a.out, lines)


if __name__ == "__main__":
    main()
