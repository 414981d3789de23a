"""A small client of the REST API (used by the demo, the benchmarks and the tests)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"succeeded", "failed", "cancelled"}


class ApiError(Exception):
    def __init__(self, response: httpx.Response):
        self.status = response.status_code
        self.retry_after = response.headers.get("Retry-After")
        try:
            self.problem = response.json()
        except ValueError:
            self.problem = {"detail": response.text}
        super().__init__(f"{self.status}: {self.problem.get('detail')}")


def _retry_after(exc: ApiError) -> float:
    """Seconds an error asks the client to wait (its Retry-After), 1 when it does not say."""
    try:
        return float(exc.retry_after or 1.0)
    except ValueError:  # an HTTP date: not sent by this gateway
        return 1.0


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            raise ApiError(r)
        return r

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the service did not become ready")
            time.sleep(0.3)

    def builtin_dataset(self, name: str, split: str | None = None) -> dict[str, Any]:
        body = {"builtin": name, **({"split": split} if split else {})}
        return self._check(self.http.post("/v1/datasets", json=body)).json()

    def upload_dataset(self, path: Path, name: str | None = None,
                       on_bytes: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Upload a .zip of images; `on_bytes(n)` is called as each chunk of n bytes is sent."""
        with open(path, "rb") as raw:
            f = _Counting(raw, on_bytes) if on_bytes else raw
            files = {"file": (Path(path).name, f, "application/zip")}
            data = {"name": name} if name else {}
            return self._check(self.http.post("/v1/datasets", files=files, data=data)).json()

    def datasets(self, limit: int = 50) -> list[dict[str, Any]]:
        return self._check(self.http.get("/v1/datasets", params={"limit": limit})).json()["items"]

    def jobs(self, limit: int = 50, status: str | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit, **({"status": status} if status else {})}
        return self._check(self.http.get("/v1/jobs", params=params)).json()["items"]

    def submit(
        self,
        type_: str,
        dataset_id: str,
        params: dict | None = None,
        inputs: dict | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"type": type_, "dataset_id": dataset_id, "params": params or {}, "inputs": inputs or {}}
        return self._check(self.http.post("/v1/jobs", json=body, headers=headers)).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}")).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.post(f"/v1/jobs/{job_id}/cancel")).json()

    def wait(
        self,
        job_id: str,
        timeout: float = 3600,
        poll_s: float = 1.0,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll a job until it ends, riding out a gateway or store that is briefly unavailable.

        A 503 (the job store restarting, say) is retried after the answer's Retry-After, until
        `timeout`; any other error, an unreachable gateway included, ends the wait at once."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                job = self.job(job_id)
            except ApiError as exc:
                if exc.status != 503 or time.monotonic() > deadline:
                    raise
                time.sleep(max(poll_s, min(_retry_after(exc), 10.0)))
                continue
            if on_update:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll_s)

    def artifact(self, job_id: str, name: str) -> bytes:
        """The bytes of artifact `name` of a job (a redirect to S3 followed without the API key)."""
        with self._artifact_stream(job_id, name) as r:
            return r.read()

    def download(self, job_id: str, name: str, dest: Path) -> int:
        """Stream artifact `name` of a job into file `dest` (written whole or not at all); returns its size.
        A redirect to S3 is followed without this client's API key."""
        with self._artifact_stream(job_id, name) as r:
            return _save(r, dest.with_name(dest.name + ".part"), dest)

    @contextmanager
    def _artifact_stream(self, job_id: str, name: str) -> Iterator[httpx.Response]:
        """The open response carrying an artifact's bytes: the gateway's own, or S3's when the gateway
        redirects there (a presigned URL, so this client's Authorization header is not sent)."""
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}", follow_redirects=False) as r:
            if r.status_code != 307:
                yield self._checked_stream(r)
                return
            with httpx.stream("GET", r.headers["location"], timeout=self.http.timeout) as s3:
                yield self._checked_stream(s3)

    def _checked_stream(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            r.read()
            raise ApiError(r)
        return r

    def create_key(self, name: str, scopes: list[str], **limits: int | None) -> dict[str, Any]:
        body = {"name": name, "scopes": scopes, **{k: v for k, v in limits.items() if v is not None}}
        return self._check(self.http.post("/v1/admin/keys", json=body)).json()

    def list_keys(self) -> list[dict[str, Any]]:
        return self._check(self.http.get("/v1/admin/keys")).json()["items"]

    def revoke_key(self, key_id: str) -> None:
        self._check(self.http.delete(f"/v1/admin/keys/{key_id}"))

    def assign(self, model_id: str, files: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
        parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
        return self._check(self.http.post(f"/v1/models/{model_id}/assign", files=parts)).json()

    def close(self) -> None:
        self.http.close()


class _Counting:
    """A binary file that reports the bytes read from it (an upload's progress)."""

    def __init__(self, raw: Any, on_bytes: Callable[[int], None]):
        self.raw, self.on_bytes = raw, on_bytes

    def read(self, size: int = -1) -> bytes:
        chunk = self.raw.read(size)
        self.on_bytes(len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def fileno(self) -> int:
        return self.raw.fileno()


def _save(r: httpx.Response, tmp: Path, dest: Path) -> int:
    size = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in r.iter_bytes(1 << 20):
                f.write(chunk)
                size += len(chunk)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return size
