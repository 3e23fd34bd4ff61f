"""Specific exceptions; each names the offending field or row so a caller can report it as is."""
from __future__ import annotations



class EcifError(Exception):
    """Base class of everything ecif_core raises on purpose."""


class ConfigError(EcifError, ValueError):
    """A manifest, option or model config is wrong; `field` names the offending key."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # picklable across processes (a worker pool re-raises it in the parent)
        return (type(self), (self.field, self.message))


class NotReady(EcifError):
    """A stage ran before the stage it needs finished (a task delivered out of order): retryable;
    the same task succeeds once the earlier stage is done, and the audit is not failed."""


class InconsistentAudit(EcifError):
    """The audit's stored results contradict each other (shards scored with different dampings):
    not retryable; the audit fails with this message and must be re-scored."""


class NonFiniteResult(EcifError):
    """A computation gave NaN or infinity where a number was needed (an edit's parameter change):
    not retryable; the request fails with this message instead of storing the number."""


class ModelSourceError(ConfigError):
    """The model cannot be built from local files alone (ecif_core never downloads weights)."""
