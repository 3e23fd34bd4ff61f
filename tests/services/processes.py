"""Real `ecif serve` and `ecif worker` processes for the integration tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.conftest import one_thread_env


def ecif_command() -> list[str]:
    """The installed `ecif` script next to this interpreter (as a user runs it)."""
    script = Path(sys.executable).parent / "ecif"
    return [str(script)] if script.exists() else [sys.executable, "-m", "services.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    env: dict[str, str]
    logs: Path
    port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*ecif_command(), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def spawn(self, name: str, *args: str, cwd: Path | None = None, **env: str) -> subprocess.Popen:
        """`cwd` and `env`: this process's own working folder and extra variables (a machine of its own)."""
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen([*ecif_command(), *args], env={**self.env, **env}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
        self.processes.append(process)
        return process

    def start_server(self, cwd: Path | None = None, **env: str) -> None:
        self.spawn("server", "serve", "--port", str(self.port), cwd=cwd, **env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server did not become ready; log: {(self.logs / 'server.log').read_text()[-3000:]}")

    def start_worker(self, name: str, queues: str = "gpu,cpu", concurrency: int = 1, cwd: Path | None = None,
                     **env: str) -> subprocess.Popen:
        return self.spawn(name, "worker", "--queues", queues, "--concurrency", str(concurrency),
                          "--hostname", f"{name}@%h", "--loglevel", "INFO", cwd=cwd, **env)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def service_env(database_url: str, broker_url: str, store: Path | str, data_root: Path | str,
                **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECIF_")}
    env.update(HF_HUB_OFFLINE="1", ECIF_DATABASE_URL=database_url, ECIF_BROKER_URL=broker_url,
               ECIF_STORE_URL=str(store), ECIF_DATA_ROOTS=str(data_root), PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    return one_thread_env(env)
