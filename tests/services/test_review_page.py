"""The report as a curator's review page: every flagged pair reachable (cards, then a paged and
filterable table, clicked through in a real browser), the evidence behind each suspicion, an export
that `ecif edit --remove ids:FILE` reads, flagged valuable pairs marked, a bounded page."""
from __future__ import annotations

import csv
import html
import math
import re
import sqlite3
from types import SimpleNamespace
from urllib.parse import unquote

import pytest

from services.report import TOP_VALUABLE, VALUABLE_FLAGGED_NOTE, audit_report_html
from tests.services.devtools import run_in_page

THUMBNAILS, PAGE_ROWS, FLAGGED_RANKS = 5, 7, 23

CLICK_THROUGH = """(() => {
  const text = (el) => el ? el.innerText : "";
  const ids = (selector) => [...document.querySelectorAll(selector)].map((e) => e.dataset.id);
  const next = document.getElementById("flagged-next");
  const out = {cards: ids("#review .card"), rows: [], pages: [], title: document.title,
               summary: text(document.getElementById("summary")) + text(document.querySelector("h1")),
               detailsOpen: document.getElementById("details").open,
               details: document.getElementById("details").textContent,
               exportHref: document.getElementById("export-flagged").href,
               thumbnails: document.body.dataset.thumbnails, loaded: document.body.dataset.thumbnailsLoaded,
               evidence: document.querySelectorAll("#review .card .evidence .part").length};
  for (let i = 0; i < 100; i++) {
    out.pages.push(document.getElementById("flagged-page").textContent);
    out.rows.push(...ids("#flagged-table tbody tr"));
    if (next.disabled) break;
    next.click();
  }
  const filter = document.getElementById("flagged-filter"), column = document.getElementById("flagged-column");
  const filtered = (col, value) => {
    column.value = String([...column.options].findIndex((o) => o.text === col));
    filter.value = value; filter.dispatchEvent(new Event("input"));
    return ids("#flagged-table tbody tr");
  };
  out.byId = filtered("id", out.rows[out.rows.length - 1]);
  out.bySuspicion = filtered("suspicion", ">= " + THRESHOLD);
  out.bySuspicionPage = document.getElementById("flagged-page").textContent;
  return out;
})()"""


@pytest.fixture(scope="module")
def many_flags(embedded_csv, tmp_path_factory) -> SimpleNamespace:
    """The embedded audit's page drawn from a copy of its database in which more pairs are flagged
    (the ranks up to FLAGGED_RANKS and the most valuable pair) than there are thumbnails: the page
    draws whatever the database flags; the scores are the audit's own."""
    folder = tmp_path_factory.mktemp("many-flags")
    with sqlite3.connect(embedded_csv.parent / "ecif.db") as source, sqlite3.connect(folder / "ecif.db") as db:
        source.backup(db)  # the whole database, whatever its journal holds
        db.execute("UPDATE scores SET suspected = (rank <= ? OR slot = (SELECT slot FROM scores "
                   "ORDER BY influence DESC LIMIT 1))", (FLAGGED_RANKS,))
        audit_id = db.execute("SELECT id FROM audits").fetchone()[0]
        flagged = [r[0] for r in db.execute("SELECT pair_id FROM scores WHERE suspected ORDER BY rank")]
        suspicion = dict(db.execute("SELECT pair_id, suspicion FROM scores"))
    page = folder / "report.html"
    page.write_text(audit_report_html(f"sqlite:///{folder / 'ecif.db'}", audit_id,
                                      {"results": "ranked.csv", "rejected": "rejected.csv"},
                                      thumbnails=THUMBNAILS, page_rows=PAGE_ROWS))
    return SimpleNamespace(page=page, audit_id=audit_id, flagged=flagged, suspicion=suspicion,
                           html=page.read_text())


@pytest.mark.slow
def test_a_reader_reaches_every_flagged_pair_in_a_browser(many_flags, tmp_path):
    """Cards for the first THUMBNAILS flagged pairs, the rest by clicking `next` through the table;
    the filter by column finds one id and a suspicion range; the export holds every flagged id."""
    flagged = many_flags.flagged
    assert len(flagged) > THUMBNAILS + 2 * PAGE_ROWS  # at least three pages of the table
    threshold = sorted(many_flags.suspicion[i] for i in flagged[THUMBNAILS:])[len(flagged[THUMBNAILS:]) // 2]
    seen = run_in_page(many_flags.page, tmp_path / "profile", CLICK_THROUGH.replace("THRESHOLD", repr(threshold)))
    assert seen["cards"] == flagged[:THUMBNAILS]
    assert seen["rows"] == flagged[THUMBNAILS:]  # every other flagged pair once, in ranking order
    rest = len(flagged) - THUMBNAILS
    assert len(seen["pages"]) == math.ceil(rest / PAGE_ROWS) and seen["pages"][-1].startswith(
        f"page {len(seen['pages'])} of {len(seen['pages'])}")
    assert seen["byId"] == [flagged[-1]]
    above = [i for i in flagged[THUMBNAILS:] if many_flags.suspicion[i] >= threshold]
    assert seen["bySuspicion"] == above[:PAGE_ROWS] and f"({len(above)} of {rest} rows)" in seen["bySuspicionPage"]
    assert unquote(seen["exportHref"].split(",", 1)[1]).splitlines() == flagged
    assert seen["evidence"] >= THUMBNAILS  # every card shows at least one evidence part
    # named for a curator: the data set and the model, no audit id, method jargon only in the closed details
    assert "train.jsonl" in seen["title"] and "model.pt" in seen["title"] and many_flags.audit_id not in seen["title"]
    assert "train.jsonl" in seen["summary"] and "model.pt" in seen["summary"]
    assert not re.search(r"curvature|projection size", seen["summary"], re.I)
    assert seen["detailsOpen"] is False and "curvature shift" in seen["details"] and many_flags.audit_id in seen["details"]
    assert int(seen["thumbnails"]) == THUMBNAILS + TOP_VALUABLE == int(seen["loaded"])


def test_the_page_is_bounded_by_the_thumbnail_constant(many_flags):
    """However many pairs are flagged, only `thumbnails` of them become cards with an image."""
    assert many_flags.html.count('<img class="thumb"') == THUMBNAILS + TOP_VALUABLE
    review = many_flags.html.split('<section id="review">')[1].split("</section>")[0]
    assert review.count('class="card') == THUMBNAILS


def test_beyond_the_cap_the_page_says_where_the_other_flagged_pairs_are(many_flags, embedded_csv):
    """Text rows are bounded too: with `on_page` flagged pairs the table and the export stop there,
    and the page names the count left out and where they are."""
    import json

    on_page = THUMBNAILS + PAGE_ROWS
    page = audit_report_html(f"sqlite:///{many_flags.page.parent / 'ecif.db'}", many_flags.audit_id,
                             {"results": "ranked.csv", "rejected": "rejected.csv"},
                             thumbnails=THUMBNAILS, page_rows=PAGE_ROWS, on_page=on_page)
    table = json.loads(re.search(r'<script type="application/json" id="flagged-rows">(.*?)</script>', page).group(1))
    assert [row[1] for row in table["rows"]] == many_flags.flagged[THUMBNAILS:on_page]
    href = re.search(r'id="export-flagged" download="[^"]+" href="([^"]+)"', page).group(1)
    assert unquote(html.unescape(href).split(",", 1)[1]).splitlines() == many_flags.flagged[:on_page]
    left_out = len(many_flags.flagged) - on_page
    assert re.search(rf'id="flagged-beyond">{left_out} more flagged pairs are not on this page', page)
    assert f"Flagged pairs ({len(many_flags.flagged)})" in page
    assert 'id="flagged-beyond"' not in many_flags.html  # under the cap: every flagged pair is on the page


def test_each_cards_evidence_adds_up_to_its_suspicion(many_flags):
    """suspicion = sum(weight x z) over the parts shown, for every card, equal to the stored column."""
    cards = re.findall(r'<div class="card[^"]*" data-id="([^"]+)"(.*?)<span class="muted pair-id">',
                       many_flags.html)
    assert len(cards) == THUMBNAILS + TOP_VALUABLE
    for pair_id, body in cards:
        shown = float(re.search(r'data-suspicion="([^"]+)"', body).group(1))
        parts = [(float(w), float(z)) for w, z in re.findall(r'data-weight="([^"]+)" data-z="([^"]+)"', body)]
        assert parts and abs(sum(w for w, _ in parts) - 1.0) < 1e-12
        assert abs(sum(w * z for w, z in parts) - shown) < 1e-9, pair_id
        assert shown == many_flags.suspicion[html.unescape(pair_id)]
        assert ('<span class="flag">suspected</span>' in body) == (html.unescape(pair_id) in many_flags.flagged)


def test_a_flagged_valuable_pair_says_so(many_flags):
    valuable = many_flags.html.split('id="valuable"')[1].split('id="details"')[0]
    cards = re.findall(r'data-suspected="(true|false)">(.*?)<span class="muted pair-id">', valuable)
    flagged = [body for state, body in cards if state == "true"]
    assert len(cards) == TOP_VALUABLE and flagged  # the fixture flags the most valuable pair
    assert all(html.escape(VALUABLE_FLAGGED_NOTE) in body for body in flagged)
    assert not any(html.escape(VALUABLE_FLAGGED_NOTE) in body for state, body in cards if state == "false")
    assert f"{len(flagged)} of these {TOP_VALUABLE} are also flagged" in valuable


def test_the_removal_preview_explains_its_random_baseline(embedded_csv):
    page = (embedded_csv.parent / "report.html").read_text()
    baseline = re.search(r'<p id="random-baseline">(.*?)</p>', page).group(1)
    assert "random 10%" in baseline and "baseline" in baseline and "random:0.1:0" in page


def test_the_page_says_what_to_do_with_the_flagged_pairs(embedded_csv):
    """The measured recommendation (bench.fix): retrain without `estimated`; the preview's limits on fine-tunes."""
    page = (embedded_csv.parent / "report.html").read_text()
    acting = re.search(r'<p id="acting">(.*?)</p>', page).group(1)
    assert "ecif train --remove estimated" in acting and "--demote" in acting and "ecif edit" in acting
    trust = re.search(r'<p id="preview-trust" class="muted">(.*?)</p>', page).group(1)
    assert "did not hold" in trust and "Acting on the audit" in trust


def test_the_export_is_a_file_ecif_edit_remove_ids_accepts(embedded_csv, tmp_path):
    """The page's download, saved as a file, selects exactly the flagged pairs as `ids:FILE`."""
    from ecif_core.edit.from_audit import preview

    page = (embedded_csv.parent / "report.html").read_text()
    href = html.unescape(re.search(r'id="export-flagged" download="([^"]+)" href="([^"]+)"', page).group(2))
    assert href.startswith("data:text/plain;charset=utf-8,")
    (tmp_path / "flagged-ids.txt").write_text(unquote(href.split(",", 1)[1]))
    with embedded_csv.open() as handle:
        flagged = [r["id"] for r in csv.DictReader(handle) if r["suspected"] == "true"]
    assert flagged, "the embedded audit flags at least one pair"
    chosen = preview(embedded_csv.parent, f"ids:{tmp_path / 'flagged-ids.txt'}")
    assert chosen["pairs"] == len(flagged) == chosen["suspected_in_set"]


def test_an_audit_without_flags_says_so_and_shows_the_top_of_the_ranking(embedded_csv, tmp_path):
    with sqlite3.connect(embedded_csv.parent / "ecif.db") as source, sqlite3.connect(tmp_path / "ecif.db") as db:
        source.backup(db)
        db.execute("UPDATE scores SET suspected = 0")
        audit_id = db.execute("SELECT id FROM audits").fetchone()[0]
        top = [r[0] for r in db.execute("SELECT pair_id FROM scores ORDER BY rank LIMIT ?", (TOP_VALUABLE,))]
    page = audit_report_html(f"sqlite:///{tmp_path / 'ecif.db'}", audit_id,
                             {"results": "ranked.csv", "rejected": "rejected.csv"})
    assert "Flagged pairs (0)" in page and "No pair is flagged" in page and 'id="export-flagged"' not in page
    ranking = page.split("Top 20 of the ranking")[1].split("<h2>")[0]
    assert [html.unescape(i) for i in re.findall(r'<div class="card[^"]*" data-id="([^"]+)"', ranking)] == top
    assert 'data-suspected="true"' not in page


@pytest.mark.parametrize("evidence", [None, {"clip_score": {"mean": 0.8}, "reference_clip_score": {"mean": 0.95}},
                                      {"clip_score": {"mean": 0.5}, "reference_clip_score": {"mean": 0.4}}])
def test_evidence_parts_with_a_reference_add_up_to_the_rankings_suspicion(evidence):
    """Two parts (audited model and reference), weighted by each model's AUROC, or equally without
    a validation set or when both are at chance: sum(weight x z) is ecif_core's `suspicion`."""
    import numpy as np
    import torch

    from ecif_core.ranking import suspicion
    from services.report_evidence import evidence_parts

    generator = np.random.default_rng(3)
    columns = {"clip_score_loo": generator.normal(0.3, 0.1, 200), "reference_clip_score": generator.normal(0.2, 0.05, 200)}
    parts = evidence_parts(columns, evidence)
    expected = suspicion({k: torch.from_numpy(v) for k, v in columns.items()}, evidence).numpy()
    assert [p.column for p in parts] == ["clip_score_loo", "reference_clip_score"]
    assert np.allclose(sum(p.weight * p.z for p in parts), expected, rtol=0, atol=1e-12)
    weights = [p.weight for p in parts]
    assert weights == ([0.5, 0.5] if evidence is None or evidence["clip_score"]["mean"] <= 0.5
                       else pytest.approx([0.6 / 1.5, 0.9 / 1.5]))
