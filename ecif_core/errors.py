"""Specific exceptions; each names the offending field or row so a caller can report it as is."""
from __future__ import annotations


class EcifError(Exception):
    """Base class of everything ecif_core raises on purpose."""


class ConfigError(EcifError, ValueError):
    """A manifest, option or model config is wrong; `field` names the offending key."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class ModelSourceError(ConfigError):
    """The model cannot be built from local files alone (ecif_core never downloads weights)."""
