"""Assign new images to the clusters of a trained model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import RuntimeConfig
from ..data import LoadLimits, decode_image
from ..model_io import TrainedModel
from ..runtime import Runtime


def assign_images(
    model: TrainedModel,
    images: Sequence[tuple[str, bytes]],
    runtime_cfg: RuntimeConfig | None = None,
    batch_size: int = 256,
    limits: LoadLimits | None = None,
) -> list[dict[str, Any]]:
    """Cluster id and confidence for each (name, encoded bytes) image.

    Every image is decoded before any is classified, so one bad file fails the call with its name.
    """
    limits = limits or LoadLimits()
    rt = Runtime(runtime_cfg or RuntimeConfig())
    decoded = [decode_image(data, name, limits.max_image_pixels) for name, data in images]
    if not decoded:
        return []
    probs, _ = model.predict(model.preprocess(decoded), rt, batch_size)
    results = []
    for (name, _), p in zip(images, probs, strict=True):
        cluster = int(p.argmax())
        item: dict[str, Any] = {"image": name, "cluster": cluster, "confidence": round(float(p[cluster]), 6)}
        cls = model.class_of(cluster)
        if cls is not None:
            item["class_name"] = cls
        results.append(item)
    return results


def read_image_files(paths: Sequence[Path | str]) -> list[tuple[str, bytes]]:
    """(path, bytes) pairs for `assign_images`, with a clear error for unreadable paths."""
    from ..errors import DatasetError

    out = []
    for p in paths:
        path = Path(p)
        try:
            out.append((str(p), path.read_bytes()))
        except OSError as exc:
            raise DatasetError(f"cannot read image '{p}' ({exc.strerror or exc})") from None
    return out
