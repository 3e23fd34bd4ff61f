"""The audit report: one self-contained HTML page (inline SVG plots, thumbnails as data URIs),
so it opens from a file, behind the API's auth, and in clusters without internet access.

Thumbnails are made once per pair and cached in the audit folder (`thumbs/<slot>.png`); only
images of the audit's usable pairs are read (their paths were confined to the data roots when
the audit was prepared), and with `data_roots` each path is checked again before it is opened.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from sqlalchemy import select

from ecif_core.data.confine import OutsideRoots, confined
from ecif_core.data.folder import AuditFolder
from ecif_core.data.storage import read_bytes, write_bytes
from ecif_core.ranking import SUSPECT_Z
from ecif_core.data.images import TAR_MEMBER, load_image, local_image
from ecif_core.data.remote import is_url
from ecif_core.stages.finalize import ranking_evidence

from .db.models import Audit, PairRow, Score, Trace
from .db.session import session_scope
from .report_evidence import EvidencePart, evidence_parts
from .repository import trace_results
from .review_page import FLAGGED_ON_PAGE, PAGE_ROWS, THUMBNAILS, cards_html, flagged_section

THUMB_PX = 96
# The CSV links of the page the API serves: beside the page under /audits/{id}/, and the names
# `ecif report ID` saves them under, so the saved page's links work offline.
SERVED_LINKS = {"results": "results.csv", "rejected": "rejected.csv"}
TOP_VALUABLE = 20
VALUABLE_FLAGGED_NOTE = ("flagged as suspected although removing it would raise the validation loss: "
                         "look at it before keeping or removing it")
IMAGE_CHECK_SCRIPT = """<script>
// Readers (and the browser test) see at a glance whether every thumbnail decoded.
window.addEventListener("load", () => {
  const images = Array.from(document.querySelectorAll("img.thumb"));
  const loaded = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  document.body.dataset.thumbnails = images.length;
  document.body.dataset.thumbnailsLoaded = loaded;
  const note = document.getElementById("image-status");
  if (note) note.textContent = loaded === images.length ? "" : `${images.length - loaded} thumbnails failed to load`;
});
</script>"""
STYLE = """<style>
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:2em}
table.summary td{padding:2px 12px 2px 0} .plots{display:flex;flex-wrap:wrap;gap:1em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:.85em}
.card img{width:96px;height:96px;image-rendering:pixelated;display:block;margin-bottom:4px}
.flag{color:#b00;font-weight:bold} .muted{color:#777} .card.flagged{border-color:#b00}
.evidence{margin:3px 0} table.rows{border-collapse:collapse;font-size:.85em}
table.rows td,table.rows th{border-bottom:1px solid #eee;padding:2px 6px;text-align:left}
details{margin-top:2em}
</style>"""


def audit_report_html(database_url: str, audit_id: str, links: dict[str, str],
                      data_roots: list[Path] | None = None, thumbnails: int = THUMBNAILS,
                      page_rows: int = PAGE_ROWS, on_page: int = FLAGGED_ON_PAGE) -> str:
    """The review page of a finished audit. `links`: {"results": url, "rejected": url}, relative to
    the page. Of the flagged pairs, the first `thumbnails` are cards and the rest, up to `on_page`
    in all, rows of the paged table (the page's size is bounded at any scale)."""
    with session_scope(database_url) as session:
        audit = session.get(Audit, audit_id)
        rows = session.execute(select(Score.slot, Score.pair_id, PairRow.image, PairRow.caption, Score.influence,
                                      Score.influence_pos, Score.influence_neg, Score.self_influence,
                                      Score.suspicion, Score.clip_score, Score.clip_score_loo,
                                      Score.reference_clip_score, Score.reference_negclip, Score.rank,
                                      Score.suspected)
                               .join(PairRow, (PairRow.audit_id == Score.audit_id) & (PairRow.slot == Score.slot))
                               .where(Score.audit_id == audit_id).order_by(Score.rank)).all()
        meta = {"id": audit.id, "status": audit.status, "pairs": audit.pairs_total, "rejected": audit.pairs_rejected,
                "curvature_shift": audit.curvature_shift, "seconds": _seconds(audit), "dim": _dim(audit.audit_dir),
                "audit_dir": audit.audit_dir, "manifest": audit.manifest,
                "rank_by": audit.manifest["options"]["rank_by"], "summary": audit.summary}
    columns = {name: np.array([np.nan if getattr(r, name) is None else getattr(r, name) for r in rows], dtype=float)
               for name in ("influence", "influence_pos", "influence_neg", "self_influence", "suspicion",
                            "clip_score", "clip_score_loo", "reference_clip_score", "reference_negclip")}
    evidence = ranking_evidence(meta["audit_dir"], columns)   # the weights the suspicion column was made with
    parts = evidence_parts(columns, evidence)
    position = {int(r.slot): i for i, r in enumerate(rows)}
    thumbs = _Thumbnails(meta["audit_dir"], data_roots)
    has_influence = not np.isnan(columns["influence"]).all()
    flagged = sum(1 for r in rows if r.suspected)
    naming = names(meta["manifest"])
    body = [f"<h1>Review of {html.escape(naming['data'])}</h1>",
            _summary(meta, naming, len(rows), flagged),
            _links(links),
            flagged_section(rows, parts, position, thumbs.tag, thumbnails, page_rows, on_page)]
    if not flagged:
        body += [f"<h2>Top {TOP_VALUABLE} of the ranking (by {html.escape(meta['rank_by'])})</h2>",
                 cards_html(rows[:TOP_VALUABLE], parts, position, thumbs.tag)]
    body += ['<h2>Distributions</h2><div class="plots">',
             _suspicion_histogram(columns["suspicion"]),
             _influence_histogram(columns["influence"]) if has_influence else "",
             _split_scatter(columns) if has_influence else _self_vs_clip(columns),
             "</div>",
             _removal_previews(meta["audit_dir"]) if has_influence else ""]
    if has_influence:
        body.append(_valuable(rows, parts, position, thumbs))
    body.append(_details(meta, parts))
    return _page(f"Review of {naming['data']} ({naming['model']})", "".join(body))


def _valuable(rows, parts, position, thumbs: "_Thumbnails") -> str:
    """The pairs whose removal would raise the validation loss most; a flagged one says so."""
    valuable = sorted(rows, key=lambda r: -r.influence)[:TOP_VALUABLE]
    flagged = sum(1 for r in valuable if r.suspected)
    note = (f'<p class="flag" id="valuable-flagged">{flagged} of these {len(valuable)} are also flagged as '
            "suspected (marked below): the data set may need them, or the flag may be right; look at them.</p>"
            if flagged else "")
    return (f'<h2 id="valuable">Top {len(valuable)} valuable pairs (removing them raises the validation loss most)</h2>'
            + note + cards_html(valuable, parts, position, thumbs.tag, VALUABLE_FLAGGED_NOTE))


def trace_report_html(database_url: str, trace_id: str, data_roots: list[Path] | None = None) -> str:
    """A trace: each test example beside its top-k training pairs."""
    with session_scope(database_url) as session:
        trace = session.get(Trace, trace_id)
        audit_dir = session.get(Audit, trace.audit_id).audit_dir
        results = trace_results(session, trace)
    thumbs = _Thumbnails(audit_dir, data_roots)
    parts = [f"<h1>Trace {html.escape(trace_id)}</h1>"]
    for t, result in enumerate(results):
        example = result["example"]
        text = example.get("caption") or f"true class: {example['prompts'][example['label']]}"
        parts.append(f'<h2>Test example {t}</h2><div class="card">{thumbs.tag_for_path(example["image"])}'
                     f'{html.escape(text)}<br>test loss {result["test_loss"]:.4f}</div>'
                     f"<h3>Top {len(result['top'])} training pairs by relative-IS</h3><div class=\"grid\">")
        for p in result["top"]:
            parts.append(f'<div class="card">{thumbs.tag_for_path(p["image"])}<b>#{p["rank"]}</b> '
                         f'{html.escape(p["caption"])}<br>relative-IS {p["relative_is"]:.4g}<br>'
                         f'influence {p["influence"]:.3g} (pos {p["influence_pos"]:.3g}, neg {p["influence_neg"]:.3g})'
                         f'<br><span class="muted">{html.escape(p["id"])}</span></div>')
        parts.append("</div>")
    return _page(f"Trace {trace_id}", "".join(parts))


# ------------------------------------------------------------------ pieces

def _page(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"{STYLE}</head><body>{body}{IMAGE_CHECK_SCRIPT}</body></html>")


def names(manifest: dict) -> dict[str, str]:
    """What a curator calls the audit: the data set's file and the model (architecture or config,
    and checkpoint file), from the audit's manifest."""
    train = manifest.get("train")
    train = train.get("path", train) if isinstance(train, dict) else train
    data = ", ".join(_file_name(t) for t in train) if isinstance(train, list) else _file_name(train)
    model = manifest.get("model", {})
    if model.get("arch"):
        arch = str(model["arch"])
    elif isinstance(model.get("config"), str):
        arch = f"config {_file_name(model['config'])}"
    else:
        arch = "inline config"
    return {"data": data, "model": f"{arch}, checkpoint {_file_name(model.get('checkpoint'))}"}


def _file_name(path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1] if path else "-"


def _summary(meta: dict, naming: dict[str, str], scored: int, flagged: int) -> str:
    """What a curator needs first: what was audited, and how many pairs to review."""
    lead = (f"<p>{scored} image-text pairs of <b>{html.escape(naming['data'])}</b> were scored with the model "
            f"<b>{html.escape(naming['model'])}</b>. Flagged as likely misaligned: <b>{flagged}</b> "
            f'(<a href="#flagged">review them below</a>).</p>{_estimate(meta.get("summary"))}')
    items = [("data set", naming["data"]), ("model", naming["model"]), ("pairs in the file", meta["pairs"]),
             ("scored", scored), ("rejected (unusable rows)", meta["rejected"]), ("flagged", flagged),
             ("ranked by", meta["rank_by"]), ("gradients", _gradients_kind(meta["manifest"])),
             ("run time", f"{meta['seconds']:.1f} s" if meta["seconds"] is not None else "-")]
    cells = "".join(f"<tr><td>{html.escape(str(k))}</td><td><b>{html.escape(str(v))}</b></td></tr>" for k, v in items)
    return f'{lead}<table class="summary" id="summary">{cells}</table>'


def _gradients_kind(manifest: dict) -> str:
    """Exact, or the top-m partner approximation (ranked.csv's dropped_partner_mass says how far off)."""
    partners = (manifest.get("options") or {}).get("partners")
    if partners is None:
        return "exact"
    return f"approximate: each pair's top {partners} in-batch partners (dropped_partner_mass in ranked.csv)"


def _estimate(summary: dict | None) -> str:
    """How many pairs are misaligned and how far to trust the flag (summary.json), in one paragraph."""
    if not summary:
        return ""
    if not summary["estimable"]:
        return (f'<p id="estimate">How many pairs are misaligned cannot be estimated: {html.escape(summary["reason"])}. '
                f'The flag is {html.escape(summary["flag_rule"])}.</p>')
    low, high = summary["interval"]
    precision, recall = summary["estimated_flag_precision"], summary["estimated_flag_recall"]
    caveat = (summary.get("details") or {}).get("caveat")
    caveat = f" <b>A lower bound:</b> {html.escape(caveat)}." if caveat else ""
    flag = ("No pair reaches the flag's precision target." if not summary["flagged"] else
            f"Of the flagged pairs about {precision:.0%} are expected to be misaligned (target "
            f"{summary['flag_target_precision']:.0%}), and they hold about {recall:.0%} of the misaligned pairs.")
    return (f'<p id="estimate">Estimated misaligned: <b>{summary["estimated_misaligned_fraction"]:.1%}</b> of the '
            f'pairs (about {summary["estimated_misaligned_pairs"]}; {summary["interval_level"]:.0%} interval '
            f'{low:.1%} to {high:.1%}). {flag} Each pair\'s <code>misaligned_probability</code> is in ranked.csv.'
            f'{caveat}</p>')


def _links(links: dict[str, str]) -> str:
    """The CSVs, relative to the page: served beside it by the API, or saved beside it by
    `ecif audit` and `ecif report`."""
    return (f'<p><a href="{html.escape(links["results"])}">ranked.csv</a> (every pair, rank 1 first) · '
            f'<a href="{html.escape(links["rejected"])}">rejected.csv</a> '
            '<span class="muted">(files beside this page)</span> <span id="image-status" class="flag"></span></p>')


def _details(meta: dict, parts: list[EvidencePart]) -> str:
    """The numbers behind the method, collapsed: they are for whoever tunes the audit."""
    items = [("audit id", meta["id"]), ("status", meta["status"]),
             ("curvature shift (weight decay + damping)",
              f"{meta['curvature_shift']:.4g}" if meta["curvature_shift"] is not None else "-"),
             ("projection size k", meta["dim"])]
    items += [(f"evidence weight of the {p.label}",
               f"{p.weight:.3f}" + ("" if p.auroc is None else f" (AUROC {p.auroc:.3f}: validation, or its own "
                                                                "training pairs judged by the reference when lower)"))
              for p in parts]
    cells = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in items)
    return f'<details id="details"><summary>Details</summary><table class="summary">{cells}</table></details>'


PREVIEW_SETS = (("suspected", "the flagged pairs"), ("top:0.05:rank", "top 5% of the ranking"),
                ("top:0.1:rank", "top 10% of the ranking"), ("random:0.1:0", "a random 10% (baseline)"))


def _removal_previews(audit_dir: str) -> str:
    """What removing a few natural sets would do to the validation loss (stored numbers, sum form)."""
    from ecif_core.stages import final_ranking
    from ecif_core.edit.from_audit import preview
    from ecif_core.errors import ConfigError

    ranking = final_ranking(audit_dir)
    rows = []
    for spec, label in PREVIEW_SETS:
        try:
            p = preview(audit_dir, spec, ranking=ranking)
        except ConfigError:  # e.g. nothing flagged
            continue
        rows.append(f"<tr><td>{html.escape(label)}</td><td><code>{html.escape(spec)}</code></td><td>{p['pairs']}</td>"
                    f"<td>{p['suspected_in_set']}</td><td>{p['predicted_validation_change']:+.4g}</td></tr>")
    if not rows:
        return ""
    return ('<h2>Removal preview</h2><p class="muted">Predicted change of the mean validation loss per pair '
            "(nats) if the set were removed; negative = removing it helps. From stored numbers (sum of per-pair "
            "influence); <code>ecif edit --remove SPEC</code> writes the model without the set.</p>"
            '<p id="random-baseline">The <b>random 10%</b> line is the baseline: the same change for a tenth of '
            "the pairs drawn at random (seed 0), i.e. what removing that much data does by itself. A set is worth "
            "removing when its change is clearly below (more negative than) the random line for a set of its size; "
            "one near it does no better than chance.</p>"
            '<p id="preview-trust" class="muted">How far the preview holds: it adds up each pair\'s own '
            "first-order influence and ignores pairs that share a batch. On a model trained to convergence "
            "(bench/RESULTS.md, \"The edit's certificate\": digits trained from scratch) its sign matched "
            "retraining for every targeted set. <b>On short fine-tunes of a pretrained model it did not hold</b>: "
            "over 102 lists of the fine-tuning benchmark (bench/RESULTS.md, \"Acting on the audit\") its sign "
            "matched retraining's change of the clean test loss in 51 (chance), correlation 0.23, while "
            "retraining without the flagged pairs lowered that loss in every corrupted cell. Do not choose a list "
            "by this table on a fine-tune: retrain without <code>estimated</code> or <code>suspected</code> and "
            "measure.</p>"
            '<table class="summary"><tr><td>set</td><td>spec</td><td>pairs</td><td>flagged</td>'
            f'<td>predicted change</td></tr>{"".join(rows)}</table>')


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(4.6, 3.2), dpi=100)


def _svg(plt, fig) -> str:
    buffer = io.StringIO()
    fig.tight_layout()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    text = buffer.getvalue()
    return '<figure class="plot">' + text[text.index("<svg"):] + "</figure>"


def _suspicion_histogram(values: np.ndarray) -> str:
    """The statistic the suspected flag thresholds (the evidence-weighted robust z), with the threshold."""
    plt, fig, ax = _figure()
    ax.hist(values[np.isfinite(values)], bins=50, color="#4c72b0")
    ax.axvline(SUSPECT_Z, color="#c44e52", linestyle="--", label=f"suspect threshold (suspicion > {SUSPECT_Z})")
    ax.set_yscale("log")
    ax.set_xlabel("suspicion (evidence-weighted robust z-score)")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    return _svg(plt, fig)


def _influence_histogram(values: np.ndarray) -> str:
    plt, fig, ax = _figure()
    ax.hist(values, bins=50, color="#55a868")
    ax.axvline(0, color="#333", linewidth=0.8)
    ax.set_xlabel("influence (negative = harmful)")
    ax.set_ylabel("pairs")
    return _svg(plt, fig)


def _split_scatter(columns: dict) -> str:
    plt, fig, ax = _figure()
    ax.scatter(columns["influence_pos"], columns["influence_neg"], s=6, alpha=0.6, color="#8172b2")
    ax.axhline(0, color="#333", linewidth=0.6)
    ax.axvline(0, color="#333", linewidth=0.6)
    ax.set_xlabel("influence as a positive (IS_pos)")
    ax.set_ylabel("influence as a negative (IS_neg)")
    return _svg(plt, fig)


def _self_vs_clip(columns: dict) -> str:
    plt, fig, ax = _figure()
    ax.scatter(columns["clip_score"], columns["self_influence"], s=6, alpha=0.6, color="#8172b2")
    ax.set_xlabel("clip score")
    ax.set_ylabel("self-influence")
    return _svg(plt, fig)


def _seconds(audit: Audit) -> float | None:
    if audit.started_at is None or audit.finished_at is None:
        return None
    return (audit.finished_at - audit.started_at).total_seconds()


def _dim(audit_dir: str) -> int | None:
    from ecif_core.stages import load_plan

    try:
        return load_plan(audit_dir).dim
    except FileNotFoundError:
        return None


class _Thumbnails:
    """PNG thumbnails as data URIs, cached in <audit>/thumbs (made once per image, in the audit's
    store: a disk or a bucket, so any API replica serves them without a shared folder)."""

    def __init__(self, audit_dir: str, data_roots: list[Path] | None) -> None:
        from ecif_core.stages import fetch_dir

        self.folder = AuditFolder(audit_dir).thumbnails
        self.roots = data_roots
        self.fetched = fetch_dir(audit_dir)

    def tag(self, slot: int, image: str) -> str:
        return self._img(self.folder / f"{slot}.png", image)

    def tag_for_path(self, image: str) -> str:
        import hashlib

        return self._img(self.folder / f"test-{hashlib.sha1(image.encode()).hexdigest()[:16]}.png", image)

    def _img(self, cached: Path, image: str) -> str:
        roots = self.roots
        if is_url(image):  # the copy prepare fetched into the audit folder, never the network
            image, roots = local_image(image, self.fetched), None
        try:
            confined(image.split(TAR_MEMBER)[0], roots, "image")
        except OutsideRoots:
            return '<div class="muted">(image outside the data roots)</div>'
        try:
            png = read_bytes(cached)  # one request when it is cached in a bucket
        except FileNotFoundError:
            try:  # confined again when opened: the file may have been swapped since the check above
                png = self._make(cached, image, roots)
            except (OSError, ValueError, SyntaxError, KeyError):
                return '<div class="muted">(image unreadable)</div>'
        data = base64.b64encode(png).decode()
        return f'<img class="thumb" alt="" src="data:image/png;base64,{data}">'

    @staticmethod
    def _make(cached: Path, image: str, roots: list[Path] | None) -> bytes:
        thumb = load_image(image, roots)  # as the model saw it (orientation, alpha); also inside tar shards
        thumb.thumbnail((THUMB_PX, THUMB_PX))
        buffer = io.BytesIO()
        thumb.save(buffer, format="PNG")
        write_bytes(cached, buffer.getvalue())
        return buffer.getvalue()
