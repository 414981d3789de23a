"""Assign new images to the clusters of a trained model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import RuntimeConfig
from ..data import ImageSource, LoadLimits, PixelBudgetError, image_cost, load_square, ordered_map
from ..errors import DatasetError
from ..model_io import TrainedModel
from ..runtime import Runtime


def assign_images(
    model: TrainedModel,
    images: Sequence[tuple[str, ImageSource]],
    runtime_cfg: RuntimeConfig | None = None,
    batch_size: int = 256,
    limits: LoadLimits | None = None,
) -> list[dict[str, Any]]:
    """Cluster id and confidence for each (name, image) pair; an image is encoded bytes, a path or a binary file.

    `decode_for_model`, then the model, then `describe_assignments`: see those for the limits.
    """
    if not images:
        return []
    pixels = decode_for_model(model, images, limits)
    probs, _ = model.predict(torch.from_numpy(pixels), Runtime(runtime_cfg or RuntimeConfig()), batch_size)
    return describe_assignments(model, [name for name, _ in images], probs)


def decode_for_model(
    model: TrainedModel, images: Sequence[tuple[str, ImageSource]], limits: LoadLimits | None = None
) -> np.ndarray:
    """The images as one uint8 batch (N, C, S, S) in the model's channels and input size.

    Every header is read first: an image over `limits.max_image_pixels`, or all of them together over
    `limits.max_total_pixels` (PixelBudgetError), is refused before anything is decoded. Then images
    are decoded one at a time per decode slot (JPEGs at reduced scale) and shrunk at once to the
    model's input size, so memory follows the number of images times that size. Every image is
    decoded before any is classified, so one bad file fails the call with its name.
    """
    limits = limits or LoadLimits()
    mode = "L" if model.info.in_channels == 1 else "RGB"
    size = model.info.image_size
    costs = ordered_map(lambda i: image_cost(images[i][1], images[i][0], size, limits.max_image_pixels), len(images))
    total = sum(costs)
    if limits.max_total_pixels is not None and total > limits.max_total_pixels:
        raise PixelBudgetError(
            f"the {len(images)} images declare {total} pixels to decode, more than the limit of "
            f"{limits.max_total_pixels} for one request; send them in smaller requests"
        )
    batch = np.empty((len(images), 1 if mode == "L" else 3, size, size), dtype=np.uint8)

    def decode(i: int) -> np.ndarray:
        name, source = images[i]
        return load_square(source, name, size, mode, limits.max_image_pixels)

    for i, pixels in enumerate(ordered_map(decode, len(images))):
        batch[i] = pixels
    return batch


def describe_assignments(model: TrainedModel, names: Sequence[str], probs: np.ndarray) -> list[dict[str, Any]]:
    """One {image, cluster, confidence[, class_name]} per row of cluster probabilities."""
    results = []
    for name, p in zip(names, probs, strict=True):
        cluster = int(p.argmax())
        item: dict[str, Any] = {"image": name, "cluster": cluster, "confidence": round(float(p[cluster]), 6)}
        cls = model.class_of(cluster)
        if cls is not None:
            item["class_name"] = cls
        results.append(item)
    return results


def read_image_files(paths: Sequence[Path | str]) -> list[tuple[str, Path]]:
    """(path, Path) pairs for `assign_images`, with a clear error for paths that cannot be read.

    Only the paths are kept: each file is read when its turn to be decoded comes.
    """
    out = []
    for p in paths:
        path = Path(p)
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise DatasetError(f"cannot read image '{p}' ({exc.strerror or exc})") from None
        out.append((str(p), path))
    return out
