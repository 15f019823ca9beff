"""``rayeval route ...``: build preference data, train, calibrate and evaluate routers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="Learned routing between LLMs (RouteLLM-style): data, training, calibration, evaluation.",
                  no_args_is_help=True)


def _load_source(source: str, split: str = "train"):
    """:func:`rayeval.prefs.sources.load_source`, a bad source as a usage error."""
    from rayeval.prefs.sources import load_source

    try:
        return load_source(source, split)
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from None


def _params(items: List[str]) -> dict:
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep:
            raise typer.BadParameter(f"--param wants key=value, got {it!r}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


@app.command()
def prefs(source: str = typer.Argument(..., help="routellm:mmlu | routerbench:arc_challenge:train | battles:x.jsonl | eval:x.parquet"),
          out: Path = typer.Option(..., "--out", "-o", help="output parquet"),
          pairwise: bool = typer.Option(False, help="write pairwise battles instead of per-model outcomes")):
    """Build routing data from a source and save it as parquet."""
    from rayeval.prefs.outcomes import Outcomes

    d = _load_source(source)
    if pairwise and isinstance(d, Outcomes):
        d = d.to_preferences()
    d.save(out)
    typer.echo(f"{type(d).__name__}: {len(d)} rows -> {out}")


@app.command()
def train(router: str = typer.Argument(..., help="router name (see `rayeval route list`)"),
          data: str = typer.Option(..., "--data", "-d", help="training source (as for `prefs`)"),
          out: Path = typer.Option(..., "--out", "-o", help="router folder to write"),
          param: List[str] = typer.Option([], "--param", "-p", help="hyperparameter key=value (JSON values)")):
    """Fit a router and save it to a folder."""
    from rayeval.route.routers import make_router

    r = make_router(router, **_params(param))
    r.fit(_load_source(data))
    r.save(out)
    typer.echo(f"{r!r} strong={r.strong_} weak={r.weak_} -> {out}")


@app.command(name="list")
def list_routers():
    """Registered routers, their parameters and search spaces."""
    from rayeval.route.routers import ROUTERS

    for name, cls in sorted(ROUTERS.items()):
        typer.echo(f"{name:16s} params={cls.param_names()} search_space={cls.search_space()}")


@app.command()
def calibrate(router_dir: Path = typer.Argument(..., help="saved router folder"),
              data: str = typer.Option(..., "--data", "-d", help="calibration queries (a source as for `prefs`)"),
              target: List[float] = typer.Option([0.2, 0.5, 0.8], "--target", "-t", help="target strong-call shares"),
              out: Path = typer.Option(..., "--out", "-o", help="thresholds JSON")):
    """Thresholds that send the target share of calibration queries to the strong model."""
    from rayeval.route.evaluate import calibrate as cal
    from rayeval.route.routers import load_router

    r = load_router(router_dir)
    d = _load_source(data)
    texts = d.texts if hasattr(d, "texts") else d.unique_queries()["query"].tolist()
    thr = cal(r.win_probability(texts), target)
    doc = {"router_dir": str(router_dir), "n_calibration": len(texts),
           "thresholds": [{"target_share": k, "threshold": v} for k, v in thr.items()]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    typer.echo(json.dumps(doc["thresholds"]))


@app.command()
def evaluate(router: List[str] = typer.Option([], "--router", "-r",
                                              help="name or name:{json params}; default: the standard set"),
             benchmark: List[str] = typer.Option(["mmlu", "gsm8k", "mt_bench"], "--benchmark", "-b"),
             folds: int = typer.Option(5, help="cross-fitting folds"),
             seed: int = typer.Option(0),
             n_boot: int = typer.Option(200, help="bootstrap resamples for CIs"),
             similarity_train: List[str] = typer.Option(["mt_bench+mt_bench_turn2", "routerbench"], "--similarity-train",
                                                        help="training-set proxies for the similarity section "
                                                             "(`rayeval augment similarity`); none: --no-similarity"),
             with_similarity: bool = typer.Option(True, "--similarity/--no-similarity"),
             with_transfer: bool = typer.Option(True, "--transfer/--no-transfer",
                                                help="RouterBench transfer to new model pairs (knn, k=50)"),
             transfer_task: List[str] = typer.Option(["arc_challenge", "mbpp", "winograde"], "--transfer-task"),
             judge_dir: Optional[Path] = typer.Option(None, help="a `rayeval augment judge` folder: its judge stats"),
             out: Path = typer.Option(Path("route_report"), "--out", "-o")):
    """Routers x RouteLLM benchmarks with k-fold cross-fitting -> markdown report + plots, with the
    benchmark-dataset similarity and the transfer-to-new-pairs table beside the results."""
    from rayeval.route.evaluate import DEFAULT_ROUTERS, evaluate_routers, write_report
    from rayeval.route.transfer import write_augment_report

    specs = []
    for r in router:
        name, _, js = r.partition(":")
        specs.append((name, json.loads(js) if js else {}))
    res = evaluate_routers(specs or DEFAULT_ROUTERS, benchmark, k=folds, seed=seed, n_boot=n_boot,
                           log=typer.echo)
    sim = tab = None
    if with_similarity and similarity_train:
        from rayeval.prefs.similarity import similarity_study

        typer.echo("similarity study ...")
        sim = similarity_study(list(similarity_train), list(benchmark), seed=seed)
    if with_transfer:
        from rayeval.route.transfer import transfer_study

        typer.echo("transfer study (RouterBench) ...")
        tab = transfer_study(list(transfer_task), seed=seed)
    extra = ""
    if sim or tab is not None or judge_dir:
        files = write_augment_report(out, transfer=tab, similarity=sim, judge_dir=judge_dir)
        extra = files["report"].read_text()
    typer.echo(f"report: {write_report(res, out, extra_md=extra)}")


if __name__ == "__main__":
    app()
