"""Decoded-image cache: each data set decoded once into a memory-mapped uint8 file, read batch by batch.

A cache entry is `KEY.npy` (uint8, N x C x S x S, NumPy's format so any tool can open it) and `KEY.json`
(its labels, names, class names and pixel digest). KEY is a digest of what the images come from (a
folder's files with their sizes and modification times, an archive's central directory, which lists
every member's size and CRC, or a built-in's name), the split and the side, so a changed source gets
a new entry and a stale one is never read. Both files are written under temporary names and renamed,
the .json last: an entry without its .json is unfinished and is never opened.

Reading maps the file and copies the rows a batch asks for. The pages read are dropped from the
process's mapping every `DROP_EVERY` bytes (they stay in the page cache), so a training process's
resident memory does not grow with the size of the data set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DatasetError

#: Bump when the decoded pixels of the same source would differ (resize rules, colour handling).
FORMAT = 1
#: Bytes of the mapping touched before its pages are dropped from this process.
DROP_EVERY = 64 * 1024**2
#: What one read of a scattered row maps in: the kernel maps the pages around a fault with it (Linux's
#: fault_around_bytes, 64 KiB by default), so a batch of random rows maps far more than it copies.
FAULT_AROUND = 64 * 1024
#: Rows per chunk when a cache file is written from, or copied into, memory.
CHUNK_BYTES = 64 * 1024**2


def default_cache_dir() -> Path:
    """$NNM_CACHE_DIR, or ~/.cache/nnm/decoded."""
    return Path(os.environ.get("NNM_CACHE_DIR") or Path.home() / ".cache" / "nnm" / "decoded")


@dataclass(frozen=True)
class CachePolicy:
    """Where decoded data sets are cached, and from what size (smaller ones are decoded into memory)."""

    directory: Path
    #: Decoded bytes from which a data set is cached (0: every data set).
    min_bytes: int = 0
    #: Bytes the directory may hold; the entries used longest ago are removed past it (None: no bound).
    max_bytes: int | None = None

    def wants(self, nbytes: int) -> bool:
        return nbytes >= self.min_bytes


def cache_policy(mode: str, directory: str | Path | None, max_bytes: int | None = None) -> CachePolicy | None:
    """The cache a `DataConfig` asks for: `auto` caches sets from `AUTO_CACHE_BYTES` decoded, `on` every
    set, `off` none; `directory` None means $NNM_CACHE_DIR or ~/.cache/nnm/decoded, `max_bytes` None
    means $NNM_CACHE_MAX_BYTES or no bound (a worker sets both for the jobs it runs)."""
    if mode == "off":
        return None
    where = Path(directory).expanduser() if directory else default_cache_dir()
    if max_bytes is None and os.environ.get("NNM_CACHE_MAX_BYTES", "").isdigit():
        max_bytes = int(os.environ["NNM_CACHE_MAX_BYTES"])
    return CachePolicy(where, 0 if mode == "on" else AUTO_CACHE_BYTES, max_bytes)


#: `cache: auto` caches a set from this many decoded bytes (CIFAR-10's 150 MB stays in memory; STL-10
#: with its unlabelled images, 2.9 GB at 96 px, or a million 32 px images, 3 GB, go to the cache).
AUTO_CACHE_BYTES = 512 * 1024**2


class MappedImages:
    """A read-only uint8 (N, C, H, W) image array in a cache file, indexed like a tensor.

    `images[i]`, `images[a:b]` and `images[index_tensor]` return new tensors (copies); the file is
    never written through this object.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
            except ValueError as exc:
                raise DatasetError(f"decoded-image cache '{self.path.name}' is not a .npy file ({exc})") from None
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
            if dtype != np.uint8 or fortran or len(shape) != 4 or size != offset + int(np.prod(shape)):
                raise DatasetError(f"decoded-image cache '{self.path.name}' is damaged (shape {shape}, {size} bytes)")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > offset else None
        self._array = (np.frombuffer(self._map, np.uint8, int(np.prod(shape)), offset).reshape(shape)
                       if self._map is not None else np.zeros(shape, np.uint8))
        self._since_drop = 0

    # -- the parts of the tensor interface the stages use
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._array.shape)

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def nbytes(self) -> int:
        return int(self._array.nbytes)

    def __len__(self) -> int:
        return int(self._array.shape[0])

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        rows = np.array(self._array[key])  # a copy: nothing returned points into the mapping
        scattered = not isinstance(key, slice | int | np.integer)
        count = rows.shape[0] if rows.ndim == 4 else 1
        self._touched(count * max(FAULT_AROUND, rows.nbytes // max(1, count)) if scattered else rows.nbytes)
        return torch.from_numpy(rows)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        """The whole set as one tensor on `device` (copied in chunks; for sets that fit there)."""
        out = torch.empty(tuple(self.shape), dtype=torch.uint8, device=device)
        for sl in self.chunks():
            out[sl] = self[sl].to(device, non_blocking=non_blocking)
        return out

    def numpy(self) -> np.ndarray:
        """The read-only array over the mapping (no copy)."""
        return self._array

    def chunks(self, nbytes: int = CHUNK_BYTES) -> Iterator[slice]:
        """Slices of consecutive rows of about `nbytes` each."""
        row = max(1, int(np.prod(self._array.shape[1:])))
        step = max(1, nbytes // row)
        for start in range(0, len(self), step):
            yield slice(start, min(len(self), start + step))

    def drop_pages(self) -> None:
        """Unmap the pages read so far from this process (the kernel keeps them in its page cache)."""
        self._since_drop = 0
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def _touched(self, nbytes: int) -> None:
        self._since_drop += nbytes
        if self._since_drop >= DROP_EVERY:
            self.drop_pages()

    def __reduce__(self) -> tuple[Any, ...]:
        return (MappedImages, (self.path,))

    def __repr__(self) -> str:
        return f"MappedImages({str(self.path)!r}, shape={tuple(self.shape)})"


def pixel_digest(images: torch.Tensor | MappedImages) -> str:
    """The digest `ImageSet.fingerprint` uses: blake2b-128 of the pixels in row order."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(images, MappedImages):
        for sl in images.chunks():
            h.update(images.numpy()[sl].tobytes())
    else:
        h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(source: dict[str, Any]) -> str:
    """The entry name for a source description (what the pixels are decoded from, split and side)."""
    text = json.dumps({"format": FORMAT, **source}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def folder_source(path: Path, files: list[tuple[str, int, int]]) -> dict[str, Any]:
    """A folder's identity: its path and every image file's (relative path, size, mtime in ns)."""
    h = hashlib.sha256()
    for rel, size, mtime in files:
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return {"kind": "folder", "path": str(path.resolve()), "files": h.hexdigest(), "count": len(files)}


def archive_source(path: Path) -> dict[str, Any]:
    """An archive's identity: a digest of its central directory (every member's name, size and CRC), so
    the same archive anywhere (a worker downloads one per job) is one entry, and a changed one is new."""
    try:
        with open(path, "rb") as f:
            end = zipfile._EndRecData(f)  # the standard library's own end-record reader
            if end is None:
                raise DatasetError(f"'{path.name}' is not a readable .zip archive (no end-of-archive record)")
            size = os.fstat(f.fileno()).st_size
            # The central directory ends where the end record starts (zip64 adds 76 bytes between them):
            # reading a little before it covers it whole either way.
            start = max(0, end[zipfile._ECD_LOCATION] - end[zipfile._ECD_SIZE] - 1024)
            f.seek(start)
            h = hashlib.sha256()
            for block in iter(lambda: f.read(1024**2), b""):
                h.update(block)
    except OSError as exc:
        raise DatasetError(f"cannot read '{path.name}' ({exc.strerror or exc})") from None
    return {"kind": "archive", "bytes": size, "directory": h.hexdigest()}


@dataclass
class CachedSet:
    """What a finished entry holds besides the pixels."""

    images: MappedImages
    labels: np.ndarray | None
    names: list[str]
    class_names: list[str] | None
    meta: dict[str, Any]


def open_entry(directory: Path, key: str, _follow: bool = True) -> CachedSet | None:
    """The finished entry `key`, or None when there is none (or it is unreadable: it is then rebuilt).

    An alias (`publish_alias`) is followed to its entry.
    """
    meta_path, data_path = directory / f"{key}.json", directory / f"{key}.npy"
    try:
        meta = json.loads(meta_path.read_text())
        if "alias" in meta:
            return open_entry(directory, str(meta["alias"]), False) if _follow else None
        images = MappedImages(data_path)
    except (OSError, ValueError, TypeError, DatasetError):
        return None
    if list(images.shape) != meta.get("shape"):
        return None
    with contextlib.suppress(OSError):
        os.utime(meta_path)  # marks the entry as used: `prune` removes the least recently used first
    labels = None
    if meta.get("labels") is not None:
        labels = np.asarray(meta["labels"], dtype=np.int64)
    return CachedSet(images, labels, meta["names"], meta.get("class_names"), meta)


def publish_alias(directory: Path, alias: str, key: str) -> None:
    """Make `alias` open entry `key` (the same pixels asked for another way, e.g. at their native side)."""
    if alias == key:
        return
    fd, name = tempfile.mkstemp(prefix=f".{alias}.", suffix=".json.part", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump({"alias": key}, f)
    os.replace(name, directory / f"{alias}.json")


class EntryWriter:
    """Writes one entry: rows appended in order to a temporary file, published by `finish`.

    Rows start with the channel count given; `widen` turns the rows written so far into 3 channels
    (a colour image after grayscale ones) by copying them once. Nothing is visible under the entry's
    name until `finish`; `abort` (or leaving the `with` block by an exception) removes the parts.
    """

    def __init__(self, directory: Path, key: str, n: int, channels: int, side: int):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.key, self.n, self.side = directory, key, n, side
        self.channels, self.written = channels, 0
        self._open(channels)

    def _open(self, channels: int) -> None:
        fd, name = tempfile.mkstemp(prefix=f".{self.key}.", suffix=".npy.part", dir=self.directory)
        self.tmp = Path(name)
        self.file = os.fdopen(fd, "wb")
        shape = (self.n, channels, self.side, self.side)
        np.lib.format.write_array_header_1_0(self.file, {"descr": "|u1", "fortran_order": False, "shape": shape})
        self.hasher = hashlib.blake2b(digest_size=16)

    def append(self, rows: np.ndarray) -> None:
        """Write the next rows (uint8, (C, S, S) or (B, C, S, S) in this entry's channels)."""
        rows = np.ascontiguousarray(rows, dtype=np.uint8)
        count = 1 if rows.ndim == 3 else rows.shape[0]
        if self.written + count > self.n:
            raise ValueError(f"more rows than the {self.n} declared")
        data = rows.tobytes()
        self.file.write(data)
        self.hasher.update(data)
        self.written += count

    def widen(self) -> None:
        """Rewrite the rows so far with 3 channels; later rows are written with 3."""
        if self.channels == 3:
            return
        old, written = self.tmp, self.written
        self.file.close()
        self.written, self.channels = 0, 3
        self._open(3)
        row = self.side * self.side
        with open(old, "rb") as f:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
            step = max(1, CHUNK_BYTES // row)
            for start in range(0, written, step):
                count = min(step, written - start)
                gray = np.frombuffer(f.read(count * row), np.uint8).reshape(count, 1, self.side, self.side)
                self.append(np.repeat(gray, 3, axis=1))
        old.unlink()

    def finish(self, labels: np.ndarray | None, names: list[str], class_names: list[str] | None,
               info: dict[str, Any]) -> CachedSet:
        """Publish the entry (data first, then its .json, which carries `info` too) and open it."""
        if self.written != self.n:
            raise ValueError(f"{self.written} rows written of the {self.n} declared")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        shape = [self.n, self.channels, self.side, self.side]
        meta = {"format": FORMAT, "info": info, "shape": shape, "digest": self.hasher.hexdigest(),
                "labels": None if labels is None else [int(v) for v in labels], "names": names,
                "class_names": class_names}
        os.replace(self.tmp, self.directory / f"{self.key}.npy")
        fd, name = tempfile.mkstemp(prefix=f".{self.key}.", suffix=".json.part", dir=self.directory)
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(name, self.directory / f"{self.key}.json")
        entry = open_entry(self.directory, self.key)
        if entry is None:
            raise DatasetError(f"the decoded-image cache entry '{self.key}' could not be read back")
        return entry

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()

    def __enter__(self) -> EntryWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()


def write_tensor(directory: Path, key: str, images: torch.Tensor, labels: np.ndarray | None, names: list[str],
                 class_names: list[str] | None, info: dict[str, Any]) -> CachedSet:
    """An entry from images already in memory (built-in data sets), written in chunks."""
    n, c, s, _ = images.shape
    with EntryWriter(directory, key, n, c, s) as writer:
        step = max(1, CHUNK_BYTES // max(1, c * s * s))
        for start in range(0, n, step):
            writer.append(images[start : start + step].contiguous().numpy())
        return writer.finish(labels, names, class_names, info)


#: Unfinished parts older than this are left by a killed writer and removed by `prune`.
STALE_PART_SECONDS = 24 * 3600


def prune(policy: CachePolicy, keep: str | None = None) -> list[str]:
    """Remove the least recently used entries until the directory holds at most `policy.max_bytes`
    (never `keep`, the entry just written), and parts of writers that died a day ago; returns the keys removed.

    A process still reading a removed entry keeps reading it: its mapping holds the file until it ends.
    """
    directory = policy.directory
    now = time.time()
    with contextlib.suppress(OSError):
        for part in directory.glob(".*.part"):
            with contextlib.suppress(OSError):
                if now - part.stat().st_mtime > STALE_PART_SECONDS:
                    part.unlink()
    if policy.max_bytes is None:
        return []
    entries = []
    for meta in directory.glob("*.json"):
        data = meta.with_suffix(".npy")
        try:
            if not data.exists():  # an alias: removed with the entry it names
                target = json.loads(meta.read_text()).get("alias")
                if not (directory / f"{target}.npy").exists():
                    meta.unlink()
                continue
            entries.append((meta.stat().st_mtime, meta.stem, meta.stat().st_size + data.stat().st_size))
        except (OSError, ValueError, AttributeError):
            continue
    total = sum(size for _, _, size in entries)
    removed = []
    for _, key, size in sorted(entries):
        if total <= policy.max_bytes:
            break
        if key == keep:
            continue
        for suffix in (".json", ".npy"):  # the .json first: without it the entry is not opened
            with contextlib.suppress(OSError):
                (directory / f"{key}{suffix}").unlink()
        total -= size
        removed.append(key)
    return removed
