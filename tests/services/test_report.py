"""The report page in a real browser (Debian's chromium, headless): every thumbnail decodes,
the plots are there, and a screenshot is kept as a test artifact. `ecif report`: the page of an
audit folder drawn again, and the service's page saved with its CSVs beside it, without the key.
(tests/services/test_review_page.py clicks through the review part.)"""
from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from services.report import TOP_VALUABLE
from services.review_page import THUMBNAILS

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
    flagged = sum(r["suspected"] == "true" for r in csv.DictReader(embedded_csv.open()))
    assert total == min(flagged, THUMBNAILS) + TOP_VALUABLE and loaded == total  # flagged + valuable, all decoded
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


def local_links(page: Path) -> list[str]:
    """The page's links to files (not anchors, not data: URLs)."""
    hrefs = re.findall(r'href="([^"]+)"', page.read_text())
    return sorted(h for h in hrefs if not h.startswith(("#", "data:")))


def test_ecif_report_draws_an_audit_folders_page_again_and_opens_it(embedded_csv, monkeypatch, capsys):
    from services.cli import main

    folder = embedded_csv.parent
    (folder / "report.html").unlink()
    opened: list[str] = []
    monkeypatch.setattr("webbrowser.open", opened.append)
    assert main(["report", "--audit-dir", str(folder), "--open"]) == 0
    page = folder / "report.html"
    assert f"wrote {page}" in capsys.readouterr().out and opened == [page.resolve().as_uri()]
    assert local_links(page) == ["ranked.csv", "rejected.csv"] and all((folder / h).is_file() for h in local_links(page))
    assert main(["report", "--audit-dir", str(folder.parent)]) == 2
    assert "has no ecif.db" in capsys.readouterr().err


@pytest.fixture
def served(pg_url, data_root, tmp_path):
    """The API on a real HTTP server in this process (loopback, a port of its own), its access log
    going to the root logger (caplog)."""
    import socket
    import threading
    import time

    import uvicorn

    from services.api.app import create_app
    from services.settings import Settings

    settings = Settings(database_url=pg_url, store_url=str(tmp_path / "store"), data_roots=[str(data_root)])
    server = uvicorn.Server(uvicorn.Config(create_app(settings, starter=object()), log_config=None, access_log=True))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.slow
def test_ecif_report_saves_the_services_page_beside_its_csvs_and_never_the_key(
        served, pg_url, data_root, tmp_path, monkeypatch, capsys, caplog):
    """The saved page links only to files saved beside it; the key is in no URL, file or log line;
    an audit that has not succeeded is refused in one line and nothing is written."""
    import logging

    from ecif_core.data.manifest import load_manifest
    from services import repository
    from services.cli import main
    from services.db.session import session_scope
    from services.pipeline import LocalDispatcher, Pipeline

    with session_scope(pg_url) as session:
        key = repository.create_key(session, "dana-report")
        audit_id, queued_id = (repository.create_audit(session, "dana-report", load_manifest(data_root / "manifest.json"),
                                                       tmp_path / "store").id for _ in range(2))
    dispatcher = LocalDispatcher()
    pipeline = Pipeline(pg_url, dispatcher)
    pipeline.start(audit_id)
    dispatcher.drain(pipeline)
    opened: list[str] = []
    monkeypatch.setattr("webbrowser.open", opened.append)
    caplog.set_level(logging.INFO)
    out = tmp_path / "saved"
    assert main(["report", audit_id, "--server", served, "--key", key, "--out", str(out), "--open"]) == 0
    page = out / "report.html"
    assert opened == [page.resolve().as_uri()]
    assert local_links(page) == ["rejected.csv", "results.csv"] and all((out / h).is_file() for h in local_links(page))
    assert (out / "results.csv").read_bytes() == "".join(repository.results_csv(pg_url, audit_id)).encode()
    assert main(["report", queued_id, "--server", served, "--key", key, "--out", str(tmp_path / "no")]) == 2
    printed = capsys.readouterr()
    assert "server answered 409: audit is queued" in printed.err and not (tmp_path / "no").exists()
    logged = [r.getMessage() for r in caplog.records]  # the server's access log and the client's
    assert any(f"/audits/{audit_id}/report" in line for line in logged)
    for text in [printed.out, printed.err, *logged, *(f.read_text() for f in out.iterdir())]:
        assert key not in text and key[:12] not in text


def test_the_summary_says_whether_the_gradients_were_exact_or_the_partner_approximation():
    from services.report import _summary

    meta = {"pairs": 10, "rejected": 0, "rank_by": "evidence", "seconds": 1.0, "summary": None}
    naming = {"data": "train.jsonl", "model": "tiny"}
    exact = _summary({**meta, "manifest": {"options": {"rank_by": "evidence"}}}, naming, 10, 1)
    approximate = _summary({**meta, "manifest": {"options": {"partners": 8}}}, naming, 10, 1)
    assert "<td>gradients</td><td><b>exact</b>" in exact
    assert "top 8 in-batch partners" in approximate and "dropped_partner_mass" in approximate
