"""Artifact storage behind one small interface: a local directory or any S3 server (minio SDK).

Dataset keys are deterministic (`datasets/{id}/...`). A job's outputs go under a prefix of the attempt
that made them (`jobs/{id}/a{attempt}/{stage}/...`), so a worker that lost its job cannot overwrite
what the attempt that took over wrote; the job's artifact rows in the job store say which objects
count (see `nnm.service.worker.execution`).
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO, Protocol

from ..settings import Settings


class StorageError(Exception):
    """The artifact store could not be reached or refused an operation."""


class ArtifactStore(Protocol):
    def put_file(self, key: str, path: Path) -> int: ...
    def put_bytes(self, key: str, data: bytes) -> int: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def open_stream(self, key: str) -> Iterator[bytes]: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int | None: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def delete(self, key: str) -> None: ...
    def presign(self, key: str, expires_s: int) -> str | None: ...
    def ping(self) -> None: ...


class LocalStore:
    """Artifacts as files under one directory (embedded mode)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise StorageError(f"key '{key}' escapes the store")
        return path

    def put_file(self, key: str, path: Path) -> int:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
        return dest.stat().st_size

    def put_bytes(self, key: str, data: bytes) -> int:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
        return len(data)

    def get_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise StorageError(f"object '{key}' does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        # Renamed into place (as minio's fget_object does): a concurrent reader never sees half a file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, path)

    def get_bytes(self, key: str) -> bytes:
        src = self._path(key)
        if not src.is_file():
            raise StorageError(f"object '{key}' does not exist")
        return src.read_bytes()

    def open_stream(self, key: str) -> Iterator[bytes]:
        src = self._path(key)
        if not src.is_file():
            raise StorageError(f"object '{key}' does not exist")

        def chunks() -> Iterator[bytes]:
            with open(src, "rb") as f:
                yield from iter(lambda: f.read(1 << 20), b"")

        return chunks()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int | None:
        p = self._path(key)
        return p.stat().st_size if p.is_file() else None

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.exists():
            return []
        return sorted(
            p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file() and not p.name.endswith(".tmp")
        )

    def delete_prefix(self, prefix: str) -> None:
        base = self._path(prefix.rstrip("/"))
        if base.is_dir():
            shutil.rmtree(base)
        elif base.is_file():
            base.unlink()

    def delete(self, key: str) -> None:
        """Delete one object (no error when it is already gone)."""
        self._path(key).unlink(missing_ok=True)

    def presign(self, key: str, expires_s: int) -> str | None:
        return None  # files are streamed by the API

    def ping(self) -> None:
        if not self.root.is_dir():
            raise StorageError(f"artifact directory {self.root} is missing")


class S3Store:
    """Any S3 server (MinIO, SeaweedFS, AWS...) through the minio SDK, with retries and backoff."""

    def __init__(self, settings: Settings, attempts: int = 5, backoff_s: float = 0.5):
        from minio import Minio

        secret = settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None
        self.bucket = settings.s3_bucket
        self.attempts, self.backoff_s = attempts, backoff_s
        self.client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=secret,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )
        public = settings.s3_public_endpoint or settings.s3_endpoint
        secure = settings.s3_public_secure if settings.s3_public_secure is not None else settings.s3_secure
        # Presigning is local when the region is given; signing for the public host makes URLs work
        # from the user's machine, not only inside the compose network.
        self.public = Minio(
            public, access_key=settings.s3_access_key, secret_key=secret, secure=secure, region=settings.s3_region
        )

    def _retry(self, what: str, fn):
        from minio.error import S3Error

        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except S3Error as exc:
                if exc.code in {
                    "NoSuchKey",
                    "NoSuchBucket",
                    "AccessDenied",
                    "SignatureDoesNotMatch",
                    "InvalidAccessKeyId",
                }:
                    raise StorageError(f"S3 {what} failed: {exc.code}") from None
                err: Exception = exc
            except Exception as exc:  # connection errors of urllib3
                err = exc
            if attempt == self.attempts:
                raise StorageError(f"S3 {what} failed after {attempt} attempts: {err.__class__.__name__}") from None
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def ensure_bucket(self) -> None:
        def make() -> None:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)

        self._retry("bucket creation", make)

    def put_file(self, key: str, path: Path) -> int:
        self._retry(f"upload of {key}", lambda: self.client.fput_object(self.bucket, key, str(path)))
        return path.stat().st_size

    def put_bytes(self, key: str, data: bytes) -> int:
        self._retry(f"upload of {key}", lambda: self.client.put_object(self.bucket, key, io.BytesIO(data), len(data)))
        return len(data)

    def get_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._retry(f"download of {key}", lambda: self.client.fget_object(self.bucket, key, str(path)))

    def get_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            resp = self.client.get_object(self.bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._retry(f"download of {key}", read)

    def open_stream(self, key: str) -> Iterator[bytes]:
        resp = self._retry(f"download of {key}", lambda: self.client.get_object(self.bucket, key))

        def chunks() -> Iterator[bytes]:
            try:
                yield from resp.stream(1 << 20)
            finally:
                resp.close()
                resp.release_conn()

        return chunks()

    def _stat(self, key: str):
        from minio.error import S3Error

        try:
            return self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchObject", "NotFound"}:
                return None
            raise StorageError(f"S3 stat of {key} failed: {exc.code}") from None
        except Exception as exc:
            raise StorageError(f"S3 stat of {key} failed: {exc.__class__.__name__}") from None

    def exists(self, key: str) -> bool:
        return self._stat(key) is not None

    def size(self, key: str) -> int | None:
        st = self._stat(key)
        return None if st is None else int(st.size)

    def list(self, prefix: str) -> list[str]:
        return self._retry(
            f"listing of {prefix}",
            lambda: sorted(o.object_name for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)),
        )

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self._retry(f"deletion of {key}", lambda k=key: self.client.remove_object(self.bucket, k))

    def delete(self, key: str) -> None:
        """Delete one object (S3 answers success when it is already gone)."""
        self._retry(f"deletion of {key}", lambda: self.client.remove_object(self.bucket, key))

    def presign(self, key: str, expires_s: int) -> str | None:
        return self.public.presigned_get_object(self.bucket, key, expires=timedelta(seconds=expires_s))

    def ping(self) -> None:
        try:
            self.client.bucket_exists(self.bucket)
        except Exception as exc:
            raise StorageError(f"S3 is not reachable: {exc.__class__.__name__}") from None


def make_store(settings: Settings) -> ArtifactStore:
    """S3 when an endpoint is configured, else a local directory under data_dir."""
    if settings.s3_endpoint:
        return S3Store(settings)
    return LocalStore(settings.data_dir / "artifacts")


def upload_dir(
    store: ArtifactStore,
    directory: Path,
    prefix: str,
    skip: tuple[str, ...] = (),
    last: tuple[str, ...] = ("done.json",),
) -> list[tuple[str, int]]:
    """Upload every file under `directory` to `prefix/<relative path>`; returns (relative name, size).

    Files named in `last` (a stage's completion marker) go up after all the others: an upload that
    fails part-way never leaves a marker next to missing files.
    """
    files = [
        p for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.endswith(".tmp") and p.name not in skip
    ]
    files.sort(key=lambda p: p.name in last)  # stable: sorted order, markers at the end
    out = []
    for path in files:
        rel = path.relative_to(directory).as_posix()
        out.append((rel, store.put_file(f"{prefix}/{rel}", path)))
    return out


def download_prefix(store: ArtifactStore, prefix: str, directory: Path) -> int:
    """Download every object under `prefix/` into `directory`; returns how many."""
    keys = store.list(prefix.rstrip("/") + "/")
    for key in keys:
        store.get_file(key, directory / key[len(prefix.rstrip("/")) + 1 :])
    return len(keys)


def download_items(store: ArtifactStore, items: list[tuple[str, str, int]], directory: Path) -> None:
    """Download (name, key, size) items to `directory/name`, checking each file's size.

    A size other than the recorded one raises StorageError: the caller retries the attempt rather
    than resuming from a file that is not the one that was recorded.
    """
    root = directory.resolve()
    for name, key, size in items:
        dest = (directory / name).resolve()
        if root not in dest.parents:
            raise StorageError(f"artifact name '{name}' escapes the work directory")
        store.get_file(key, dest)
        if dest.stat().st_size != size:
            raise StorageError(f"object '{key}' has {dest.stat().st_size} bytes, {size} were recorded")


def copy_stream(src: BinaryIO, dest: Path, limit: int) -> int:
    """Copy a stream to a file, refusing more than `limit` bytes."""
    total = 0
    with open(dest, "wb") as f:
        while chunk := src.read(1 << 20):
            total += len(chunk)
            if total > limit:
                raise ValueError(f"more than {limit} bytes")
            f.write(chunk)
    return total
