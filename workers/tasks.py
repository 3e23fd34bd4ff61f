"""Celery tasks, one per stage. Each takes JSON primitives and calls services.pipeline.

torch is imported only inside a task (through the pipeline), so a prefork parent never
touches it before forking; each worker process builds its pipeline, with its model cache,
once (`worker_process_init`, or lazily in the solo pool) and reuses it across shards.
"""
from __future__ import annotations

import logging
import os

import threading

from celery.signals import worker_process_init, worker_ready
from kombu.exceptions import OperationalError as BrokerUnavailable
from sqlalchemy.exc import InterfaceError, OperationalError

from ecif_core.errors import NotReady
from ecif_core.stages.table import STAGES, Stage
from services.broker import app
from services.dispatch import CeleryDispatcher
from services.estimates import ESTIMATE_TASK
from services.liveness import REQUEST_TASKS

_pipeline = None
log = logging.getLogger("ecif.worker")


def pipeline():
    global _pipeline
    if _pipeline is None:
        from services.pipeline import Pipeline
        from services.settings import get_settings

        settings = get_settings()
        _check_store(settings.store_url)
        # No data roots configured means no image may be read (never "any image").
        _pipeline = Pipeline(settings.database_url, CeleryDispatcher(), image_roots=settings.resolved_roots(),
                             heartbeat_interval=settings.heartbeat_interval,
                             remote_image_hosts=settings.remote_image_hosts)
    return _pipeline


@worker_process_init.connect
def _init_process(**_kwargs) -> None:
    """A forked pool process: split the cores between the pool's processes, then build the pipeline."""
    from ecif_core.models.runtime import set_threads
    from services.settings import get_settings

    processes = int(os.environ.get("ECIF_WORKER_PROCESSES", "1"))
    threads = set_threads(get_settings().torch_threads, processes)  # None: cores / processes
    log.info("worker process %d: %d torch threads", os.getpid(), threads)
    pipeline()


def _check_store(store_url: str) -> None:
    """An unreachable or read-only store stops the worker at start, with the reason in its log."""
    from ecif_core.data.storage import check_writable, location

    check_writable(location(store_url, "ECIF_STORE_URL"), "ECIF_STORE_URL")


# Database or broker briefly unreachable: retry with backoff (tasks are idempotent).
RETRY = {"autoretry_for": (OperationalError, InterfaceError, BrokerUnavailable, NotReady), "retry_backoff": True,
         "retry_backoff_max": 300, "max_retries": 10}


def _stage_task(stage: Stage):
    """The Celery task of one stage: (audit_id) or (audit_id, shard), run by the pipeline."""
    if stage.sharded:
        def run(audit_id: str, shard: int) -> None:
            pipeline().run(stage.name, audit_id, shard)
    else:
        def run(audit_id: str) -> None:
            pipeline().run(stage.name, audit_id)
    run.__name__ = run.__qualname__ = stage.task.rsplit(".", 1)[-1]
    run.__doc__ = f"Stage {stage.name!r} of an audit (ecif_core.stages.table)."
    return app.task(name=stage.task, **RETRY)(run)


STAGE_TASKS = {stage.name: _stage_task(stage) for stage in STAGES}  # one task per row of the stage table


@app.task(name=REQUEST_TASKS["trace"], **RETRY)
def trace(trace_id: str) -> None:
    """The test-loss gradients need the model: the gpu queue."""
    from services.pipeline import run_trace

    pipe = pipeline()
    run_trace(pipe.database_url, trace_id, pipe.models, heartbeat_interval=pipe.heartbeat_interval)


@app.task(name=REQUEST_TASKS["edit"], **RETRY)
def edit(edit_id: str) -> None:
    """Hessian-vector products over the training pairs need the model: the gpu queue."""
    from services.pipeline import run_edit

    pipe = pipeline()
    run_edit(pipe.database_url, edit_id, heartbeat_interval=pipe.heartbeat_interval)


@app.task(name=ESTIMATE_TASK)
def estimate(manifest_json: dict, reply: str) -> None:
    """POST /audits?dry_run=true: time a few batches here, where the gradients would run, and reply
    (services.estimates); the task `expires` when no worker took it while the API waited."""
    from services.estimates import reply_estimate
    from services.settings import get_settings

    reply_estimate(get_settings(), manifest_json, reply)


@worker_ready.connect
def _start_reconciler(**_kwargs) -> None:
    """Every ECIF_RECONCILE_INTERVAL seconds, send again the tasks that are neither beating
    nor waiting in a queue for ECIF_STALL_AFTER seconds (a killed worker's, or tasks lost with
    the broker); runs in the worker's main process and imports no torch."""
    from services.liveness import queued_tasks
    from services.reconcile import find_lost_requests, find_stalls, reconcile
    from services.settings import get_settings

    settings = get_settings()
    if settings.reconcile_interval <= 0:
        return
    dispatcher = CeleryDispatcher()

    def loop() -> None:
        stop = threading.Event()
        while not stop.wait(settings.reconcile_interval):
            try:
                threshold = settings.stall_threshold()
                if not (find_stalls(settings.database_url, threshold)
                        or find_lost_requests(settings.database_url, threshold)):
                    continue  # nothing idle that long: the queues need not be read
                queued = queued_tasks(settings.broker_url)  # reads the whole queue lists
                if queued is None:
                    continue  # the broker cannot be read: nothing can be told lost
                resumed = reconcile(settings.database_url, dispatcher.send, settings.stall_threshold(), queued)
                if resumed:
                    log.warning("sent lost tasks again: %s", resumed)
            except Exception:
                log.exception("reconcile failed; retrying in %d s", settings.reconcile_interval)

    threading.Thread(target=loop, daemon=True, name="ecif-reconcile").start()
