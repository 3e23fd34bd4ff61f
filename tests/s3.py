"""A real S3-compatible server for the tests: moto's server mode on 127.0.0.1, in its own process.

The client side is configured the way a user configures it, through the standard AWS
environment (AWS_ENDPOINT_URL and the credential variables), never through a manifest.
"""
from __future__ import annotations

import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.services.processes import free_port



@dataclass
class S3Server:
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client process needs: endpoint, credentials, region (moto accepts any key)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "ecif-test", "AWS_SECRET_ACCESS_KEY":
                "ecif-test-secret", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}

    def start(self, log: Path) -> None:
        handle = log.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(self.endpoint, timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"moto server did not start; log: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def new_bucket(self, prefix: str = "ecif") -> str:
        """A fresh, empty bucket's name."""
        import s3fs

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
        return name


def upload_tree(local: Path, url: str) -> None:
    """Copy a local folder's files under an s3:// prefix (as a user's `aws s3 sync` would)."""
    from ecif_core.data.storage import location, write_bytes

    root = location(url)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        write_bytes(root / path.relative_to(local).as_posix(), path.read_bytes())


def object_bytes(url: str) -> int:
    """Total size of the objects under an s3:// prefix."""
    from ecif_core.data.storage import location

    root = location(url)
    return sum(size for size in root.fs.du(root.path, total=False).values())
