"""The built docs site in a real browser: the comparison page renders its summary table and its figure.

Needs the built site (``docs/gen_pages.py`` then ``mkdocs build``; ``.ci/run`` runs this file after the
build) and headless Chromium: Debian's ``chromium`` package, installed here when absent and allowed
(root with ``apt-get``), otherwise the test is skipped with the reason. ``MEMZOO_SITE`` points at
another built site folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SITE = Path(os.environ.get("MEMZOO_SITE", Path(__file__).resolve().parents[1] / "site"))
PAGE = SITE / "comparison" / "index.html"


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("no headless Chromium, and it cannot be installed here (needs root and apt-get): apt-get install chromium")
    try:
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as error:
        pytest.skip(f"installing Debian's chromium failed ({type(error).__name__}): apt-get install chromium")
    return shutil.which("chromium") or pytest.skip("apt-get installed chromium but it is not on PATH")


@pytest.fixture(scope="module")
def page():
    if not PAGE.is_file():
        pytest.skip(f"the docs site is not built ({PAGE} is missing): python docs/gen_pages.py && mkdocs build")
    return _chromium(), PAGE.as_uri()


def _run(browser: str, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=180)


def test_the_comparison_page_renders_its_summary_table_and_figure(page, tmp_path):
    browser, url = page
    dom = _run(browser, "--virtual-time-budget=5000", "--dump-dom", url).stdout
    summary = dom.find('id="summary-passkey-retrieval"')
    assert summary != -1, "the comparison page has no summary section"
    table = dom[summary : dom.find("</table>", summary)]
    assert table.count("<tr") >= 3, "the summary table has no rows"  # a header and the checkpoints
    assert "passkey_accuracy_vs_length.png" in dom, "the comparison figure is not on the page"
    next_section = dom.find("<h2", summary + 1)
    figure = dom.find("passkey_accuracy_vs_length.png")
    assert next_section == -1 or figure < next_section, "the comparison figure is not in the summary, under its table"
    assert (SITE / "generated" / "figures" / "passkey_accuracy_vs_length.png").is_file()

    shot = tmp_path / "first-screen.png"
    _run(browser, "--window-size=1280,1600", f"--screenshot={shot}", url)
    assert shot.is_file(), "Chromium wrote no screenshot"
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] >= 1000 and pixels.std() > 0.05, "the first screen rendered blank"
