"""`POST /audits?dry_run=true`: the audit's cost estimate (ecif_core.estimate) without creating an audit.

The estimate times real batches, so it must run where the audit's gradients would run:
- embedded mode (no broker): in the API's own process, which runs the audits, and only while no
  audit runs there (an estimate timed against a running audit would be wrong);
- with a broker: on a gpu worker (its device and torch threads are the audit's), as the task
  ESTIMATE_TASK. The reply comes back through a Redis list of the broker named in the request
  (job state lives in the database and Celery keeps no results; an estimate is no job: nothing of
  it is stored, the reply expires after REPLY_TTL_S). A worker that does not take the task within
  ECIF_ESTIMATE_TIMEOUT seconds (all busy with shards) drops it (`expires`); the API answers 503.
"""
from __future__ import annotations

import json
import logging
import uuid
from typing import TYPE_CHECKING

from ecif_core.errors import ConfigError

from .settings import Settings

if TYPE_CHECKING:  # the worker's parent imports this module for the task name: no torch at import
    from ecif_core.data.manifest import Manifest

log = logging.getLogger("ecif.estimates")

ESTIMATE_TASK = "ecif.tasks.gpu.estimate"  # the gpu queue: the worker that would run the gradients
REPLY_PREFIX = "ecif:estimate:"
REPLY_TTL_S = 600


class EstimateUnavailable(Exception):
    """No estimate can be made now (no worker answered, an audit runs here); the message says what to do."""


def estimate_json(manifest: "Manifest", settings: Settings) -> dict:
    """The estimate measured in this process, with the service's data roots and image hosts (as prepare reads them)."""
    from ecif_core.estimate import estimate_audit

    return estimate_audit(manifest, settings.resolved_roots(), settings.remote_image_hosts).to_json()


def request_estimate(settings: Settings, manifest: "Manifest") -> dict:
    """API side with a broker: send ESTIMATE_TASK to the gpu queue and wait for its reply."""
    import redis

    from .broker import app

    if not (settings.broker_url or "").startswith(("redis://", "rediss://", "unix://")):
        raise EstimateUnavailable("dry_run needs a Redis broker (ECIF_BROKER_URL) to hear back from a worker")
    wait = settings.estimate_timeout
    reply = f"{REPLY_PREFIX}{uuid.uuid4()}"
    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=wait + 30)
    app.send_task(ESTIMATE_TASK, args=[manifest.to_json(), reply], expires=wait)
    answer = client.blpop([reply], timeout=wait)
    if answer is None:
        raise EstimateUnavailable(f"no gpu worker took the estimate within {wait} s (busy with audits, or none "
                                  "running); retry later, or run `ecif validate --estimate` on a machine like a worker")
    body = json.loads(answer[1])
    if "estimate" in body:
        return body["estimate"]
    if body.get("field"):
        raise ConfigError(body["field"], body["error"])
    raise EstimateUnavailable(f"the estimate failed on the worker: {body['error']}")


def reply_estimate(settings: Settings, manifest_json: dict, reply: str) -> None:
    """Worker side: measure, then push the estimate (or the one-line reason it failed) to `reply`."""
    import redis

    from ecif_core.data.manifest import Manifest

    try:
        body = {"estimate": estimate_json(Manifest.from_json(manifest_json), settings)}
    except ConfigError as exc:  # the manifest's fault (e.g. an image that cannot be decoded): a 422 upstream
        body = {"error": exc.message, "field": exc.field}
    except Exception as exc:  # noqa: BLE001 - any failure is answered, never left to the API's timeout
        log.exception("estimate failed")
        body = {"error": f"{type(exc).__name__}: {exc}", "field": None}
    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=30)
    client.rpush(reply, json.dumps(body))
    client.expire(reply, REPLY_TTL_S)
