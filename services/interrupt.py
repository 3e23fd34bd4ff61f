"""Ctrl-C (SIGINT) ends a command with one line and exit status 130, never a traceback, and
leaves no half-written output behind (an audit's finished shards are kept: they are how a
rerun resumes)."""
from __future__ import annotations

import argparse
import contextlib
import shutil
from pathlib import Path
from typing import Iterator

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


def interrupted_line(args: argparse.Namespace) -> str:
    """What the person who pressed Ctrl-C can do next, for the verb that was stopped."""
    if args.verb == "audit":
        return (f"interrupted; run the same command again to resume ({args.out}: finished shards are kept, "
                "the audit goes on where it stopped)")
    if args.verb == "edit" and getattr(args, "audit_dir", None):
        return f"interrupted; nothing was written to {args.out} (run the command again to edit)"
    if args.verb in ("submit", "status", "results", "retry", "trace", "preview", "edit") and getattr(args, "audit_id", None):
        return "interrupted; the server's audits, traces and edits go on (`ecif status ID` shows them)"
    return "interrupted"


def close_progress_bars() -> None:
    """Close the bars still open, so the interrupted line is the last one printed (an open
    tqdm bar redraws itself when the interpreter exits)."""
    import sys

    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        bar.close()


@contextlib.contextmanager
def removed_if_interrupted(out: str | Path) -> Iterator[None]:
    """Remove what the block created in the local folder `out` when Ctrl-C stops it: the whole
    folder if it did not exist, else only the entries that were not there before."""
    from ecif_core.data.storage import is_remote

    if is_remote(out):
        yield
        return
    folder = Path(out)
    before = set(folder.iterdir()) if folder.is_dir() else None
    try:
        yield
    except KeyboardInterrupt:
        for path in ([folder] if before is None else sorted(set(folder.iterdir()) - before)) if folder.exists() else []:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise
