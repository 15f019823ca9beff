"""``rayeval augment ...``: preference data beyond gold labels.

    rayeval augment generate judge_mt_bench --out runs/mtb/generate
    rayeval augment judge judge_mt_bench --responses runs/mtb/generate --out runs/mtb/judge
    rayeval augment similarity --out runs/sim
    rayeval augment transfer --out runs/transfer
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="Preference data: response generation, LLM-as-judge labels, benchmark similarity, "
                       "router transfer to new model pairs.", no_args_is_help=True)


def _engine(kind: Optional[str]) -> dict | None:
    return {"kind": kind} if kind else None


@app.command()
def generate(config: str = typer.Argument("judge_mt_bench", help="job config: packaged name or YAML path"),
             out: Path = typer.Option(..., "--out", "-o", help="run folder (resumable)"),
             limit: Optional[int] = typer.Option(None, help="first N prompts only"),
             max_tokens: Optional[int] = typer.Option(None, help="override sampling.max_tokens"),
             engine: Optional[str] = typer.Option(None, help="override engine kind: vllm | fake"),
             resume: bool = typer.Option(True, help="skip finished shards of an earlier run")):
    """Responses of every configured model to every prompt (Ray Data actor pool, vLLM)."""
    from rayeval.prefs.generate import load_generate_config, run_generate

    cfg = load_generate_config(config)
    if max_tokens is not None:
        cfg.sampling.max_tokens = max_tokens
    res = run_generate(cfg, out, engine=_engine(engine), limit=limit, resume=resume)
    typer.echo(json.dumps(res, indent=1))


@app.command()
def judge(config: str = typer.Argument("judge_mt_bench", help="job config with a judge section"),
          responses: Path = typer.Option(..., "--responses", "-r", help="responses.parquet or its run folder"),
          out: Path = typer.Option(..., "--out", "-o", help="run folder (resumable)"),
          model: Optional[str] = typer.Option(None, help="override the judge model"),
          mode: Optional[str] = typer.Option(None, help="override mode: pairwise | single"),
          rule: Optional[str] = typer.Option(None, help="override rule: agree | debiased"),
          engine: Optional[str] = typer.Option(None, help="override engine kind: vllm | hf | fake"),
          resume: bool = typer.Option(True)):
    """Judge responses pairwise in both orders (or rate them) -> preferences.parquet (D_judge)."""
    from rayeval.prefs.judge import load_judge_config, run_judge

    cfg = load_judge_config(config)
    for k, v in (("model", model), ("mode", mode), ("rule", rule)):
        if v is not None:
            setattr(cfg, k, v)
    res = run_judge(cfg, responses, out, engine=_engine(engine), resume=resume)
    typer.echo(json.dumps({k: v for k, v in res.items() if k != "stats"}, indent=1))
    if "stats" in res:
        from rayeval.prefs.judge import judge_markdown

        typer.echo(judge_markdown(res["stats"]))


@app.command()
def similarity(train: List[str] = typer.Option(["routerbench"], "--train", "-t",
                                               help="training-set proxy sources (see `rayeval.prefs.similarity.SOURCES`)"),
               bench: List[str] = typer.Option(["mt_bench", "mmlu", "gsm8k"], "--bench", "-b",
                                               help="evaluation sets"),
               sample: int = typer.Option(1000, help="at most this many queries per set (seeded sample)"),
               seed: int = typer.Option(0),
               out: Optional[Path] = typer.Option(None, "--out", "-o", help="folder for similarity.json/.md")):
    """RouteLLM's benchmark-dataset similarity: mean over eval queries of the best cosine
    similarity to any training query, on the routers' embeddings."""
    from rayeval.prefs.similarity import similarity_study, similarity_markdown

    res = similarity_study(train, bench, sample=sample, seed=seed)
    md = similarity_markdown(res)
    typer.echo(md)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "similarity.json").write_text(json.dumps(res, indent=1))
        (out / "similarity.md").write_text(md)


@app.command()
def transfer(task: List[str] = typer.Option(["arc_challenge", "mbpp", "winograde"], "--task"),
             router: str = typer.Option("knn", help="router name"),
             param: List[str] = typer.Option([], "--param", "-p", help="router hyperparameter key=value"),
             out: Path = typer.Option(Path("runs/transfer"), "--out", "-o"),
             judge_dir: Optional[Path] = typer.Option(None, help="a judge run folder to include in the report"),
             similarity_json: Optional[Path] = typer.Option(None, help="similarity.json to include in the report")):
    """Routers trained on one (strong, weak) RouterBench pair, evaluated on other pairs without
    retraining: APGR on the same pair vs transferred.  Writes transfer.csv and augment_report.md."""
    from rayeval.route.cli import _params
    from rayeval.route.transfer import transfer_study, write_augment_report

    tab = transfer_study(list(task), router=router, params=_params(param))
    files = write_augment_report(out, transfer=tab, judge_dir=judge_dir,
                                 similarity=json.loads(similarity_json.read_text()) if similarity_json else None)
    typer.echo((out / "augment_report.md").read_text())
    typer.echo(f"files: {', '.join(str(f) for f in files.values())}")


if __name__ == "__main__":
    app()
