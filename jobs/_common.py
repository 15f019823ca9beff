"""What every ``jobs/*.py`` entrypoint shares: make ``rayeval`` importable from the job's working
dir, read a YAML ``--config``, and run one ``rayeval`` CLI command in-process.

The entrypoints build an argv for the CLI (``rayeval/cli.py``) and nothing else, so a job and the
command line can never disagree.  Exit codes pass through: ``ray job submit`` reports SUCCEEDED
only when the command exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python jobs/x.py` puts jobs/ (not the repo) on sys.path
    sys.path.insert(0, str(REPO))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_config(path: str | None, model: type | None = None) -> dict[str, Any]:
    """The job's YAML ``--config`` (empty without a path), checked against ``model`` (a pydantic
    model, ``extra="forbid"``): a missing file, a key the job does not know or a wrong type stops
    the job here, naming the file and the field, before it starts any work."""
    if not path:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"{path}: no such config file")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise SystemExit(f"{path}: invalid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise SystemExit(f"{path}: top level must be a mapping")
    if model is None:
        return doc
    from pydantic import ValidationError

    try:
        return model.model_validate(doc).model_dump(exclude_none=True)
    except ValidationError as e:
        problems = [f"{path}: {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise SystemExit("\n".join(problems)) from None


def pick(args: argparse.Namespace, cfg: dict[str, Any], name: str, default: Any = None) -> Any:
    """Command line beats the YAML config beats the default."""
    v = getattr(args, name, None)
    if v is not None:
        return v
    return cfg.get(name, default)


def run_cli(argv: Sequence[str]) -> int:
    """``rayeval <argv>`` in this process; returns its exit code (0 on success)."""
    from rayeval.cli import app

    argv = [str(a) for a in argv]
    print("[jobs] rayeval " + " ".join(argv), flush=True)
    try:
        rv = app(args=argv, prog_name="rayeval", standalone_mode=False)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:
        # Typer's (vendored click's) Exit / usage errors carry an exit code; anything else is a crash.
        if type(e).__name__ == "Abort":
            return 1
        if not hasattr(e, "exit_code"):
            raise
        if hasattr(e, "show"):
            e.show()
        return int(e.exit_code or 0)
    return rv if isinstance(rv, int) else 0


def main_exit(code: int) -> None:
    sys.exit(code)
