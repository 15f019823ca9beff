"""The self-contained HTML report: figures inlined, significance marked, rendered by headless Chromium."""

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rayeval.cli import app
from rayeval.eval.html import write_html
from rayeval.eval.leaderboard import leaderboard, read_correctness, write_leaderboard
from rayeval.eval.report import write_report
from test_eval_stats import grid_rows
from test_leaderboard import wide_csv

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_report_html_is_self_contained(tmp_path):
    files = write_report(grid_rows(), tmp_path / "r", n_boot=200, pride_fraction=0.5)
    page = files["html"].read_text()
    assert files["html"] == tmp_path / "r" / "report.html"
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)  # rank shift + rstd
    assert page.count("<h2>") == (tmp_path / "r" / "report.md").read_text().count("\n## ")
    # model a's Δacc is significant (10 of 40 items lost), b's is not: one mark in the summary table
    row_a = re.search(r"<tr>\s*<td>a</td>\s*<td>d</td>\s*<td>perturbed</td>.*?</tr>", page, re.S).group(0)
    row_b = re.search(r"<tr>\s*<td>b</td>\s*<td>d</td>\s*<td>perturbed</td>.*?</tr>", page, re.S).group(0)
    assert '<td class="sig">*</td>' in row_a and 'class="sig"' not in row_b
    (tmp_path / "r" / "rstd.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"report.md: image 'rstd.png' not found"):
        write_html(tmp_path / "r" / "report.md")


def test_html_cli(tmp_path):
    (tmp_path / "r.md").write_text("# Routing\n\n| router | APGR |\n|---|---|\n| knn | 0.61 |\n")
    r = CliRunner().invoke(app, ["html", str(tmp_path / "r.md")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "r.html").read_text()
    assert "<title>Routing</title>" in page and '<td class="num">0.61</td>' in page
    r = CliRunner().invoke(app, ["html", str(tmp_path / "none.md")])
    assert r.exit_code == 2 and "no such markdown report" in " ".join(r.output.split())


def screenshot(page, png, tmp_path, height):
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--window-size=1280,{height}",
                    f"--screenshot={png}", page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(png).convert("RGB")).astype(int)


def c0_pixels(img):
    """Pixels of matplotlib's first colour (tab:blue, 31/119/180): only the figures draw it."""
    return int((np.abs(img - np.array([31, 119, 180])).max(axis=-1) < 25).sum())


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(tmp_path):
    files = write_report(grid_rows(), tmp_path / "r", n_boot=200, pride_fraction=0.5)
    img = screenshot(files["html"], tmp_path / "report.png", tmp_path, 6000)
    assert img.shape == (6000, 1280, 3)
    ink = (img.min(axis=-1) < 200).mean()
    assert ink > 0.01                  # text and tables were drawn, not a blank page
    assert c0_pixels(img) > 300        # and the inlined rank-shift figure was decoded and painted
    assert ((img == [255, 224, 138]).all(axis=-1)).sum() > 50  # the highlighted significance cell

    rows, notes = read_correctness([f"toy={wide_csv(tmp_path / 'toy.csv')}"])
    lb = write_leaderboard(leaderboard(rows, n_boot=200), tmp_path / "lb")
    img = screenshot(lb["html"], tmp_path / "lb.png", tmp_path, 2500)
    assert (img.min(axis=-1) < 200).mean() > 0.01 and c0_pixels(img) > 100


def test_routing_report_has_html_with_curves(tmp_path):
    import pandas as pd

    from rayeval.route.evaluate import EvalResult, write_report as write_route_report

    curve = pd.DataFrame({"strong_share": [0.0, 0.5, 1.0], "quality": [0.6, 0.75, 0.8]})
    res = EvalResult(rows=[{"router": "knn", "benchmark": "mmlu", "apgr": 0.61, "apgr_paper": 0.6, "cpt50": 0.4,
                            "cpt80": 0.7}], curves={("knn", "mmlu"): curve, ("random", "mmlu"): curve})
    md = write_route_report(res, tmp_path / "route")
    page = (tmp_path / "route" / "report.html").read_text()
    assert "| knn | mmlu |" in md.read_text() and "<td>knn</td>" in page
    assert page.count('<img src="data:image/png;base64,') == 1  # the cost-quality curve, inlined
