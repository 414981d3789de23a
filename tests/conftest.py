"""Shared fixtures: small real image sets (scikit-learn digits) and helpers to write image files."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from nnm.engine.data import ImageSet, load_dataset
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny networks: as fast as several threads, and far faster on a
    busy machine, where several threads spin-wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits() -> ImageSet:
    return load_dataset("digits")


@pytest.fixture()
def small_digits(digits: ImageSet) -> ImageSet:
    """400 digits (40 per class), resized to 16 px like the CPU preset does."""
    from nnm.engine.data import resize_batch

    idx = torch.cat([torch.nonzero(digits.labels == c).squeeze(1)[:40] for c in range(10)])
    return ImageSet(
        resize_batch(digits.images[idx], 16),
        digits.labels[idx].clone(),
        digits.class_names,
        [digits.names[i] for i in idx.tolist()],
        source="digits-small",
    )


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_image_folder(
    root: Path, data: ImageSet, count: int | None = None, labelled: bool = True, step: int = 1
) -> Path:
    """Write every `step`-th image of `data` (at most `count`) as PNG files, in ImageFolder layout or flat."""
    root.mkdir(parents=True, exist_ok=True)
    for i in list(range(0, len(data), step))[: count or len(data)]:
        arr = data.images[i].numpy()
        arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
        folder = root / data.class_names[int(data.labels[i])] if labelled else root
        folder.mkdir(exist_ok=True)
        (folder / f"{i:05d}.png").write_bytes(png_bytes(arr))
    return root


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nnm.cli.main", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
