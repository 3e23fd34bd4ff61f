"""`python -m bench.fix` (runs `main` here; worker functions live in this module so spawned processes can
import them): does acting on the audit give a better model than acting on CLIPScore?

    OMP_NUM_THREADS=1 python -m bench.fix --preset small --workers 2 [--out bench/out/fix]
    python -m bench.fix --preset small --tables-only        # tables from the records finished so far
    python -m bench.fix --preset small --edit-theta visual.proj text_projection   # the edit on the projections

Cells are bench.quality's fine-tuning cells (a pretrained tiny CLIP fine-tuned on corrupted shapes pairs,
then audited with the product's defaults) plus clean controls. On each, every list of bench.fix.settings
is acted on four ways (retrain or edit; remove or demote) and the resulting model is measured on the clean
test split (bench.fix.evaluate). Everything is resumable: each cell and each action writes its record when
it finishes, and a rerun does only what is missing. Results: OUT/fix/RESULTS.md and OUT/fix/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ecif_core.edit.settings import METHODS  # noqa: E402
from ecif_core.edit.solver import CURVATURES  # noqa: E402

from .settings import ACTIONS, LISTS, PRESETS, FixSettings  # noqa: E402


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def _worker_init() -> None:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def cells_of(settings: FixSettings) -> list:
    """bench.quality's cells of the preset, then a clean control (0%, attribute, full) per regime and seed."""
    from bench.quality.finetune.cells import CellSpec, cell_specs

    clean = [CellSpec(regime, "attribute", "full", 0.0, seed, "test", False)
             for regime in settings.finetune.regimes for seed in settings.clean_seeds]
    return cell_specs(settings.finetune) + clean


def _cell(settings: FixSettings, out: Path, cell: Any, config: Path, base: Path) -> list[tuple]:
    """Run (or reuse) the cell, then return its action tasks."""
    from bench.quality.finetune.cells import run_cell

    record = run_cell(settings.finetune, out, cell, config, base, say=say)
    from .actions import reference_names
    from bench.calibration import LEARNED_TOP1

    top1 = record["retrieval"]["finetuned"]["top1"]
    say(f"{cell.name}: clean i2t top-1 {top1:.3f} (learned its data: {top1 >= LEARNED_TOP1})")

    return ([("reference", cell, name) for name in reference_names(settings)]
            + [("act", cell, name, action) for name in settings.lists for action in settings.actions])


def _task(settings: FixSettings, out: Path, task: tuple, config: Path, base: Path) -> dict:
    from .actions import act, reference_record

    if task[0] == "reference":
        record = reference_record(settings, out, task[1], task[2], config, base)
    else:
        record = act(settings, out, task[1], task[2], task[3], config, base)
    label = f"{task[1].name} {' '.join(task[2:])}"
    if "metrics" in record:
        m = record["metrics"]
        say(f"{label}: i2t {m['i2t_top1']:.3f} t2i {m['t2i_top1']:.3f} loss {m['test_loss']:.3f}"
            + (f" in {record['seconds']:.0f}s" if "seconds" in record else ""))
    return record


def all_records(out: Path, settings: FixSettings) -> list[dict]:
    """The finished records of this run's cells: a folder shared by a `--dev` run and a test run tables each
    run's own cells (a cell's key leaves its seed out, so the key alone would mix them)."""
    from .actions import cached, records_folder

    names = {cell.name for cell in cells_of(settings)}
    return [r for path in sorted(records_folder(out, settings).glob("*/*.json"))
            if path.parent.name in names and (r := cached(settings, path)) is not None]


def write_outputs(settings: FixSettings, out: Path, command: str) -> dict:
    from .actions import records_folder
    from .report import markdown
    from .tables import summarise

    folder = records_folder(out, settings)
    folder.mkdir(parents=True, exist_ok=True)
    results = {"command": command, "settings": settings.to_json(), **summarise(all_records(out, settings))}
    results["groups"] = {g: {f"{k[0]} / {k[1]}": v for k, v in e.items()} for g, e in results["groups"].items()}
    results["decision"] = {g: {**d, "best": list(d["best"]), "cheapest_near_best": list(d["cheapest_near_best"])}
                           for g, d in results["decision"].items()}
    for name, text in (("results.json", json.dumps(results, indent=1)), ("RESULTS.md", markdown(results))):
        tmp = folder / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, folder / name)
    return results


def run(settings: FixSettings, out: Path, workers: int, command: str = "") -> dict:
    """The base, every cell, every action on it (cells first: a cell's actions start as soon as it is done)."""
    import torch

    from bench.quality.finetune.base import ensure_base

    out = Path(out).resolve()  # manifests hold absolute paths
    out.mkdir(parents=True, exist_ok=True)
    restore_threads = torch.get_num_threads()
    _worker_init()
    try:
        base = ensure_base(settings.finetune, out, say)
        pool = (ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init)
                if workers > 1 else _InProcess())
        return _run_all(settings, out, pool, base, command)
    finally:
        if torch.get_num_threads() != restore_threads:  # in-process: leave the caller's setting as it was
            torch.set_num_threads(restore_threads)


class _InProcess:
    """The pool's interface, running each call at once in this process (workers = 1; tests can patch it)."""

    def submit(self, fn: Any, *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def __enter__(self) -> "_InProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _run_all(settings: FixSettings, out: Path, pool: Any, base: Any, command: str) -> dict:
    started, errors = time.perf_counter(), 0
    with pool:
        running: dict[Future, tuple] = {pool.submit(_cell, settings, out, c, base.config, base.checkpoint): ("cell", c)
                                        for c in cells_of(settings)}
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                what = running.pop(future)
                try:
                    value = future.result()
                except Exception:  # one broken cell or action must not lose the others
                    errors += 1
                    say(f"{what[1].name} {' '.join(what[2:]) if len(what) > 2 else ''} failed:\n{traceback.format_exc()}")
                    continue
                if what[0] == "cell":
                    for task in value:
                        running[pool.submit(_task, settings, out, task, base.config, base.checkpoint)] = task
            write_outputs(settings, out, command)
    say(f"done in {time.perf_counter() - started:.0f}s with {errors} failure(s)")
    return write_outputs(settings, out, command)


def parse_args(argv: list[str]) -> tuple[FixSettings, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench.fix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--out", default=None, help="default bench/out/fix (bench/out/fix-quick for --preset quick)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lists", nargs="+", choices=sorted(LISTS), default=None)
    parser.add_argument("--actions", nargs="+", choices=ACTIONS, default=None)
    parser.add_argument("--edit-theta", nargs="+", default=None, help="parameters the edit changes (default: the audit's theta)")
    parser.add_argument("--edit-curvature", choices=CURVATURES, default=None, help="the edit's curvature (default hessian)")
    parser.add_argument("--edit-method", choices=METHODS, default=None, help="the edit's method (default replay)")
    parser.add_argument("--tag", default=None, help="records in OUT/fix-TAG (a variant on the same cells)")
    parser.add_argument("--dev", action="store_true",
                        help="bench.quality's development seeds instead of the test seeds, no clean control (choose here)")
    parser.add_argument("--corruptions", nargs="+", default=None, help="only these corruptions (LoRA cells too)")
    parser.add_argument("--no-lora", action="store_true", help="leave the LoRA fine-tunes out")
    parser.add_argument("--tables-only", action="store_true", help="write the tables of the finished records, run nothing")
    args = parser.parse_args(argv)
    settings = PRESETS[args.preset]()
    for name in ("lists", "actions", "edit_theta", "edit_curvature", "edit_method", "tag"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if args.dev:
        from bench.quality.finetune.settings import FinetuneSettings

        settings.finetune.dev_seeds = FinetuneSettings().dev_seeds
        settings.finetune.test_seeds, settings.clean_seeds = [], []
    if args.corruptions is not None:
        settings.finetune.corruptions = [c for c in settings.finetune.corruptions if c in args.corruptions]
        settings.finetune.lora_corruptions = [c for c in settings.finetune.lora_corruptions if c in args.corruptions]
    if args.no_lora:
        settings.finetune.lora_corruptions = []
    args.out = args.out or ("bench/out/fix-quick" if args.preset == "quick" else "bench/out/fix")
    return settings, args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    settings, args = parse_args(argv)
    command = " ".join(["python -m bench.fix", *argv])
    if args.tables_only:
        return write_outputs(settings, Path(args.out).resolve(), command)
    return run(settings, Path(args.out), args.workers, command)
