"""vLLM's automatic prefix cache on the paper grid, measured side by side in ONE run.

    .venv/bin/python bench/vllm_prefix_cache.py --out bench/results/vllm-apc-DATE-CPU

The paper grid (``eval_paper_grid``: 25 settings, three scorings) on a slice, every request
scored by ``VLLMEngine`` (one model, a fresh engine per variant, so each starts with an empty
cache; the requests go in one call, as one shard of the evaluation does):

  no prefix cache        ``enable_prefix_caching: false``: every token of every job computed
  next-token jobs only   prefix caching on, ``cached_prompt_logprobs: false``: symbol jobs read
                         the cache, continuation jobs (prompt logprobs) skip it (vLLM's default)
  every job              prefix caching on, ``cached_prompt_logprobs: true`` (rayeval's default)

For each: seconds, tokens the jobs hold, tokens vLLM computed (the jobs' tokens less what its
``num_cached_tokens`` says came from the cache), the prefix-trie minimum of the same jobs, and
predictions against the no-cache variant (per work unit).  ``--block-size`` sets vLLM's KV block (the cache's
unit: a prompt reuses whole blocks only; vLLM's CPU default is 128).
Results: ``OUT.json`` and ``OUT.md`` with the CPU.
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
import eval_speed as es  # noqa: E402
from results_io import cpu_sentence, write_markdown  # noqa: E402
from grid_speed import cpu_info, grid_config  # noqa: E402
from packed_passes import work_preds  # noqa: E402

VARIANTS = [("no prefix cache", {"enable_prefix_caching": False, "cached_prompt_logprobs": False}),
            ("next-token jobs only", {"cached_prompt_logprobs": False}),
            ("every job", {})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--subjects", type=int, default=2, help="2 at least: out-of-domain shots come from another subject")
    ap.add_argument("--items", type=int, default=3)
    ap.add_argument("--arc", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=0, help="0: vLLM's default")
    a = ap.parse_args()
    from rayeval.eval.engines import make_engine
    from rayeval.eval.pipeline import build_work
    from rayeval.eval.scoring import flatten
    from rayeval.eval.tokens import trie_size

    load0 = os.getloadavg()
    works, _ = build_work(grid_config([a.model], a.subjects, a.items, a.arc, "vllm_apc"))
    reqs = flatten(works)
    kw = {"max_model_len": 2048, **({"block_size": a.block_size} if a.block_size else {})}
    rows, ref = [], None
    for name, extra in VARIANTS:
        eng = make_engine("vllm", a.model, {**kw, **extra})
        if ref is None:
            _, tjobs = eng.token_jobs(reqs)
            trie = trie_size(j.ids for j in tjobs)
        t0 = time.perf_counter()
        res = eng.score(reqs)
        dt = time.perf_counter() - t0
        preds = work_preds(works, res)
        ref = ref or preds
        st = dict(eng.stats)
        rows.append({"variant": name, "options": extra, "seconds": round(dt, 1), "jobs": st["distinct_jobs"],
                     "tokens_in_jobs": st["tokens_distinct"], "tokens_computed": st["tokens_computed"],
                     "trie_minimum": trie, "computed_over_trie": st["tokens_computed"] / trie,
                     "agreement_with_no_cache": es.agreement(preds, ref)})
        print(json.dumps(rows[-1], default=str), flush=True)
        eng.close()
    c = cpu_info()
    res = {"date": _dt.date.today().isoformat(), "cpu": c, "load_start": load0, "load_end": os.getloadavg(),
           "model": a.model, "block_size": a.block_size or "vLLM default", "work_units": len(works), "rows": rows}
    Path(a.out + ".json").write_text(json.dumps(res, indent=1))
    base = rows[0]["seconds"]
    lines = [f"# vLLM automatic prefix cache on the paper grid ({res['date']})", "",
             cpu_sentence(c, load0, res["load_end"]) + " " + f"Model {a.model}, vLLM KV block "
             f"{res['block_size']}; slice: {a.subjects} MMLU subject(s) x {a.items} items + {a.arc} ARC items, "
             f"all settings and scorings of eval_paper_grid ({len(works)} work units).", "",
             "| variant | s | speed-up | distinct jobs | tokens in jobs | tokens computed | / trie minimum | "
             "prediction agreement with no cache |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seconds']} | {base / r['seconds']:.2f}x | {r['jobs']:,} | "
                     f"{r['tokens_in_jobs']:,} | {r['tokens_computed']:,} | {r['computed_over_trie']:.2f}x | "
                     f"{r['agreement_with_no_cache']:.3f} |")
    write_markdown(a.out, lines)


if __name__ == "__main__":  # vLLM's engine-core process needs the guard
    main()
