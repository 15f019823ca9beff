"""The one front door: ``rayeval models|data|check|plan|eval|route|tune|serve|pipeline``.

Every command parses arguments and calls the library; nothing here computes anything itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="rayeval: distributed LLM evaluation and learned routing on Ray, vLLM and Ray Serve.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
models_app = typer.Typer(help="The model registry: packaged models, local folders, hub ids.", no_args_is_help=True)
data_app = typer.Typer(help="Multiple-choice datasets: inspect and validate.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
console = Console()
err = Console(stderr=True, soft_wrap=True)  # an error stays one line, however long its path


@models_app.command("list")
def models_list() -> None:
    """Show the registry and whether each packaged model is prepared."""
    from rayeval.models import REGISTRY, is_prepared, models_dir

    t = Table(title=f"models (prepared folders in {models_dir()})")
    for c in ("name", "role", "kind", "prepared", "description"):
        t.add_column(c)
    for s in REGISTRY.values():
        t.add_row(s.name, s.role, s.kind, "yes" if is_prepared(s.name) else "no", s.description)
    console.print(t)
    console.print("Any Hugging Face hub id (org/name) or local HF folder also works wherever a model name does.")


@models_app.command("prepare")
def models_prepare(names: list[str] = typer.Argument(None, help="Models to prepare (default: all packaged)"),
                   cache: Optional[Path] = typer.Option(None, "--cache", envvar="RAYEVAL_MODELS",
                                                        help="Folder for prepared models")) -> None:
    """Materialize packaged models as plain Hugging Face folders (idempotent) and print where."""
    import os

    if cache:
        os.environ["RAYEVAL_MODELS"] = str(cache)
    from rayeval.models import prepare

    for name, path in prepare(names or None).items():
        console.print(f"{name}\t{path}")


@data_app.command("inspect")
def data_inspect(path: str = typer.Argument(..., help="MMLU folder, ARC .jsonl, generic .jsonl/.csv/.parquet, or hf://id"),
                 fmt: str = typer.Option("auto", "--format", help="auto|mmlu|arc|generic|hub"),
                 split: Optional[str] = typer.Option(None, help="dev/test (MMLU) or split name"),
                 subjects: Optional[str] = typer.Option(None, help="Comma-separated subjects"),
                 columns: Optional[str] = typer.Option(None, help="Generic mapping: question=q,choices=a|b|c|d,gold=answer"),
                 skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Load the valid rows, write rejects"),
                 rejects: Path = typer.Option(Path("rejects.jsonl"), help="Where --skip-invalid writes bad rows"),
                 as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON")) -> None:
    """Count items per split, subject and gold position; report every malformed row as file:line."""
    from rayeval.data.loaders import load_items, summarize
    from rayeval.data.schema import DataValidationError

    try:
        res = load_items(path, fmt=fmt, split=split, subjects=subjects.split(",") if subjects else None,
                         columns=columns, skip_invalid=skip_invalid)
    except DataValidationError as e:
        for r in e.errors:
            err.print(str(r), markup=False, highlight=False)
        err.print(f"{len(e.errors)} invalid row(s); nothing loaded (use --skip-invalid to load the rest)")
        raise typer.Exit(1)
    except (FileNotFoundError, ValueError) as e:
        err.print(f"error: {e}", markup=False)
        raise typer.Exit(2)
    s = summarize(res.items)
    if res.rejects:
        res.write_rejects(rejects)
        s["rejected"] = len(res.rejects)
        s["rejects_file"] = str(rejects)
        for r in res.rejects:
            err.print(str(r), markup=False, highlight=False)
    if as_json:
        print(json.dumps(s, indent=2))
        return
    console.print(f"[bold]{s['items']}[/] items, {s['subjects']} subjects; by split: {s['by_split']}")
    console.print(f"gold position: {s['by_gold_position']}; options per item: {s['by_n_choices']}")
    t = Table("subject", "items")
    for k, v in s["by_subject"].items():
        t.add_row(k, str(v))
    console.print(t)
    if res.rejects:
        console.print(f"[yellow]{len(res.rejects)} row(s) rejected -> {rejects}[/]")


@app.command("eval")
def eval_cmd(config: str = typer.Argument(..., help="Eval YAML, or a packaged config name (eval_small, eval_paper_grid)"),
             out: Path = typer.Option(..., "--out", "-o", help="Output directory (rows, metrics, report)"),
             engine: Optional[str] = typer.Option(None, help="Engine kind override: auto | vllm | hf | fake"),
             actors: Optional[int] = typer.Option(None, help="Actor-pool size override"),
             address: Optional[str] = typer.Option(None, help="Ray address (default $RAY_ADDRESS or a local cluster)"),
             resume: bool = typer.Option(True, help="Reuse finished shards in --out"),
             ) -> None:
    """Evaluate models x datasets x perturbations x scorings on Ray Data; write rows, metrics and a report."""
    from rayeval.check import check_eval, fail_on_problems
    from rayeval.eval.config import ConfigError
    from rayeval.eval.pipeline import run_eval

    over = {k: v for k, v in {"kind": engine, "actors": actors}.items() if v is not None}
    # run_eval plans the grid (prompt lengths) itself before Ray starts: the check leaves that to it
    fail_on_problems(check_eval(config, engine=over, plan=False))
    try:
        res = run_eval(config, out, engine=over, resume=resume, address=address)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        err.print(f"error: {e}", markup=False)
        raise typer.Exit(2)
    console.print_json(json.dumps(res))


@app.command("check")
def check_cmd(config: str = typer.Argument(..., help="A config YAML or packaged name (eval_small, pipeline_small, "
                                                    "tune_small, serve_configs/local_cpu.yaml, judge_mt_bench)"),
              kind: Optional[str] = typer.Option(None, "--kind", help="eval | pipeline | tune | serve | judge | generate "
                                                                      "(default: told from the config)"),
              engine: Optional[str] = typer.Option(None, help="Eval engine override: auto | vllm | hf | fake")) -> None:
    """Validate a config in seconds, without Ray: one line per problem (file: field: what), exit 2.

    Keys and types at every level, models, datasets, splits and subjects, routers and their
    parameters, engine options per engine kind, prompt lengths, Serve app args; 'ok: ...' when
    all resolve.  `rayeval eval`, `pipeline` and `tune` run the same check before Ray starts."""
    from rayeval.check import check, fail_on_problems

    res = check(config, kind, engine={"kind": engine} if engine else None)
    fail_on_problems(res)
    typer.echo(res.summary())


@app.command("plan")
def plan_cmd(config: str = typer.Argument(..., help="Eval YAML, or a packaged config name"),
             engine: Optional[str] = typer.Option(None, help="Engine kind override: auto | vllm | hf | fake"),
             as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON"),
             no_cache: bool = typer.Option(False, "--no-cache", help="Ignore the score cache (count no hits)")) -> None:
    """Plan an evaluation without running it: requests, distinct token sequences, tokens requested
    vs the prefix-trie minimum vs what will be computed, shards, cache hits; prompts too long for a
    model are errors (exit 2).  No Ray, no engine."""
    from rayeval.eval.config import ConfigError
    from rayeval.eval.plan import plan_config

    try:
        p = plan_config(config, engine={"kind": engine} if engine else None, use_cache=not no_cache)
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as e:
        err.print(f"error: {e}", markup=False)
        raise typer.Exit(2)
    if as_json:
        print(json.dumps(p.to_dict(), indent=1))
    else:
        print(p.render())
    if any(m.too_long for m in p.models):
        raise typer.Exit(2)


@app.command("pipeline")
def pipeline_cmd(config: Optional[str] = typer.Argument(None, help="Pipeline YAML or packaged name (default pipeline_small)"),
                 out: Path = typer.Option(Path("runs/main"), "--out", "-o", help="Output directory"),
                 serve: Optional[bool] = typer.Option(None, "--serve/--no-serve", help="Deploy and query the Serve graph"),
                 engine: Optional[str] = typer.Option(None, help="Eval engine override: auto | vllm | hf | fake")) -> None:
    """The whole pipeline: evaluate -> gold preference data -> router -> thresholds -> Serve -> report."""
    from rayeval.check import check_pipeline, fail_on_problems
    from rayeval.workflow import run_workflow

    fail_on_problems(check_pipeline(config, serve=serve, engine={"kind": engine} if engine else None, plan=False))
    try:
        res = run_workflow(config, out, serve=serve, engine={"kind": engine} if engine else None)
    except (ValueError, FileNotFoundError) as e:
        err.print(f"error: {e}", markup=False)
        raise typer.Exit(2)
    console.print_json(json.dumps(res))


@app.command("leaderboard")
def leaderboard_cmd(tables: list[str] = typer.Argument(..., help="Per-item correctness files: PATH, or NAME=PATH[,PATH...] "
                                                      "to join several files into one dataset"),
                    out: Path = typer.Option(..., "--out", "-o", help="Output directory (leaderboard.md, PNGs, JSON)"),
                    models: Optional[str] = typer.Option(None, help="Comma-separated model columns of a wide table"),
                    id_col: Optional[str] = typer.Option(None, "--id-col", help="Item id column of a wide table"),
                    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples of the items"),
                    alpha: float = typer.Option(0.05, help="Significance level of the paired tests"),
                    correction: str = typer.Option("holm", help="holm | fdr_bh | bonferroni | none"),
                    seed: int = typer.Option(0),
                    title: str = typer.Option("rayeval leaderboard")) -> None:
    """Rank models from any per-item correctness table: rank intervals, tied groups, paired tests."""
    from rayeval.eval.leaderboard import condition_keys, leaderboard, read_correctness, write_leaderboard

    try:
        rows, notes = read_correctness(tables, models.split(",") if models else None, id_col)
        res = leaderboard(rows, n_boot=n_boot, seed=seed, alpha=alpha, correction=correction)
    except (ValueError, FileNotFoundError) as e:
        err.print(f"error: {e}", markup=False)
        raise typer.Exit(2)
    files = write_leaderboard(res, out, title=title, notes=notes, sources=tables, alpha=alpha, correction=correction)
    for n in notes:
        err.print(n, markup=False)
    g = res["groups"]
    keys = condition_keys(g)
    for _, r in g.iterrows():
        typer.echo(f"{' / '.join(str(r[c]) for c in keys)}\tgroup {r['group']}\t{r['models']}")
    typer.echo(f"report: {files['report']}")


@app.command("html")
def html_cmd(report: Path = typer.Argument(..., help="A markdown report (eval, leaderboard or routing report.md)"),
             out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output page (default: beside it, .html)")) -> None:
    """Render a markdown report as one self-contained HTML page (figures inlined)."""
    from rayeval.eval.html import write_html

    try:
        typer.echo(str(write_html(report, out)))
    except (ValueError, FileNotFoundError) as e:
        err.print(f"error: {e}", markup=False)
        raise typer.Exit(2)


def _mount_stages() -> None:
    """The later stages' command groups.  Always mounted: a group whose import fails is an error
    here, not a command that silently disappears from ``rayeval --help``."""
    from rayeval.prefs.cli import app as augment
    from rayeval.route.cli import app as route
    from rayeval.tune import app as tune

    for sub, name in ((route, "route"), (augment, "augment"), (tune, "tune")):
        app.add_typer(sub, name=name)


_mount_stages()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
