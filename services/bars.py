"""The command line's progress bars (tqdm, on stderr): what is counted, of how many, real elapsed
time and an ETA. A rate is shown only for units that come in numbers (rows, pairs, test examples):
"1 step/s" of a one-step stage says nothing."""
from __future__ import annotations

import sys
from typing import Callable

RATE_UNITS = ("row", "pair", "example")


def _format(unit: str, total: int | None) -> str:
    rate = ", {rate_fmt}" if unit in RATE_UNITS else ""
    if total is None:
        return "{desc}: {n_fmt} {unit}s [{elapsed}" + rate + "{postfix}]"
    return "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit}s [{elapsed}<{remaining}" + rate + "{postfix}]"


def _new_bar(desc: str, unit: str, total: int | None):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=True, bar_format=_format(unit, total),
                dynamic_ncols=True)


def _move(bar, done: int, total: int | None, detail: dict[str, float]) -> None:
    """Set the bar to `done` of `total` (a total learnt late, a count that restarts: the edit's retry).
    An `eta_s` detail (the edit's CG: from the residual's decay and the time budget) replaces tqdm's
    own estimate, which assumes every one of `total` iterations will run."""
    detail = dict(detail)
    eta = detail.pop("eta_s", None)
    if total != bar.total or eta is not None:
        bar.total, bar.bar_format = total, _format(bar.unit, total)
    if eta is not None and total is not None:
        bar.bar_format = bar.bar_format.replace("{remaining}", bar.format_interval(eta))
    if detail:
        bar.set_postfix({k: f"{v:.3g}" for k, v in detail.items()}, refresh=False)
    bar.n = done  # drawn now: the callers report per batch or throttled, never per pair
    bar.refresh()


def stage_bars(unit_of: Callable[[str], str]) -> Callable[..., None]:
    """`report(stage, done, total, unit=None)`: one bar per stage, counting `unit_of(stage)` (or `unit`)."""
    bars: dict = {}

    def report(stage: str, done: int, total: int | None, unit: str | None = None) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = _new_bar(f"{stage:<10}", unit or unit_of(stage), total)
        if bar.disable:  # closed at its total
            return
        _move(bar, done, total, {})
        if total is not None and done >= total:
            bar.close()
    return report


class TaskBars:
    """An ecif_core.progress.Progress drawing one bar per unit in turn (a trace: test examples, then
    shards read), with its details beside the count (the edit's CG: the relative residual). A bar
    is closed when the next unit starts, at its total, or by `close` (a CG that converged early)."""

    def __init__(self, desc: str) -> None:
        self.desc, self.bars = desc, {}

    def __call__(self, unit: str, done: int, total: int | None, **detail: float) -> None:
        bar = self.bars.get(unit)
        if bar is None:
            self.close()
            bar = self.bars[unit] = _new_bar(self.desc, unit, total)
        _move(bar, done, total, detail)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
