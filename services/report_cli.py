"""`ecif report`: the audit's review page as a file a browser opens.

From the service (`ecif report ID`), the page and the CSVs it links are downloaded into one
folder, with the API key sent only in the Authorization header: the key is never in a URL, in the
page or in what is printed, and the saved page's links point at files saved beside it. From an
embedded audit folder (`ecif report --audit-dir DIR`), the page is drawn again from the folder's
database (e.g. after an upgrade of ecif)."""
from __future__ import annotations

import argparse
import webbrowser
from pathlib import Path
from typing import Callable

from sqlalchemy import select

from ecif_core.errors import ConfigError

from .report import SERVED_LINKS

PAGE = "report.html"


def add_report_verb(verbs, client_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    p = verbs.add_parser("report", help="save an audit's review page (and its CSVs) and open it in a browser")
    p.add_argument("audit_id", nargs="?", help="the service's audit id (or --audit-dir for an `ecif audit` folder)")
    p.add_argument("--audit-dir", help="an `ecif audit` folder: draw its report.html again from its database")
    p.add_argument("--out", help="folder for report.html and its CSVs (default ./ecif-report-ID)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    client_flags(p)
    p.set_defaults(run=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    if (args.audit_id is None) == (args.audit_dir is None):
        raise ConfigError("report", "give an AUDIT_ID (service) or --audit-dir (embedded), not both")
    if args.audit_dir is not None:
        page = render_audit_dir(Path(args.audit_dir))
    else:
        from .client import client_from_args

        page = download(client_from_args(args), args.audit_id, Path(args.out or f"ecif-report-{args.audit_id}"))
    print(f"wrote {page}")
    if args.open:
        webbrowser.open(page.resolve().as_uri())
    return 0


def download(client, audit_id: str, out: Path) -> Path:
    """OUT/report.html with the CSVs it links beside it. The page is fetched first (a refusal, e.g.
    409 for an audit that has not succeeded, writes nothing) and written last, so a saved page never
    links to a file that is not there."""
    response = client.http.get(f"/audits/{audit_id}/report")
    if response.status_code != 200:
        client._json(response)  # raises the server's refusal as one line
    out.mkdir(parents=True, exist_ok=True)
    client.results(audit_id, out / SERVED_LINKS["results"])
    with client.http.stream("GET", f"/audits/{audit_id}/rejected.csv") as rejected:
        if rejected.status_code != 200:
            rejected.read()
            client._json(rejected)
        with (out / SERVED_LINKS["rejected"]).open("wb") as handle:
            for chunk in rejected.iter_bytes():
                handle.write(chunk)
    page = out / PAGE
    page.write_bytes(response.content)
    return page


def render_audit_dir(folder: Path) -> Path:
    """Draw DIR/report.html again from the folder's database (links: the CSVs `ecif audit` wrote)."""
    from ecif_core.data.folder import AuditFolder

    from .db.models import Audit
    from .db.session import session_scope, upgrade
    from .embedded import database_url_for
    from .report import audit_report_html

    database = folder / "ecif.db"
    if not database.is_file():
        raise ConfigError("audit-dir", f"{folder} has no ecif.db: not a folder written by `ecif audit`")
    url = database_url_for(folder)
    upgrade(url)  # a folder written by an older ecif
    with session_scope(url) as session:
        audit_id = session.scalar(select(Audit.id).where(Audit.status == "succeeded")
                                  .order_by(Audit.created_at.desc()))
    if audit_id is None:
        raise ConfigError("audit-dir", f"the audit in {folder} has not succeeded: run `ecif audit` again to finish it")
    files = AuditFolder(folder)
    page = audit_report_html(url, audit_id, {"results": files.ranked.name, "rejected": files.rejected.name})
    files.report.write_text(page, encoding="utf-8")
    return files.report
