"""HTTP client for `ecif submit | status | retry | results` (server URL and key from flags or ECIF_*)."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import BinaryIO, Callable

import httpx

from ecif_core.errors import EcifError
from ecif_core.data.manifest import with_paths

FINISHED = ("succeeded", "failed", "cancelled")


class ApiError(EcifError):
    """The server refused a request; the message is its own."""


class Unreachable(ApiError):
    """No answer from the server (refused, unknown host, timed out): one line, never httpx's traceback."""


class _Http(httpx.Client):
    """httpx's client whose transport errors (every request goes through `send`) are Unreachable."""

    def send(self, request: httpx.Request, **kwargs) -> httpx.Response:
        try:
            return super().send(request, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise Unreachable(f"cannot reach {self.base_url}; is `ecif serve` running? ({_reason(exc)})") from None
        except httpx.TransportError as exc:
            raise Unreachable(f"no answer from {self.base_url} ({type(exc).__name__}: {_reason(exc)}); "
                              "is `ecif serve` running?") from None


def _reason(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


class Client:
    def __init__(self, server_url: str, api_key: str | None, timeout: float = 30.0) -> None:
        if not api_key:
            raise ApiError("no API key: pass --key or set ECIF_API_KEY (ecif keys create --owner NAME)")
        self.http = _Http(base_url=server_url.rstrip("/"), timeout=timeout,
                          headers={"Authorization": f"Bearer {api_key}"})

    def submit(self, manifest_path: str | Path) -> str:
        response = self.http.post("/audits", json=absolute_paths(manifest_path))
        return self._json(response)["id"]

    def status(self, audit_id: str) -> dict:
        return self._json(self.http.get(f"/audits/{audit_id}"))

    def retry(self, audit_id: str) -> dict:
        """Resume a failed or cancelled audit where it stopped; its new status."""
        return self._json(self.http.post(f"/audits/{audit_id}/retry"))

    def wait(self, audit_id: str, on_status: Callable[[dict], None] | None = None, poll: float = 1.0) -> dict:
        while True:
            status = self.status(audit_id)
            if on_status:
                on_status(status)
            if status["status"] in FINISHED:
                return status
            time.sleep(poll)

    def results(self, audit_id: str, out: str | Path | BinaryIO, limit: int | None = None,
                suspected_only: bool = False) -> str | Path | BinaryIO:
        """ranked.csv into the file `out` (a path, or an open binary file such as stdout)."""
        params = {"suspected_only": str(suspected_only).lower(), **({"limit": limit} if limit else {})}
        with self.http.stream("GET", f"/audits/{audit_id}/results.csv", params=params) as response:
            if response.status_code != 200:
                response.read()
                self._json(response)
            with contextlib.nullcontext(out) if hasattr(out, "write") else Path(out).open("wb") as handle:
                for chunk in response.iter_bytes():
                    handle.write(chunk)
        return out

    def trace(self, audit_id: str, tests: list[dict], k: int) -> str:
        response = self.http.post(f"/audits/{audit_id}/traces", json={"tests": tests, "k": k})
        return self._json(response)["trace_id"]

    def wait_trace(self, audit_id: str, trace_id: str, poll: float = 0.5) -> dict:
        while True:
            status = self._json(self.http.get(f"/audits/{audit_id}/traces/{trace_id}"))
            if status["status"] in ("succeeded", "failed"):
                return status
            time.sleep(poll)

    def preview(self, audit_id: str, remove: str) -> dict:
        return self._json(self.http.get(f"/audits/{audit_id}/preview", params={"remove": remove}))

    def create_edit(self, audit_id: str, body: dict) -> dict:
        return self._json(self.http.post(f"/audits/{audit_id}/edits", json={k: v for k, v in body.items() if v is not None}))

    def wait_edit(self, status_url: str, poll: float = 0.5) -> dict:
        while True:
            status = self._json(self.http.get(status_url))
            if status["status"] in ("succeeded", "failed"):
                return status
            time.sleep(poll)

    def download_edit(self, checkpoint_url: str, out: Path) -> Path:
        """Unpack the edit (checkpoint, its sidecars, edit.json) into folder `out`."""
        import io
        import zipfile

        response = self.http.get(checkpoint_url)
        if response.status_code != 200:
            self._json(response)
        out.mkdir(parents=True, exist_ok=True)
        zipfile.ZipFile(io.BytesIO(response.content)).extractall(out)
        return out

    @staticmethod
    def _json(response: httpx.Response) -> dict:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            if isinstance(detail, list) and detail and isinstance(detail[0], dict):
                detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])[1:]))}: {d.get('msg')}" for d in detail)
            raise ApiError(f"server answered {response.status_code}: {detail}")
        return response.json()


def absolute_paths(manifest_path: str | Path) -> dict:
    """The manifest with its relative paths made absolute against its own folder, as the
    embedded mode reads them (the server checks them against its data roots)."""
    path = Path(manifest_path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ApiError(f"manifest: cannot read {path}: {exc}") from None
    base = path.resolve().parent
    raw = with_paths(raw, lambda _, value: value if "://" in value else str((base / value).resolve()))
    return raw


def client_from_args(args) -> Client:
    """The client every client verb uses: --server/--key, else ECIF_SERVER_URL/ECIF_API_KEY."""
    from .settings import get_settings

    settings = get_settings()
    return Client(args.server or settings.server_url, args.key or settings.api_key)
