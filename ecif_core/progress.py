"""Progress within one piece of work (a stage's task, the edit's solve, a trace), reported to
whoever runs it without ecif_core knowing how it is shown: the CLI draws tqdm bars from it, a
service worker passes nothing and it costs nothing."""
from __future__ import annotations

import time
from typing import Protocol


class Progress(Protocol):
    """`done` of `total` `unit`s so far (total None: not known); `detail` carries numbers worth
    showing beside the count (the edit's CG passes its relative residual). Called as work
    advances, with done never decreasing for one unit, except when a solve restarts."""

    def __call__(self, unit: str, done: int, total: int | None, **detail: float) -> None: ...


def throttled(progress: Progress | None, seconds: float = 0.2) -> Progress | None:
    """`progress` called at most every `seconds`, always for the first and the last count (done
    == total): for loops over millions of rows, where a call per row would cost more than the row."""
    if progress is None:
        return None
    last = [-float("inf")]

    def report(unit: str, done: int, total: int | None, **detail: float) -> None:
        now = time.monotonic()
        if now - last[0] >= seconds or done == total:
            last[0] = now
            progress(unit, done, total, **detail)
    return report
