"""Cluster galleries for browsing: fetched from the artifact store once per job, memory-mapped, paged.

A gallery (see `nnm.engine.gallery`) is three artifacts under `gallery/`. The first request for a job
downloads them into the local cache directory; later pages read only their own rows of the
memory-mapped thumbnails, and encoded thumbnails are kept in a bounded LRU.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nnm.engine.gallery import GALLERY_FILES

from ..context import ServiceContext
from ..store.storage import download_items


@dataclass
class Gallery:
    """One job's gallery, loaded: the summary, per-image arrays, and members ordered per cluster."""

    summary: dict[str, Any]
    cluster: np.ndarray
    confidence: np.ndarray
    label: np.ndarray
    name: np.ndarray
    neighbors: np.ndarray | None
    thumbnails: np.ndarray  # memory-mapped (N, S, S, C) uint8
    #: Image indices sorted by cluster, then confidence (highest first); cluster c's members are
    #: `order[starts[c]:starts[c + 1]]`.
    order: np.ndarray
    starts: np.ndarray

    @classmethod
    def load(cls, directory: Path) -> Gallery:
        summary = json.loads((directory / "clusters.json").read_text())
        with np.load(directory / "index.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        cluster, conf = arrays["cluster"], arrays["confidence"]
        order = np.lexsort((np.arange(len(cluster)), -conf, cluster))
        counts = np.bincount(cluster, minlength=summary["num_clusters"])
        starts = np.concatenate([[0], np.cumsum(counts)])
        return cls(summary, cluster, conf, arrays["label"], arrays["name"], arrays.get("neighbors"),
                   np.load(directory / "thumbnails.npy", mmap_mode="r"), order, starts)

    def __len__(self) -> int:
        return len(self.cluster)

    def members(self, c: int, offset: int, limit: int) -> tuple[np.ndarray, int]:
        """Indices of cluster `c`'s members from `offset` (most confident first) and the cluster's size."""
        lo, hi = int(self.starts[c]), int(self.starts[c + 1])
        return self.order[lo + offset : min(hi, lo + offset + limit)], hi - lo

    def label_name(self, i: int) -> str | None:
        label = int(self.label[i])
        if label < 0:
            return None
        names = self.summary.get("class_names")
        return names[label] if names and label < len(names) else str(label)


def png_data_uri(pixels: np.ndarray) -> str:
    """A (S, S, C) uint8 image as a PNG data URI."""
    img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class GalleryCache:
    """Galleries of recently browsed jobs (LRU) and their encoded thumbnails (bounded LRU)."""

    def __init__(self, ctx: ServiceContext, capacity: int = 4, thumbnails: int = 20000):
        self.ctx, self.capacity, self.thumbnail_capacity = ctx, capacity, thumbnails
        self._galleries: OrderedDict[str, Gallery] = OrderedDict()
        self._thumbs: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, job_id: str) -> Gallery | None:
        """The job's gallery (downloaded on first use; blocks: call from a worker thread), None if it has none.

        Its record is checked on every call (one indexed query): artifacts removed by the retention
        sweeper, or by another gateway replica's delete, are not served from this replica's cache.
        """
        if self.ctx.jobs.artifact(job_id, "gallery/clusters.json") is None:
            self.evict(job_id)
            return None
        with self._lock:
            if job_id in self._galleries:
                self._galleries.move_to_end(job_id)
                return self._galleries[job_id]
            loading = self._loading.setdefault(job_id, threading.Lock())
        with loading:  # one download per job even under concurrent requests
            with self._lock:
                if job_id in self._galleries:
                    return self._galleries[job_id]
            directory = self.ctx.settings.cache_dir / "galleries" / job_id
            if not (directory / "clusters.json").exists():
                arts = [self.ctx.jobs.artifact(job_id, f"gallery/{name}") for name in GALLERY_FILES]
                if any(a is None for a in arts):
                    return None
                tmp = directory.with_name(f".{job_id}.partial")
                shutil.rmtree(tmp, ignore_errors=True)
                items = [(n, a.key, a.size) for n, a in zip(GALLERY_FILES, arts, strict=True)]
                download_items(self.ctx.store, items, tmp)
                shutil.rmtree(directory, ignore_errors=True)
                tmp.rename(directory)
            gallery = Gallery.load(directory)
            with self._lock:
                self._galleries[job_id] = gallery
                while len(self._galleries) > self.capacity:
                    self._galleries.popitem(last=False)
            return gallery

    def thumbnail(self, job_id: str, gallery: Gallery, i: int) -> str:
        key = (job_id, i)
        with self._lock:
            uri = self._thumbs.get(key)
            if uri is not None:
                self._thumbs.move_to_end(key)
                return uri
        uri = png_data_uri(np.asarray(gallery.thumbnails[i]))
        with self._lock:
            self._thumbs[key] = uri
            while len(self._thumbs) > self.thumbnail_capacity:
                self._thumbs.popitem(last=False)
        return uri

    def evict(self, job_id: str) -> None:
        """Forget a deleted job's gallery: from memory and from the local cache directory."""
        with self._lock:
            self._galleries.pop(job_id, None)
            self._thumbs = OrderedDict((k, v) for k, v in self._thumbs.items() if k[0] != job_id)
        shutil.rmtree(self.ctx.settings.cache_dir / "galleries" / job_id, ignore_errors=True)
