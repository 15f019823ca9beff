"""``rayeval tune CONFIG.yaml [--out DIR] [--resume]``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from rayeval.tune.run import Interrupted, TrialsFailed, _json, run


# ============================================================================================
# CLI: ``rayeval tune CONFIG.yaml [--out DIR] [--resume]``.
# ============================================================================================
# A group whose callback is the command (so ``rayeval tune CONFIG`` works once mounted with
# ``add_typer``); interspersed args let options follow the CONFIG argument.
app = typer.Typer(help="Tune routers with Ray Tune (search + ASHA), calibrate thresholds, export the best.",
                  pretty_exceptions_show_locals=False, context_settings={"allow_interspersed_args": True},
                  subcommand_metavar="")


@app.callback(invoke_without_command=True)
def tune_cmd(config: str = typer.Argument(..., metavar="CONFIG", help="tune YAML, or a packaged name (tune_small)"),
             out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: config's out)"),
             resume: bool = typer.Option(False, "--resume", help="continue the experiments under --out "
                                                                 "(Tuner.restore: unfinished and errored trials)")):
    """Search each router's space, export the best router + thresholds.json to OUT/best."""
    from rayeval.check import check_tune, fail_on_problems

    fail_on_problems(check_tune(config))
    try:
        summary = run(config, out, resume, log=typer.echo)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    except Interrupted as e:
        typer.echo(f"interrupted: {e}", err=True)
        raise typer.Exit(130)
    except TrialsFailed as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(3)
    typer.echo(json.dumps({k: summary[k] for k in ("best_dir", "best", "n_trials", "n_stopped_early", "seconds")},
                          default=_json))


if __name__ == "__main__":  # pragma: no cover
    app()
