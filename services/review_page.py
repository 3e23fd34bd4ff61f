"""The review part of the audit report: every flagged pair, the evidence behind its suspicion, and
an export of the flagged ids that `ecif edit --remove ids:FILE` reads.

The page stays bounded at any scale: thumbnails for the first `thumbnails` flagged pairs (a
constant), the rest as text rows in a table that plain JavaScript pages and filters (no external
assets), up to `on_page` flagged pairs in all; beyond that the page says where the others are.
Rows are put into the page with textContent, never as HTML, so a caption cannot inject markup."""
from __future__ import annotations

import html
import json
import math
from typing import Callable, Sequence
from urllib.parse import quote

from ecif_core.ranking import SUSPECT_Z

from .report_evidence import EvidencePart

THUMBNAILS = 300        # flagged pairs shown as cards with a thumbnail; the rest go to the table
PAGE_ROWS = 50          # rows per page of the table
FLAGGED_ON_PAGE = 20_000  # flagged pairs on the page in all (about 5 MB of text); ranked.csv has every one
EXPORT_NAME = "flagged-ids.txt"
Thumb = Callable[[int, str], str]   # (slot, image) -> an <img> tag

TABLE_SCRIPT = """<script>
// Pages and filters the flagged pairs that have no card (plain JS, no external assets).
(() => {
  const data = JSON.parse(document.getElementById("flagged-rows").textContent);
  const table = document.getElementById("flagged-table");
  const size = Number(table.dataset.pageRows);
  const column = document.getElementById("flagged-column");
  const filter = document.getElementById("flagged-filter");
  const prev = document.getElementById("flagged-prev");
  const next = document.getElementById("flagged-next");
  const label = document.getElementById("flagged-page");
  let page = 0, shown = data.rows;
  const show = (v) => v === null ? "" : typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(4) : String(v);
  function matches(row) {
    const text = filter.value.trim();
    if (!text) return true;
    const value = row[Number(column.value)];
    const op = text.match(/^(<=|>=|<|>)\\s*(\\S+)$/);
    if (op && typeof value === "number" && !isNaN(Number(op[2]))) {
      const x = Number(op[2]);
      return {"<": value < x, "<=": value <= x, ">": value > x, ">=": value >= x}[op[1]];
    }
    return show(value).toLowerCase().includes(text.toLowerCase());
  }
  function render() {
    const pages = Math.max(1, Math.ceil(shown.length / size));
    page = Math.min(Math.max(page, 0), pages - 1);
    table.tBodies[0].replaceChildren(...shown.slice(page * size, (page + 1) * size).map((row) => {
      const tr = document.createElement("tr");
      tr.dataset.id = row[1];
      for (const value of row) {
        const td = document.createElement("td");
        td.textContent = show(value);
        tr.appendChild(td);
      }
      return tr;
    }));
    label.textContent = `page ${page + 1} of ${pages} (${shown.length} of ${data.rows.length} rows)`;
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
  }
  filter.addEventListener("input", () => { shown = data.rows.filter(matches); page = 0; render(); });
  column.addEventListener("change", () => filter.dispatchEvent(new Event("input")));
  prev.addEventListener("click", () => { page -= 1; render(); });
  next.addEventListener("click", () => { page += 1; render(); });
  render();
})();
</script>"""


def flagged_section(rows: Sequence, parts: list[EvidencePart], position: dict[int, int], thumb: Thumb,
                    thumbnails: int = THUMBNAILS, page_rows: int = PAGE_ROWS, on_page: int = FLAGGED_ON_PAGE) -> str:
    """Every flagged pair in ranking order: cards for the first `thumbnails`, the rest in the paged
    table, and the export of their ids. `position`: slot -> index into the parts' arrays."""
    every = [r for r in rows if r.suspected]
    flagged = every[:on_page]
    head = (f'<h2 id="flagged">Flagged pairs ({len(every)})</h2><p>Pairs whose <code>suspicion</code> is above '
            f"{SUSPECT_Z:g}, most suspicious by the ranking first: review them. A flag is a pair to look at, not "
            "a verdict. Each card shows the flag, the <code>suspicion</code> and the evidence it adds up from "
            "(a robust z-score per model's CLIP score, higher = more unusual for this data, times the model's "
            "weight from the validation evidence).</p>")
    if not flagged:
        return f'<section id="review">{head}<p><b>No pair is flagged.</b> The top of the ranking is below.</p></section>'
    cards = cards_html(flagged[:thumbnails], parts, position, thumb) if thumbnails > 0 else ""
    rest = flagged[thumbnails:]
    table = _table(rest, parts, position, page_rows) if rest else ""
    beyond = (f'<p class="flag" id="flagged-beyond">{len(every) - len(flagged)} more flagged pairs are not on this '
              f"page (it shows the first {len(flagged)}): ranked.csv has every one (<code>suspected</code> = true), "
              "<code>ecif results ID --suspected-only</code> downloads them, <code>--remove suspected</code> "
              "removes them all.</p>" if len(every) > len(flagged) else "")
    return f'<section id="review">{head}{export_link(flagged, len(every))}{cards}{table}{beyond}</section>'


# What to do with the list, as measured (bench/RESULTS.md, "Acting on the audit"): shown beside the export.
ACTING = ('<p id="acting"><b>What to do with them.</b> Retrain without them: <code>ecif train --remove estimated '
          "--audit-dir AUDIT ...</code> (as many top-ranked pairs as the audit estimates are misaligned; "
          "<code>--remove suspected</code> for the flagged ones only), or the same ids with your own trainer. On "
          "short fine-tunes of a pretrained model (our fine-tuning benchmark) that raised clean top-1 accuracy by "
          "5 to 12 points, and on clean data it selected 1.5% of the pairs and cost no more than retraining's own "
          "noise. Demoting them instead (<code>--demote</code>: kept as in-batch negatives) did as well within "
          "the noise. The model edit (<code>ecif edit</code>) "
          "recovered about 60% of retraining's gain at about a third of its time on full fine-tunes; on LoRA "
          "fine-tunes it recovered less and cost more than retraining. It is for models you cannot retrain, and "
          "its verdict says when to retrain instead.</p>")


def export_link(flagged: Sequence, total: int) -> str:
    """The flagged ids on the page, one per line, as a download (a data: URL: the page stays one file)."""
    text = "".join(f"{r.pair_id}\n" for r in flagged)
    which = f"{len(flagged)} flagged ids" if len(flagged) == total else f"first {len(flagged)} of {total} flagged ids"
    return (f'<p><a id="export-flagged" download="{EXPORT_NAME}" href="data:text/plain;charset=utf-8,'
            f'{quote(text, safe="")}">Download the {which}</a> ({EXPORT_NAME}, one id per line); '
            f"<code>ecif edit --remove ids:{EXPORT_NAME}</code> writes the model without them, "
            f"<code>ecif preview --remove ids:{EXPORT_NAME}</code> predicts the effect first.</p>{ACTING}")


def cards_html(rows: Sequence, parts: list[EvidencePart], position: dict[int, int], thumb: Thumb,
               note_flagged: str = "") -> str:
    """Cards with thumbnail, flag, caption, suspicion and its evidence parts. `note_flagged`: a
    sentence added to every flagged card (the valuable section's warning)."""
    cards = []
    for r in rows:
        flag = ('<span class="flag">suspected</span>' if r.suspected else '<span class="muted">not flagged</span>')
        note = f'<div class="flag note">{html.escape(note_flagged)}</div>' if r.suspected and note_flagged else ""
        influence = "" if r.influence is None else f" · influence {r.influence:.3g}"
        cards.append(f'<div class="card{" flagged" if r.suspected else ""}" data-id="{html.escape(r.pair_id)}" '
                     f'data-suspected="{str(bool(r.suspected)).lower()}">{thumb(int(r.slot), r.image)}'
                     f"<b>#{r.rank}</b> {flag}{note}<div>{html.escape(r.caption)}</div>"
                     f"{_evidence(r, parts, position)}<div>clip score {r.clip_score:.3f}{influence}</div>"
                     f'<span class="muted pair-id">{html.escape(r.pair_id)}</span></div>')
    return f'<div class="grid">{"".join(cards)}</div>'


def _evidence(r, parts: list[EvidencePart], position: dict[int, int]) -> str:
    if r.suspicion is None or (isinstance(r.suspicion, float) and math.isnan(r.suspicion)):
        return '<div class="muted">suspicion: - (not computed for this audit)</div>'
    i = position[int(r.slot)]
    terms = " + ".join(f'<span class="part" data-column="{p.column}" data-weight="{p.weight!r}" data-z="{float(p.z[i])!r}" '
                       f'title="{html.escape(p.label)}">{p.weight:.2f} × {float(p.z[i]):.2f}</span>' for p in parts)
    labels = "; ".join(f"{p.weight:.2f}: weight of the {html.escape(p.label)}" for p in parts)
    return (f'<div class="evidence" data-suspicion="{float(r.suspicion)!r}">suspicion <b>{r.suspicion:.2f}</b>'
            f'{" = " + terms if terms else ""}<br><span class="muted">{labels}</span></div>')


def _table(rest: Sequence, parts: list[EvidencePart], position: dict[int, int], page_rows: int) -> str:
    columns = ["rank", "id", "caption", "suspicion", *[f"z of the {p.label}" for p in parts], "clip score", "image"]
    data = {"columns": columns, "rows": [
        [r.rank, r.pair_id, r.caption, _number(r.suspicion), *[_number(p.z[position[int(r.slot)]]) for p in parts],
         _number(r.clip_score), r.image] for r in rest]}
    options = "".join(f'<option value="{i}">{html.escape(c)}</option>' for i, c in enumerate(columns))
    header = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    payload = json.dumps(data).replace("<", "\\u003c")  # no "</script>" inside the script element
    return (f'<h3 id="flagged-more">{len(rest)} more flagged pairs, without thumbnails ({page_rows} per page)</h3>'
            f"<p>Filter <select id=\"flagged-column\">{options}</select> "
            '<input id="flagged-filter" placeholder="text, or &gt; 4 / &lt; 0.2"> '
            '<button id="flagged-prev">previous</button> <span id="flagged-page"></span> '
            '<button id="flagged-next">next</button></p>'
            f'<table id="flagged-table" class="rows" data-page-rows="{int(page_rows)}"><thead><tr>{header}</tr></thead>'
            f'<tbody></tbody></table><script type="application/json" id="flagged-rows">{payload}</script>{TABLE_SCRIPT}')


def _number(value) -> float | None:
    """A JSON number, or null for a missing score (JSON has no NaN)."""
    return None if value is None or not math.isfinite(float(value)) else float(value)
