"""The Celery client and worker configuration, once: the API and the CLI send tasks through it
(services.dispatch) and the workers run it (workers.tasks registers the task bodies, by name, when
a worker starts). Settings follow the worker conventions of ../shared/docs/STYLE.md: late
acknowledgement, re-queue on worker loss, one task prefetched, a visibility timeout above the
longest shard, tasks routed by name to the `gpu` and `cpu` queues."""
from __future__ import annotations

from celery import Celery

from .settings import get_settings

BROKER_CONNECT_TIMEOUT_S, BROKER_READ_TIMEOUT_S = 5, 30
WORKER_TASKS = "workers.tasks"  # the module a worker imports at start (by name: services never import workers)


def make_app() -> Celery:
    settings = get_settings()
    app = Celery("ecif", broker=settings.broker_url or "redis://127.0.0.1:6379/0", include=[WORKER_TASKS])
    # A task of a worker that died is re-queued once it is older than visibility_timeout, by a
    # sweep every restore_interval seconds (throttle 1: every sweep scans).
    # Socket timeouts: kombu's Redis transport waits forever by default, so a broker host that drops
    # packets would hold a submission for the OS's TCP timeout instead of answering 503 (the read
    # timeout stays well above the consumer's 1 s BRPOP poll).
    transport = {"visibility_timeout": settings.visibility_timeout,
                 "unacked_restore_interval": settings.restore_interval, "unacked_restore_throttle": 1,
                 "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_S, "socket_timeout": BROKER_READ_TIMEOUT_S,
                 "socket_keepalive": True}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,  # job state lives in the database, never in a result backend
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_soft_time_limit + 300,  # hard stop, still below the visibility timeout
        task_routes={"ecif.tasks.gpu.*": {"queue": "gpu"}, "ecif.tasks.cpu.*": {"queue": "cpu"}},
        task_default_queue="cpu",
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


app = make_app()
