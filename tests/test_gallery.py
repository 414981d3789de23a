"""The cluster gallery the evaluation writes, and the reader the gateway pages it with."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from nnm.engine.gallery import cluster_overview, write_gallery
from nnm.service.gateway.gallery_cache import Gallery, png_data_uri


def _probs(pred: list[int], conf: list[float], k: int) -> np.ndarray:
    p = np.zeros((len(pred), k), dtype=np.float32)
    for i, (c, v) in enumerate(zip(pred, conf, strict=True)):
        p[i] = (1 - v) / (k - 1)
        p[i, c] = v
    return p


def test_overview_counts_majority_and_purity():
    pred = np.array([0, 0, 0, 1, 1, 2])
    conf = np.array([0.9, 0.5, 0.7, 0.6, 0.8, 0.4])
    labels = np.array([1, 1, 0, 2, 2, 0])
    rows = cluster_overview(pred, conf, 4, labels, ["a", "b", "c"])
    assert [r["size"] for r in rows] == [3, 2, 1, 0]
    assert rows[0]["majority_class"] == "b" and rows[0]["purity"] == pytest.approx(2 / 3, abs=1e-4)
    assert rows[1]["majority_class"] == "c" and rows[1]["purity"] == 1.0
    assert rows[0]["mean_confidence"] == pytest.approx(0.7, abs=1e-4)
    assert "majority_class" not in rows[3] and rows[3]["mean_confidence"] == 0.0
    assert "purity" not in cluster_overview(pred, conf, 4, None, None)[0]


def test_gallery_round_trip_pages_by_confidence(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 64, 64), generator=g, dtype=torch.uint8)
    pred, conf = [1, 0, 1, 1, 0, 1, 1], [0.5, 0.9, 0.95, 0.6, 0.8, 0.95, 0.7]
    # As mining writes them: the image itself first (row 4: not first, as with a duplicate image).
    neighbors = np.array([[(i + j) % 7 for j in range(7)] for i in range(7)])
    neighbors[4, :2] = [3, 4]
    names = [f"img{i}.png" for i in range(7)]
    summary = write_gallery(tmp_path, images, names, _probs(pred, conf, 3), [[4], [2, 5], []],
                            np.array([0, 1, 0, 0, 1, 0, 1]), ["x", "y"], neighbors, thumbnail=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clusters.json", "index.npz", "thumbnails.npy"]
    assert json.loads((tmp_path / "clusters.json").read_text()) == summary
    assert summary["thumbnail"] == 32 and summary["neighbors"] == 6 and summary["class_names"] == ["x", "y"]
    assert [c["size"] for c in summary["clusters"]] == [2, 5, 0]
    assert summary["clusters"][1]["prototypes"] == [2, 5]

    gal = Gallery.load(tmp_path)
    assert gal.thumbnails.shape == (7, 32, 32, 3) and isinstance(gal.thumbnails, np.memmap)
    # Cluster 1, most confident first; equal confidence keeps data set order; pages split it exactly.
    first, total = gal.members(1, 0, 3)
    rest, _ = gal.members(1, 3, 3)
    assert total == 5 and first.tolist() == [2, 5, 6] and rest.tolist() == [3, 0]
    assert gal.members(2, 0, 10)[0].tolist() == [] and gal.members(0, 0, 10)[0].tolist() == [1, 4]
    assert gal.neighbors[3].tolist() == neighbors[3, 1:].tolist()
    assert gal.neighbors[4].tolist() == [3, *neighbors[4, 2:].tolist()]
    assert gal.label_name(1) == "y" and str(gal.name[6]) == "img6.png"
    # The thumbnail is the downscaled image, channels last.
    expected = torch.nn.functional.interpolate(images[2:3].float(), size=(32, 32), mode="bilinear",
                                               antialias=True, align_corners=False)
    assert np.abs(gal.thumbnails[2].astype(float) - expected[0].permute(1, 2, 0).round().numpy()).max() <= 1


def test_gallery_without_labels_or_neighbours_of_grayscale_images(tmp_path):
    images = torch.arange(4 * 8 * 8, dtype=torch.int64).remainder(256).to(torch.uint8).view(4, 1, 8, 8)
    summary = write_gallery(tmp_path, images, list("abcd"), _probs([0, 1, 0, 1], [0.6] * 4, 2), [[0], [1]])
    assert summary["class_names"] is None and summary["neighbors"] == 0 and summary["thumbnail"] == 8
    gal = Gallery.load(tmp_path)
    assert gal.neighbors is None and gal.label_name(0) is None
    uri = png_data_uri(np.asarray(gal.thumbnails[3]))
    assert uri.startswith("data:image/png;base64,")
    import base64
    import io

    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), images[3, 0].numpy())


def test_gallery_refuses_mismatched_inputs(tmp_path):
    images = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="3 images but 2 predictions"):
        write_gallery(tmp_path, images, list("abc"), _probs([0, 1], [0.6, 0.6], 2), [[], []])
    with pytest.raises(ValueError, match="neighbours for 2"):
        write_gallery(tmp_path, images, list("abc"), _probs([0, 1, 1], [0.6] * 3, 2), [[], []],
                      neighbors=np.zeros((2, 3), dtype=int))
    assert not (tmp_path / "clusters.json").exists()


def test_writing_thumbnails_does_not_hold_them_in_memory(tmp_path):
    # In a fresh process with its own peak: the thumbnails of 150 MB of images are written to disk without
    # the process's resident memory growing by them (through a writable map, their pages would count).
    import subprocess
    import sys

    code = (
        "import json, sys, numpy as np, torch\n"
        "from pathlib import Path\n"
        "from nnm.engine.gallery import _write_thumbnails\n"
        "from nnm.engine.memory import peak_rss_bytes\n"
        "images = torch.randint(0, 256, (200_000, 3, 16, 16), dtype=torch.uint8)\n"
        "before = peak_rss_bytes()\n"
        "_write_thumbnails(Path(sys.argv[1]), images, 16)\n"
        "back = np.load(sys.argv[1], mmap_mode='r')\n"
        "same = bool((back[123_456] == images[123_456].permute(1, 2, 0).numpy()).all())\n"
        "print(json.dumps([before, peak_rss_bytes(), list(back.shape), same]))\n"
    )
    path = tmp_path / "thumbnails.npy"
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    before, after, shape, same = json.loads(out.stdout)
    assert shape == [200_000, 16, 16, 3] and same and path.stat().st_size > 153_600_000
    assert after - before < 40 * 2**20, (before, after)
    assert [p.name for p in tmp_path.iterdir()] == ["thumbnails.npy"]  # no temporary file left
