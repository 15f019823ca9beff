"""Shared by the benches that write a results folder: result.json + result.md, and the line that
names the machine (CPU model, cores, flags, load average) every results file starts with."""

from __future__ import annotations

import json
from pathlib import Path


def machine_line(res: dict) -> str:
    c = res["cpu"]
    return (f"{c['model']}, {c['cores']} cores ({', '.join(c['flags'])}); load average at the end "
            f"{', '.join(f'{x:.1f}' for x in res['load_average_at_end'])}; config `{res['config']}`")


def cpu_sentence(c: dict, load_start, load_end) -> str:
    """The machine, as the grid benches' markdown opens: CPU model, cores, flags, load."""
    return (f"CPU: {c['model']}, {c['cores']} cores; flags {' '.join(c['flags'])}. Load average at start "
            f"{load_start[0]:.2f}, at end {load_end[0]:.2f}.")


def write_table(out: str, title: str, cpu: dict, load_start, started: str, note: str, rows: list[dict],
                columns: list[tuple[str, str]], **extra) -> dict:
    """``OUT.json`` (date, start time, CPU, load at start and end, ``extra``, the rows) and ``OUT.md``:
    the title, the machine, ``note``, one table row per row.  ``columns``: (header, format string
    over a row's fields); a header ending in ``<`` is a left-aligned text column."""
    import datetime as _dt
    import os

    res = {"date": _dt.date.today().isoformat(), "started": started, "cpu": cpu, "load_start": load_start,
           "load_end": os.getloadavg(), **extra, "rows": rows}
    Path(out + ".json").write_text(json.dumps(res, indent=1))
    heads = [h.rstrip("<") for h, _ in columns]
    lines = [f"# {title} ({res['date']})", "", cpu_sentence(cpu, load_start, res["load_end"]) + " " + note, "",
             "| " + " | ".join(heads) + " |", "|" + "|".join("---" if h.endswith("<") else "---:" for h, _ in columns) + "|"]
    lines += ["| " + " | ".join(f.format(**r) for _, f in columns) + " |" for r in rows]
    write_markdown(out, lines)
    return res


def write_markdown(out: str, lines: list[str]) -> None:
    """``OUT.md`` from the lines, and the same table on stdout."""
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_results(out: str | Path | None, res: dict, markdown: str, tag: str) -> None:
    if not out:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "result.md").write_text(markdown)
    print(f"[{tag}] wrote {out}", flush=True)


def deploy_loopback(config: str) -> tuple[str, float]:
    """Deploy a Serve config on a local Ray (token auth on) for a load bench; returns its
    loopback URL and the seconds it took.  Load benches only ever target 127.0.0.1."""
    import time

    from rayeval.serve.deploy import deploy

    t0 = time.time()
    cfg = deploy(config, num_cpus=4)
    url = f"http://127.0.0.1:{cfg['http_options']['port']}"
    if not url.startswith(("http://127.0.0.1", "http://localhost")):
        raise SystemExit("load tests only against 127.0.0.1")
    return url, time.time() - t0
