"""`python -m bench.quality --regime same_domain|domain_shift|all`: the grid of cells on a process pool.

    python -m bench.quality --regime all --workers 2 --out /work/bench-out/finetune
    python -m bench.quality --regime same_domain --quick          # the test suite's run (under a minute)
    python -m bench.quality --regime all --tables-only           # tables from the cells finished so far

The base is pretrained (or taken from its cache) in this process; then every unfinished cell goes to
`--workers` spawned processes with one torch thread each (two processes of one thread are several times
faster than one of two on a 2-core machine). Each finished cell writes OUT/cells/<name>.json at once and
results.json / RESULTS.md are rewritten after every cell, so an interrupted run keeps its tables and a
rerun does only the cells that are missing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .settings import REGIMES, FinetuneSettings, quick  # noqa: E402


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def _worker_init(threads: int) -> None:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _cell(settings: FinetuneSettings, out: Path, spec: Any, config: Path, base: Path) -> dict:
    from .cells import run_cell

    return run_cell(settings, out, spec, config, base, say=say)


def parse_args(argv: list[str]) -> tuple[FinetuneSettings, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench.quality --regime ...", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regime", required=True, choices=[*REGIMES, "all"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 seed, 1 corruption, no cross-fitting")
    parser.add_argument("--out", default=None, help="default bench/out/finetune (bench/out/finetune-quick with --quick)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default 2, --quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--tables-only", action="store_true", help="write the tables of the finished cells, run nothing")
    defaults = FinetuneSettings()
    for name, value in defaults.to_json().items():
        if name == "regimes":
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, dict):
            parser.add_argument(flag, type=json.loads, default=argparse.SUPPRESS, metavar="JSON",
                                help="per regime, e.g. '{\"same_domain\": 3, \"domain_shift\": 8}'")
        elif isinstance(value, list):
            item = type(value[0]) if value else str
            parser.add_argument(flag, type=item, nargs="*", default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, type=type(value), default=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    regimes = list(REGIMES) if args.regime == "all" else [args.regime]
    settings = quick(regimes) if args.quick else FinetuneSettings(regimes=regimes)
    for name in defaults.to_json():
        if name != "regimes" and hasattr(args, name):
            setattr(settings, name, getattr(args, name))
    if args.workers is None:
        args.workers = 1 if args.quick else 2
    if args.out is None:
        args.out = "bench/out/finetune-quick" if args.quick else "bench/out/finetune"
    return settings, args


def collect(settings: FinetuneSettings, out: Path, base_record: dict, command: str, started: float,
            errors: dict[str, str], workers: int, threads: int) -> dict[str, Any]:
    """results.json's content from the cells finished with these settings (any subset of the grid)."""
    from . import tables
    from .cells import cached_result, cell_specs

    specs = cell_specs(settings)
    records = [r for s in specs if (r := cached_result(settings, out, s)) is not None]
    return {"command": command, "settings": settings.to_json(), "machine": _machine(workers, threads),
            "cells_total": len(specs), "cells_finished": len(records), "errors": errors,
            "elapsed_seconds": time.perf_counter() - started,
            "base": {k: v for k, v in base_record.items() if k != "key"},
            "test": tables.summarise(records, "test"), "dev": tables.summarise(records, "dev"),
            "cost": tables.cost_summary(records), "targets": tables.targets(records, str(out)),
            "cells": [r["name"] for r in records]}


def write_outputs(results: dict[str, Any], out: Path) -> None:
    from . import tables

    for name, text in (("results.json", json.dumps(results, indent=1)), ("RESULTS.md", tables.markdown(results))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


def run(settings: FinetuneSettings, out: Path, workers: int, threads: int = 1, command: str = "",
        tables_only: bool = False, log: Callable[[str], None] = say) -> dict[str, Any]:
    """Base, then every unfinished cell; returns the results (also written to OUT)."""
    out = Path(out).resolve()  # manifests hold absolute paths
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if tables_only:
        record_path = out / "base" / "base.json"
        base_record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        results = collect(settings, out, base_record, command, started, {}, workers, threads)
        write_outputs(results, out)
        return results
    import torch

    restore_threads = torch.get_num_threads()
    try:
        if workers <= 1:
            _worker_init(threads)
        return _run_grid(settings, out, workers, threads, command, log, started)
    finally:
        if torch.get_num_threads() != restore_threads:  # in-process: leave the caller's setting as it was
            torch.set_num_threads(restore_threads)


def _run_grid(settings: FinetuneSettings, out: Path, workers: int, threads: int, command: str,
              log: Callable[[str], None], started: float) -> dict[str, Any]:
    from .base import ensure_base
    from .cells import cached_result, cell_specs

    base = ensure_base(settings, out, log)
    specs = cell_specs(settings)
    pending = [s for s in specs if cached_result(settings, out, s) is None]
    log(f"{len(specs)} cells, {len(specs) - len(pending)} finished before; {len(pending)} to run on {workers} worker(s)")
    errors: dict[str, str] = {}

    def refresh() -> dict[str, Any]:
        results = collect(settings, out, base.record, command, started, errors, workers, threads)
        write_outputs(results, out)
        return results

    if workers <= 1:
        for spec in pending:
            try:
                _cell(settings, out, spec, base.config, base.checkpoint)
            except Exception as exc:  # one broken cell must not lose the others
                errors[spec.name] = f"{type(exc).__name__}: {exc}"
                log(f"{spec.name} failed:\n{traceback.format_exc()}")
            refresh()
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(threads,)) as pool:
            futures = {pool.submit(_cell, settings, out, s, base.config, base.checkpoint): s for s in pending}
            remaining = set(futures)
            while remaining:
                finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for future in finished:
                    spec = futures[future]
                    try:
                        future.result()
                    except Exception as exc:
                        errors[spec.name] = f"{type(exc).__name__}: {exc}"
                        log(f"{spec.name} failed: {errors[spec.name]}")
                refresh()
                log(f"{len(specs) - len(remaining)} of {len(specs)} cells done ({time.perf_counter() - started:.0f}s)")
    results = refresh()
    log(f"done in {time.perf_counter() - started:.0f}s: {out / 'RESULTS.md'}, {out / 'results.json'}")
    return results


def _machine(workers: int, threads: int) -> dict:
    import open_clip
    import torch

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "platform": platform.platform(),
            "cpus": os.cpu_count(), "workers": workers, "threads_per_worker": threads, "torch": torch.__version__,
            "open_clip": open_clip.__version__}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    settings, args = parse_args(argv)
    return run(settings, Path(args.out), args.workers, args.threads, " ".join(["python -m bench.quality", *argv]),
               args.tables_only)
