"""Service settings, read from ECIF_* environment variables (pydantic-settings).

The defaults are the embedded mode: a SQLite file and a local store folder, no broker
(tasks run in-process). Setting ECIF_BROKER_URL switches submission to Celery workers.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ecif_core.data.confine import Roots, data_roots
from ecif_core.data.remote import canonical_entry
from ecif_core.data.storage import location


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ECIF_", extra="ignore")

    database_url: str = Field("sqlite:///ecif_data/ecif.db", description="SQLAlchemy URL (postgresql+psycopg://...)")
    broker_url: str | None = Field(None, description="Celery broker (redis://...); unset = run tasks in-process")
    store_url: str = Field("ecif_data/audits", description="folder or object-store URL (s3://bucket/prefix) holding "
                           "one audit folder per audit; endpoint and credentials from the AWS_* environment")
    data_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated folders or s3:// prefixes manifests, images and "
        "checkpoints may be read from (API and workers)")
    allow_hard_links: bool = Field(False, description="read pair files and images under the data roots that are "
                                   "hard links (a file with several names; another name may lie outside every root, "
                                   "so they are refused by default); snapshots made with `cp -al` need it")
    remote_image_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated hosts a manifest's remote_images may name (empty: "
        "http(s) images are refused); an allowlist so manifests cannot make the service fetch internal hosts. "
        "`host` allows http on 80 and https on 443 only, `host:port` exactly that port; loopback, private and "
        "link-local addresses are refused unless listed as host:port here (API and workers)")
    max_manifest_bytes: int = Field(1_048_576, description="larger manifests are refused with 413")
    max_shards: int = Field(100_000, description="shards one webdataset source may name (brace patterns are "
                            "counted before they are expanded); more -> 422")
    visibility_timeout: int = Field(6 * 3600, description="seconds before an unacknowledged task is redelivered")
    restore_interval: int = Field(60, description="seconds between sweeps that re-queue tasks of lost workers")
    reconcile_interval: int = Field(30, description="seconds between a worker's checks for lost tasks (0 = off)")
    heartbeat_interval: float = Field(15, description="seconds between the beats a running task writes to the database")
    stall_after: float = Field(60, description="seconds a task may be neither beating nor queued before it is "
                               "sent again (at least 4 heartbeat intervals are used)")
    task_soft_time_limit: int = Field(3 * 3600, description="seconds a single shard task may run")
    estimate_timeout: int = Field(300, description="seconds POST /audits?dry_run=true waits for a gpu worker to "
                                  "time the estimate's batches (then 503)")
    torch_threads: int | None = Field(None, description="torch threads per worker process (default: cores / processes)")
    metrics_token: str | None = Field(None, description="bearer token for /metrics with every owner's counts "
                                      "(unset: /metrics needs an API key and counts that owner's audits only)")
    host: str = "127.0.0.1"
    port: int = 8000
    server_url: str = Field("http://127.0.0.1:8000", description="API address used by ecif submit/status/results")
    api_key: str | None = Field(None, description="key used by ecif submit/status/results")

    @field_validator("data_roots", "remote_image_hosts", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)):  # paths given in code (Path objects) are folders too
            return [str(part) for part in value]
        return value

    @field_validator("remote_image_hosts")
    @classmethod
    def _host_entries(cls, value: list[str]) -> list[str]:
        """A bad entry fails at start (a URL or a path would otherwise never match anything)."""
        try:
            return [canonical_entry(entry) for entry in value]
        except ValueError as exc:
            raise ValueError(f"ECIF_REMOTE_IMAGE_HOSTS: {exc} is not a host or host:port") from None

    @field_validator("store_url")
    @classmethod
    def _known_store(cls, value: str) -> str:
        """A scheme fsspec does not serve here fails at start, never becomes a folder named "s3:"."""
        location(value, "ECIF_STORE_URL")
        return value

    def stall_threshold(self) -> float:
        """Seconds without a heartbeat or a queued task after which work counts as lost."""
        return max(self.stall_after, 4 * self.heartbeat_interval)

    def resolved_roots(self) -> Roots:
        """Data roots with symlinks resolved, so a link inside a root cannot point out of it
        (object-store prefixes with '..' folded), carrying the hard-link policy to every open."""
        return data_roots(self.data_roots, self.allow_hard_links)


@lru_cache
def get_settings() -> Settings:
    return Settings()
