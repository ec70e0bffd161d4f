"""The HTML report as a person sees it: the real workflow on the embedded model, `snakemake --report`, the page
rendered in headless Chromium, the reader's clicks replayed (category, then the eye icon of a result), and
screenshots checked for the plots' own colours."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from conftest import snakemake, write_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.chromium,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make setup installs it)"),
]

CLICKER = """<script>
window.addEventListener('load', () => {
  const steps = %s; let i = 0;
  function click(step) {
    if (step.startsWith('css:')) {
      const els = document.querySelectorAll(step.slice(4)); if (els.length) els[0].click(); return;
    }
    const els = [...document.querySelectorAll('a,button,td,span,li,div')].filter(e => e.textContent.trim() === step);
    if (els.length) els[els.length - 1].click();
  }
  function next() { if (i < steps.length) { click(steps[i++]); setTimeout(next, 500); } }
  setTimeout(next, 500);
});
</script>"""


def render(report: Path, steps: list[str], out: Path) -> tuple[np.ndarray, str]:
    """The page after the clicks `steps`: (screenshot as an RGB array, the DOM)."""
    head, tail = report.read_text(encoding="utf-8").rsplit("</body>", 1)
    page = out.with_suffix(".html")
    page.write_text(head + CLICKER % repr(steps).replace("'", '"') + "</body>" + tail, encoding="utf-8")
    common = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1600,1200",
        "--virtual-time-budget=10000",
    ]
    shot = subprocess.run([*common, f"--screenshot={out}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0, shot.stderr[-2000:]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return mpimg.imread(out)[..., :3], dom.stdout


def colour_pixels(img: np.ndarray, hex_rgb: str, tol: float = 0.06) -> int:
    rgb = np.array([int(hex_rgb[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(img - rgb).max(axis=-1) < tol).sum())


def shown_png(dom: str) -> np.ndarray:
    """The PNG the result view shows (a data: URI in an <img>), decoded."""
    uris = re.findall(r'<img[^>]+src="data:image/png;[^"]*?base64,([^"]+)"', dom)
    assert uris, "no PNG image in the rendered result view"
    return mpimg.imread(io.BytesIO(base64.b64decode(uris[0])))


def test_report_renders_plots_and_table(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        {
            "models": {"smollm2": {"gguf": "embedded"}},
            "prompts": {"capital": {"text": "What is the capital of France?", "template": "raw"}},
            "lanes": ["llama"],
            "max_tokens": 4,
        },
    )
    snakemake(tmp_path, "report_plots")
    snakemake(tmp_path, "report_plots", "--report", "results/report.html")
    report = tmp_path / "results" / "report.html"
    assert report.stat().st_size > 100_000

    home, _ = render(report, [], tmp_path / "home.png")
    assert colour_pixels(home, "#1f77b4") < 50  # no plot on the landing page: what follows is the clicks' doing

    positions, dom = render(report, ["Per position", "css:a[iconname=eye]"], tmp_path / "positions.png")
    png = shown_png(dom)
    assert png.shape[0] > 400 and png.shape[1] > 600 and png[..., :3].std() > 0.05  # a drawn figure, not blank
    assert colour_pixels(positions, "#1f77b4") > 300, "the quantized verdict's (blue) curves are not on screen"
    assert colour_pixels(positions, "#ff7f0e") > 300, "the graph verdict's (orange) curves are not on screen"
    assert colour_pixels(positions, "#2ca02c") > 2000, "the top-1 agreement strip (green) is not on screen"

    layers, dom = render(report, ["Per layer", "css:a[iconname=eye]"], tmp_path / "layers.png")
    assert shown_png(dom).std() > 0.01
    summary, dom = render(report, ["Summary", "css:a[iconname=eye]"], tmp_path / "summary.png")
    assert "graph" in dom and "quantized" in dom
    assert colour_pixels(summary, "#d4f7d4") > 500, "the summary table's pass cells are not on screen"
