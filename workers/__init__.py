"""Celery app and tasks: thin wrappers over the stages in services.pipeline."""
