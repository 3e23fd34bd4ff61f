"""A PostgreSQL cluster of a test's own (initdb in a temporary folder, its own free port), so a
test can stop and start the database under a running service. Used through the `scratch_pg`
fixture of conftest.py."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.services.processes import free_port


def postgres_bindir() -> Path:
    """Debian's newest /usr/lib/postgresql/<version>/bin, else the one `pg_config` names."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        return Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout.strip())
    raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl): install postgresql")


class ScratchPostgres:
    """initdb, start and stop of a throwaway cluster. initdb refuses root, so as root the
    cluster's folder belongs to, and its commands run as, the `postgres` user."""

    def __init__(self, password: str = "scratch-secret") -> None:
        self.bindir = postgres_bindir()
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="ecif-pg-"))  # short: the socket path has a length limit
        self.data = self.folder / "data"
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.folder, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8",
                  "--locale=C")
        # Trust authentication ignores the password; it is in the URL so tests can check it never leaks.
        self.url = f"postgresql+psycopg://postgres:{password}@127.0.0.1:{self.port}/postgres"
        self.password = password

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([*self.as_postgres, str(self.bindir / tool), *args], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            log = self.folder / "server.log"
            raise RuntimeError(f"{tool} failed: {result.stdout}{result.stderr}"
                               f"{log.read_text()[-2000:] if log.exists() else ''}")

    def start(self) -> None:
        """Returns once the server accepts connections (fsync off: a test cluster)."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"), "-w", "-o",
                  f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -F", "start")

    def stop(self) -> None:
        """A fast shutdown: open connections are cut, as when the database goes down."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def remove(self) -> None:
        if self.running():
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
