"""The Celery app the workers run (`celery -A workers.celery_app`): configured once in services.broker,
which the API and the CLI also send tasks through."""
from __future__ import annotations

from services.broker import BROKER_CONNECT_TIMEOUT_S, BROKER_READ_TIMEOUT_S, app, make_app

__all__ = ["BROKER_CONNECT_TIMEOUT_S", "BROKER_READ_TIMEOUT_S", "app", "make_app"]
