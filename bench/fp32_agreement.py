"""Zero-shot prediction agreement of rayeval and lm-eval in fp32 and in bf16, in one run.

    .venv/bin/python bench/fp32_agreement.py --out bench/results/zero-shot-fp32-agreement-DATE.json

The grid bench compares rayeval and lm-eval in bf16, where each evaluator's own rounding moves
predictions of near-chance models (Gemma-3-270M: several percent of MMLU questions).  This script
scores grid_speed's zero-shot questions (456 MMLU questions, three subjects) four ways -- rayeval's
HF engine in fp32 and in bf16 (its defaults otherwise: prefix sharing, packed passes, fused kernels),
lm-eval 0.4.13's HF backend in fp32 and in bf16 -- and prints every pairwise agreement: equal
predictions in fp32 say the two evaluators compute the same thing, the rest is bf16.  lm-eval's
batch: 64, Gemma-3 8 (its fp32 262k-wide log-probabilities at 64 were killed for memory).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_speed as es  # noqa: E402
import grid_speed as gs  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--n", type=int, default=532)
    ap.add_argument("--lm-eval-path", default="/tmp/lmeval-site")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from rayeval.eval.engines import make_engine
    from rayeval.models import resolve_model

    env = es.lmeval_env(a.lm_eval_path)
    if env is None:
        raise SystemExit("lm-eval is not importable (see bench/README.md)")
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": gs.cpu_info(), "models": {}}
    tmp = Path(tempfile.mkdtemp(prefix="fp32-agreement-"))
    subjects = gs.SUBJECTS[:3]
    for model in a.models.split(","):
        works, reqs = es.zero_shot_questions(model, subjects, a.n)
        preds = {}
        for name, kw in (("rayeval_fp32", {"dtype": "float32"}), ("rayeval_bf16", {"dtype": "bfloat16"})):
            eng = make_engine("hf", model, kw)
            preds[name] = es.preds_from_results(works, eng.score(reqs))
            del eng
        tasks, idmap = es.lmeval_zero_shot_tasks(subjects, a.n, tmp / model)
        for dt, name in (("float32", "lm_eval_fp32"), ("bfloat16", "lm_eval_bf16")):
            d = es.run_lmeval("hf", str(resolve_model(model)), dict(env), tmp / model, tasks, idmap, dtype=dt,
                              batch_size=8 if "gemma" in model else 64, extra_env={"OMP_NUM_THREADS": "2"},
                              add_bos=gs._bos(model))
            preds[name] = d["preds"]
        names = list(preds)
        agree = {f"{x} vs {y}": es.agreement(preds[x], preds[y]) for i, x in enumerate(names) for y in names[i + 1:]}
        out["models"][model] = {"questions": len(works), "agreement": agree}
        print(model, json.dumps(agree, indent=1), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":  # lm-eval's subprocesses need the guard
    main()
