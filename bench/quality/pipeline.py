"""The whole benchmark as one function (`run_all`): detection runs, then removal retrainings and the
fidelity experiment, on a pool of worker processes or in this process.

Independent runs go to `workers` processes with `threads` torch threads each (default 1): the tiny
model gains little from a second thread (600 pairs: about 1 s per epoch with 1 or 2), and two
processes of two threads on two cores are many times slower than either alone. Worker functions
live here, not in __main__, so spawned processes can import them.
"""
from __future__ import annotations

import os
import platform
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

from .settings import QualitySettings


def _worker_init(threads: int) -> None:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if torch.get_num_threads() != threads:  # setting the default again slows torch down (bench/RESULTS.md)
        torch.set_num_threads(threads)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def _detect(settings: QualitySettings, runs_dir: Path, task: tuple, resume: bool) -> dict:
    from .detection import detect

    corruption, fraction, seed, time_default = task
    return detect(settings, runs_dir, corruption, fraction, seed, say=say, resume=resume,
                  time_default_theta=time_default)


def _removal(settings: QualitySettings, runs_dir: Path, task: tuple) -> dict:
    from .removal import remove_and_retrain

    return remove_and_retrain(settings, runs_dir, *task, say=say)


def _fidelity(settings: QualitySettings, runs_dir: Path) -> dict:
    from .fidelity import fidelity

    return fidelity(settings, runs_dir, say=say)


class Runner:
    """Calls functions in this process (workers = 1) or in a spawned pool of single-thread processes."""

    def __init__(self, workers: int, threads: int):
        import torch

        self.pool, self.restore_threads = None, torch.get_num_threads()
        if workers > 1:
            self.pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                            initargs=(threads,))
        else:
            _worker_init(threads)

    def map(self, calls: list[tuple[Callable, tuple]]) -> list[Any]:
        if self.pool is None:
            return [fn(*args) for fn, args in calls]
        futures = [self.pool.submit(fn, *args) for fn, args in calls]
        return [f.result() for f in futures]

    def close(self) -> None:
        import torch

        if self.pool is not None:
            self.pool.shutdown()
        elif torch.get_num_threads() != self.restore_threads:  # in-process: leave the caller's setting as it was
            torch.set_num_threads(self.restore_threads)


def detection_tasks(settings: QualitySettings) -> list[tuple[str, float, int, bool]]:
    """The grid, plus the removal / fidelity runs when they are outside it; the default-theta cost
    audit rides on the first removal run."""
    grid = [(c, f, s) for c in settings.corruptions for f in settings.fractions for s in settings.seeds]
    extra = [(settings.removal_corruption, settings.removal_fraction, s)
             for s in [*settings.removal_seeds, settings.fidelity_seed]]
    tasks = list(dict.fromkeys(grid + extra))
    timed = (settings.removal_corruption, settings.removal_fraction, settings.removal_seeds[0]) \
        if settings.removal_seeds else tasks[0]
    return [(c, f, s, settings.cost_default_theta and (c, f, s) == timed) for c, f, s in tasks]


def run_all(settings: QualitySettings, out: Path, workers: int, resume: bool, threads: int = 1) -> dict:
    from . import detection, removal

    runs_dir = Path(out).resolve() / "runs"  # manifests written there hold absolute paths
    if not resume:
        shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    runner, stages, started = Runner(workers, threads), {}, time.perf_counter()
    try:
        say(f"detection: {len(detection_tasks(settings))} runs on {workers} worker(s)")
        records = runner.map([(_detect, (settings, runs_dir, t, resume)) for t in detection_tasks(settings)])
        stages["detection"] = time.perf_counter() - started
        mark = time.perf_counter()
        tasks = removal.removal_tasks(settings)
        say(f"removal: {len(tasks)} retrainings; fidelity: {settings.fidelity_subsets} subsets")
        results = runner.map([(_fidelity, (settings, runs_dir))] + [(_removal, (settings, runs_dir, t)) for t in tasks])
        stages["removal_and_fidelity"] = time.perf_counter() - mark
    finally:
        runner.close()
    baselines = {r["seed"]: r["clean"] for r in records
                 if r["corruption"] == settings.removal_corruption and abs(r["fraction"] - settings.removal_fraction) < 1e-9}
    grid = [r for r in records if r["corruption"] in settings.corruptions and r["seed"] in settings.seeds
            and any(abs(r["fraction"] - f) < 1e-9 for f in settings.fractions)]
    stages["total"] = time.perf_counter() - started
    return {"settings": settings.to_json(), "machine": _machine(workers, threads), "stage_seconds": stages,
            "detection": {"summary": detection.summarise(grid, settings),
                          "labels": {m: v.label for m, v in detection.METHODS.items()},
                          "runs": [{k: v for k, v in r.items() if k not in ("roc", "key")} for r in records]},
            "removal": removal.assemble(settings, baselines, dict(zip(tasks, results[1:]))),
            "fidelity": results[0], "cost": detection.cost_summary(grid)}


def _machine(workers: int, threads: int) -> dict:
    import open_clip
    import torch

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "platform": platform.platform(),
            "cpus": os.cpu_count(), "workers": workers, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "threads_per_worker": threads}
