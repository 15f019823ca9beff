"""One self-contained HTML page from a markdown report: styled tables, the PNG figures inlined.

    write_html("runs/x/report.md")          # -> runs/x/report.html, readable without the PNGs

Works for every rayeval report (evaluation, leaderboard, routing): the markdown stays the source
of truth, the page is its rendering.  Significance marks (a ``*`` cell, a ``True`` cell) are
highlighted.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from markdown_it import MarkdownIt

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1a1a1a; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
.table { overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d0d0d0; padding: 3px 7px; text-align: left; white-space: nowrap; }
th { background: #eef1f5; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #f8f9fb; }
td.sig { background: #ffe08a; font-weight: bold; text-align: center; }
img { max-width: 100%; border: 1px solid #e2e2e2; margin: .5em 0; }
code, pre { background: #f3f3f3; border-radius: 3px; }
pre { padding: .6em; overflow-x: auto; }
"""

_IMG = re.compile(r'<img src="([^"]+)"')
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml", ".gif": "image/gif"}


def render_html(md_text: str, base_dir: str | Path, title: str = "rayeval report", source: str = "report") -> str:
    """The page for ``md_text``; relative images are read from ``base_dir`` and embedded."""
    base = Path(base_dir)
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md_text)

    def inline(m: re.Match) -> str:
        src = html.unescape(m.group(1))
        if src.startswith(("data:", "http://", "https://")):
            return m.group(0)
        path = base / src
        mime = _MIME.get(path.suffix.lower())
        if mime is None:
            raise ValueError(f"{source}: image {src!r}: unsupported type (expected {sorted(_MIME)})")
        if not path.is_file():
            raise FileNotFoundError(f"{source}: image {src!r} not found at {path}")
        return f'<img src="data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = _IMG.sub(inline, body)
    body = body.replace("<table>", '<div class="table"><table>').replace("</table>", "</table></div>")
    body = re.sub(r"<td>(\*|True)</td>", r'<td class="sig">\1</td>', body)
    body = re.sub(r"<td>(-?\d[\d.,]*)</td>", r'<td class="num">\1</td>', body)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<style>{CSS}</style></head>\n'
            f"<body>\n{body}</body></html>\n")


def write_html(md_path: str | Path, out_path: str | Path | None = None, title: str | None = None) -> Path:
    """Render ``md_path`` beside it (same name, .html) or to ``out_path``; returns the page's path."""
    md_path = Path(md_path)
    if not md_path.is_file():
        raise FileNotFoundError(f"{md_path}: no such markdown report")
    text = md_path.read_text(encoding="utf-8")
    if title is None:
        first = next((ln for ln in text.splitlines() if ln.startswith("# ")), "# " + md_path.stem)
        title = first[2:].strip()
    out = Path(out_path) if out_path else md_path.with_suffix(".html")
    out.write_text(render_html(text, md_path.parent, title, str(md_path)), encoding="utf-8")
    return out
