"""The cluster gallery: what a person needs to browse a clustering, written once by the evaluation.

A gallery is a folder of three files, small enough to serve pages from without touching the data set:

- `clusters.json`: per cluster its size, mean confidence, prototype images and, where labels exist,
  majority class and purity; the class names; the thumbnail side.
- `index.npz`: per image its cluster, confidence, label (-1 without labels), name, and the indices of
  its first mined neighbours (absent when none were mined).
- `thumbnails.npy`: the images as uint8 (N, S, S, C), S at most `thumbnail` pixels, stored raw so a
  reader can memory-map it and read one page of images without loading the rest.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import atomic_write_bytes, atomic_write_json
from .metrics import sizes_and_confidence

#: The gallery's files, in the order they are written (the summary last: its presence means complete).
GALLERY_FILES = ("thumbnails.npy", "index.npz", "clusters.json")


def cluster_overview(
    pred: np.ndarray, conf: np.ndarray, clusters: int, labels: np.ndarray | None, class_names: list[str] | None
) -> list[dict[str, Any]]:
    """Size, mean confidence and (with labels) majority class and purity of every cluster."""
    sizes, mean_conf = sizes_and_confidence(pred, conf, clusters)
    rows = []
    for c in range(clusters):
        members = np.nonzero(pred == c)[0]
        row: dict[str, Any] = {"cluster": c, "size": int(sizes[c]), "mean_confidence": round(mean_conf[c], 4)}
        if labels is not None and members.size:
            counts = np.bincount(labels[members], minlength=len(class_names or []) or int(labels.max()) + 1)
            top = int(counts.argmax())
            row["majority_class"] = class_names[top] if class_names else str(top)
            row["purity"] = round(float(counts[top] / members.size), 4)
        rows.append(row)
    return rows


def _write_thumbnails(path: Path, images: torch.Tensor, side: int, chunk: int = 4096) -> None:
    """Channels-last uint8 thumbnails, written in chunks into a temporary file that replaces `path`.

    Written with plain file writes, not through a writable memory map: a mapping's dirty pages count
    in the process's resident memory until it ends (3 GB for a million 32 px images).
    """
    from .data import resize_batch

    n, c = images.shape[:2]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            header = {"descr": "|u1", "fortran_order": False, "shape": (n, side, side, c)}
            np.lib.format.write_array_header_1_0(f, header)
            for start in range(0, n, chunk):
                part = images[start : start + chunk]
                if tuple(part.shape[-2:]) != (side, side):
                    part = resize_batch(part, side)
                f.write(part.permute(0, 2, 3, 1).contiguous().numpy().tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _others(neighbors: np.ndarray, kept: int) -> np.ndarray:
    """The first `kept` neighbours of each row other than the image itself (mining lists it first)."""
    own = neighbors == np.arange(len(neighbors))[:, None]
    order = np.argsort(own, axis=1, kind="stable")  # the others first, in their order
    others = np.take_along_axis(neighbors, order, axis=1)[:, : min(kept, neighbors.shape[1] - 1)]
    return np.ascontiguousarray(others).astype(np.int32)


def write_gallery(
    out_dir: Path | str,
    images: torch.Tensor,
    names: list[str],
    probs: np.ndarray,
    prototypes: list[list[int]],
    labels: np.ndarray | None = None,
    class_names: list[str] | None = None,
    neighbors: np.ndarray | None = None,
    thumbnail: int = 48,
    neighbors_kept: int = 10,
) -> dict[str, Any]:
    """Write a gallery of `images` (uint8 N x C x H x W) clustered as `probs` into `out_dir`.

    `prototypes` lists each cluster's prototype image indices; `neighbors` (N x k, dataset indices) are
    the mined neighbours, of which the first `neighbors_kept` other than the image itself are kept.
    Returns the summary it wrote.
    """
    n = images.shape[0]
    if probs.shape[0] != n or len(names) != n:
        raise ValueError(f"{n} images but {probs.shape[0]} predictions and {len(names)} names")
    if neighbors is not None and neighbors.shape[0] != n:
        raise ValueError(f"{n} images but neighbours for {neighbors.shape[0]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    side = min(max(images.shape[-2:]), thumbnail)
    _write_thumbnails(out / "thumbnails.npy", images, side)
    pred = probs.argmax(axis=1).astype(np.int32)
    conf = probs.max(axis=1).astype(np.float32)
    arrays: dict[str, np.ndarray] = {
        "cluster": pred,
        "confidence": conf,
        "label": (labels if labels is not None else np.full(n, -1)).astype(np.int32),
        "name": np.asarray(names, dtype=str),
    }
    if neighbors is not None:
        arrays["neighbors"] = _others(neighbors, neighbors_kept)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(out / "index.npz", buf.getvalue())
    rows = cluster_overview(pred, conf, probs.shape[1], labels, class_names)
    for row, protos in zip(rows, prototypes, strict=True):
        row["prototypes"] = [int(i) for i in protos]
    summary = {
        "num_images": int(n),
        "num_clusters": int(probs.shape[1]),
        "thumbnail": int(side),
        "channels": int(images.shape[1]),
        "class_names": class_names if labels is not None else None,
        "neighbors": int(arrays["neighbors"].shape[1]) if neighbors is not None else 0,
        "clusters": rows,
    }
    atomic_write_json(out / "clusters.json", summary)
    return summary
