"""The report page in a real browser (Debian's chromium, headless): every thumbnail decodes,
the plots are there, and a screenshot is kept as a test artifact."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ARTIFACTS = Path(os.environ.get("ECIF_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=5000", "--window-size=1200,2000"]


def chromium(page: Path, tmp_path: Path, *args: str) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is not installed: .ci/run installs Debian's chromium (apt-get install chromium)"
    result = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args,
                             page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def loaded_thumbnails(dom: str) -> tuple[int, int]:
    body = re.search(r"<body[^>]*>", dom).group(0)
    total = re.search(r'data-thumbnails="(\d+)"', body)
    loaded = re.search(r'data-thumbnails-loaded="(\d+)"', body)
    assert total and loaded, f"the page's load handler did not run: {body}"
    return int(total.group(1)), int(loaded.group(1))


@pytest.mark.slow
def test_audit_report_renders_in_a_browser(embedded_csv, tmp_path):
    report = embedded_csv.parent / "report.html"  # written by `ecif audit` (the embedded mode)
    dom = chromium(report, tmp_path, "--dump-dom")
    total, loaded = loaded_thumbnails(dom)
    assert total >= 50 and loaded == total  # top suspects + valuable pairs, every one decoded
    assert dom.count("<svg") >= 3  # leverage and influence histograms, pos/neg scatter
    assert "suspect threshold" in dom and 'href="ranked.csv"' in dom
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    chromium(report, tmp_path, f"--screenshot={ARTIFACTS / 'audit-report.png'}")
    assert (ARTIFACTS / "audit-report.png").stat().st_size > 10_000


def test_a_broken_thumbnail_is_detected(tmp_path):
    """The check itself: a page with an undecodable image reports fewer loaded than present."""
    from services.report import _page

    page = tmp_path / "broken.html"
    page.write_text(_page("t", '<img class="thumb" src="data:image/png;base64,AAAA">'
                               '<img class="thumb" src="data:image/gif;base64,R0lGODlhAQABAAAAACw=">'))
    total, loaded = loaded_thumbnails(chromium(page, tmp_path, "--dump-dom"))
    assert total == 2 and loaded == 0
