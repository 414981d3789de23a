import stat
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch
from conftest import png_bytes, write_image_folder, write_zip
from nnm.engine.data import LoadLimits, channel_stats, load_dataset
from nnm.engine.errors import DatasetError


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def test_builtin_digits_are_uint8_with_labels(digits):
    assert digits.images.dtype == torch.uint8 and digits.images.shape == (1797, 1, 8, 8)
    assert digits.has_labels and digits.num_classes == 10
    assert digits.images.max() == 255


def test_labelled_folder(tmp_path, small_digits):
    root = write_image_folder(tmp_path / "set", small_digits, count=30, step=13)
    data = load_dataset(str(root))
    assert len(data) == 30 and data.has_labels
    assert data.class_names == [str(c) for c in range(10)]
    assert data.channels == 1 and data.image_size == 16  # grayscale PNGs stay single-channel
    # Pixels survive the round trip through PNG.
    first = data.names.index(f"{small_digits.class_names[int(small_digits.labels[0])]}/00000.png")
    assert torch.equal(data.images[first], small_digits.images[0])


def test_flat_folder_is_unlabelled(tmp_path, small_digits):
    root = write_image_folder(tmp_path / "flat", small_digits, count=12, labelled=False)
    data = load_dataset(str(root))
    assert len(data) == 12 and data.labels is None and not data.has_labels


def test_zip_with_a_top_folder_and_resizing(tmp_path):
    rng = np.random.default_rng(0)
    members = {
        f"train/{c}/{i}.png": png_bytes(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
        for c in ("cat", "dog")
        for i in range(3)
    }
    members["train/.DS_Store"] = b"junk"
    members["train/readme.txt"] = b"not an image, ignored"
    data = load_dataset(str(write_zip(tmp_path / "pets.zip", members)), image_size=16)
    assert data.class_names == ["cat", "dog"] and len(data) == 6
    assert data.images.shape == (6, 3, 16, 16)


def test_mixed_layout_is_refused(tmp_path):
    members = {"a.png": png_bytes(np.zeros((8, 8), np.uint8)), "cls/b.png": png_bytes(np.zeros((8, 8), np.uint8))}
    with pytest.raises(DatasetError, match="mix a flat layout with class sub-folders"):
        load_dataset(str(write_zip(tmp_path / "mixed.zip", members)))


@pytest.mark.parametrize("name", ["../evil.png", "/abs/evil.png", "a/../../evil.png"])
def test_zip_slip_is_refused(tmp_path, name):
    path = write_zip(tmp_path / "slip.zip", {name: png_bytes(np.zeros((8, 8), np.uint8))})
    with pytest.raises(DatasetError, match="absolute or parent"):
        load_dataset(str(path))


def test_zip_symlink_is_refused(tmp_path):
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as z:
        info = zipfile.ZipInfo("cls/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
    with pytest.raises(DatasetError, match="symbolic link"):
        load_dataset(str(path))


def test_zip_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a/big.png", b"\x00" * 3_000_000)
    assert path.stat().st_size < 100_000
    with pytest.raises(DatasetError, match="limit for uncompressed data"):
        load_dataset(str(path), limits=LoadLimits(max_total_bytes=1_000_000))


def test_decompression_bomb_is_refused(tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "huge.png").write_bytes(bomb_png(9000, 9000))
    with pytest.raises(DatasetError, match="huge.png' declares 9000x9000 pixels, more than the limit"):
        load_dataset(str(tmp_path / "set"))


def test_pillow_decompression_bomb_error_is_reported(tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "giant.png").write_bytes(bomb_png(60000, 60000))  # over Pillow's own hard limit
    with pytest.raises(DatasetError, match="giant.png' declares too many pixels"):
        load_dataset(str(tmp_path / "set"))


def test_corrupt_and_fake_images_are_named(tmp_path):
    good = png_bytes(np.zeros((8, 8), np.uint8))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ok.png").write_bytes(good)
    (tmp_path / "a" / "broken.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset(str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.jpg").write_text("this is text")
    with pytest.raises(DatasetError, match="notes.jpg' is not a readable image"):
        load_dataset(str(tmp_path / "b"))


def test_empty_folder_and_unknown_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        load_dataset(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="neither a built-in dataset"):
        load_dataset("imagenet-mini")
    with pytest.raises(DatasetError, match="no split 'val'"):
        load_dataset("digits:val")


def test_channel_stats():
    x = torch.tensor([[[[0, 255]]], [[[255, 255]]]], dtype=torch.uint8)  # (2, 1, 1, 2)
    mean, std = channel_stats(x)
    assert np.isclose(mean[0], 0.75) and np.isclose(std[0], np.sqrt(0.75 * 0.25))
