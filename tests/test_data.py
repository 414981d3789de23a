import io
import stat
import struct
import time
import zipfile
import zlib

import numpy as np
import pytest
import torch
from conftest import png_bytes, write_image_folder, write_zip
from hostile_inputs import GiB, MiB, blank_png, can_measure_peak_rss, peak_rss_bytes, reset_peak_rss, zeros_zip
from nnm.engine.config import BackboneConfig
from nnm.engine.data import (
    DECODE_WORKERS,
    LoadLimits,
    PixelBudgetError,
    _Budget,
    _Capped,
    channel_stats,
    decode_pixels,
    fit_square,
    inspect_image_folder,
    load_dataset,
    load_square,
    pil_to_uint8,
)
from nnm.engine.errors import DatasetError
from nnm.engine.model_io import ModelInfo, TrainedModel
from nnm.engine.models import ClusteringModel, build_backbone
from nnm.engine.stages.assign import assign_images, read_image_files
from PIL import Image, ImageFile


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


def test_the_check_of_an_upload_names_every_bad_image_at_once(tmp_path):
    """The upload check goes on past a bad image: one answer counts them all and names the first few."""
    good = png_bytes(np.zeros((8, 8), np.uint8))
    root = tmp_path / "set"
    (root / "a").mkdir(parents=True)
    for i in range(4):
        (root / "a" / f"ok{i}.png").write_bytes(good)
    (root / "a" / "broken.png").write_bytes(good[: len(good) // 2])
    (root / "a" / "notes.png").write_text("this is text")
    with pytest.raises(DatasetError) as err:
        inspect_image_folder(root)
    message = str(err.value)
    assert message.startswith("2 of 6 images cannot be used: ")
    assert "'a/broken.png' is" in message and "file 'a/notes.png' is not a readable image" in message
    for i in range(6):  # more bad images than are named: the rest are counted
        (root / "a" / f"junk{i}.png").write_text("junk")
    with pytest.raises(DatasetError, match=r"^8 of 12 images cannot be used: .*; and 3 more$"):
        inspect_image_folder(root)
    (root / "a" / "notes.png").unlink()  # a single bad image: its own sentence, as before
    for i in range(6):
        (root / "a" / f"junk{i}.png").unlink()
    with pytest.raises(DatasetError, match=r"^file 'a/broken.png' is not a readable image$"):
        inspect_image_folder(root)
    # Past the header: pixels that fail to decode are found and counted the same way.
    noise = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    (root / "a" / "late.png").write_bytes(noise[: len(noise) // 2])
    with pytest.raises(DatasetError, match=r"^2 of 6 images cannot be used: .*'a/late.png' is corrupt or truncated"):
        inspect_image_folder(root)


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


# ----------------------------------------------------------------------------- memory under hostile input
# Peak memory must follow the output, not the input: a few kilobytes of zip must not cost gigabytes.

needs_peak_rss = pytest.mark.skipif(not can_measure_peak_rss(), reason="needs /proc/self/clear_refs (Linux)")


def added_peak_rss(fn):
    """(fn(), how far the process's peak RSS rose above its RSS before the call), in bytes."""
    reset_peak_rss()
    before, _ = peak_rss_bytes()
    result = fn()
    _, peak = peak_rss_bytes()
    return result, peak - before


#: One blank 4000x4000 image decoded as RGB; a decode slot holds about 1.5 of them (RGB, then L) at most.
FULL_IMAGE = 4000 * 4000 * 3
#: What the decode slots may add together, plus one image of slack: 24 images at once would be far more.
DECODE_BOUND = (2 * DECODE_WORKERS + 1) * FULL_IMAGE


@needs_peak_rss
def test_blank_large_pngs_are_decoded_a_few_at_a_time(tmp_path):
    """16 blank 4000x4000 RGB PNGs (3 KB zipped, 48 MB each decoded): decoding them all before
    resizing, as the loader once did, costs over 768 MB; one at a time per decode slot, a few images."""
    path = tmp_path / "blank.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(16):
            z.writestr(f"blank/{i:02d}.png", blank_png(4000))
    assert path.stat().st_size < 20_000
    data, added = added_peak_rss(lambda: load_dataset(str(path)))
    assert data.images.shape == (16, 1, 96, 96) and int(data.images.max()) == 0
    assert added < DECODE_BOUND, f"peak rose by {added / MiB:.0f} MiB"
    summary, added = added_peak_rss(lambda: inspect_image_folder(path))
    assert (summary.count, summary.image_size, summary.channels) == (16, 96, 1)
    assert added < DECODE_BOUND, f"peak rose by {added / MiB:.0f} MiB"


@needs_peak_rss
def test_a_long_thin_image_never_becomes_a_huge_intermediate(tmp_path):
    """A 100000x1 PNG is 100,000 pixels; scaling its short side to 96 before cropping would make a
    9,600,000 x 96 image (over 900 MB). The crop is taken in source coordinates instead."""
    (tmp_path / "thin").mkdir()
    Image.fromarray(np.full((1, 100_000), 200, np.uint8)).save(tmp_path / "thin" / "line.png")
    data, added = added_peak_rss(lambda: load_dataset(str(tmp_path / "thin")))
    assert data.images.shape == (1, 1, 96, 96) and int(data.images.min()) == 200
    assert added < 64 * MiB, f"peak rose by {added / MiB:.0f} MiB"


def test_pixel_limit_is_checked_on_every_header_before_anything_is_decoded(tmp_path, monkeypatch):
    folder = tmp_path / "set"
    folder.mkdir()
    for i in range(5):
        (folder / f"a{i}.png").write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
    (folder / "z.png").write_bytes(bomb_png(4097, 4096))  # sorted last
    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or original(self))
    with pytest.raises(DatasetError, match="z.png' declares 4097x4096 pixels, more than the limit of 16777216"):
        load_dataset(str(folder), limits=LoadLimits(max_image_pixels=4096 * 4096))
    assert loads == [], "images were decoded before the oversized one was refused"
    (folder / "z.png").write_bytes(png_bytes(np.zeros((4096, 4096), np.uint8)))  # at the limit: accepted
    assert len(load_dataset(str(folder), limits=LoadLimits(max_image_pixels=4096 * 4096))) == 6


def test_zip_member_over_the_per_file_cap_is_refused_from_its_header(tmp_path):
    """One 4 GiB zero-filled member (4 MB zipped), declared honestly: refused before any inflating."""
    path = zeros_zip(tmp_path / "zeros.zip", 4 * GiB, crc=False)
    started = time.monotonic()
    with pytest.raises(DatasetError, match="'zeros/0.png' expands to 4294967296 bytes, more than the limit of"):
        load_dataset(str(path), limits=LoadLimits(max_member_bytes=128 * MiB))
    with pytest.raises(DatasetError, match="limit for uncompressed data"):
        load_dataset(str(path), limits=LoadLimits(max_member_bytes=8 * GiB, max_total_bytes=2 * GiB))
    assert time.monotonic() - started < 5


@needs_peak_rss
def test_zip_member_that_understates_its_size_is_read_no_further(tmp_path):
    """A member declaring 1 MiB whose data inflates to 256 MiB: reading stops at 1 MiB (so it is no image)."""
    path = zeros_zip(tmp_path / "liar.zip", 256 * MiB, declared=MiB)

    def attempt() -> None:
        with pytest.raises(DatasetError, match="zeros/0.png' is not a readable image"):
            load_dataset(str(path))

    _, added = added_peak_rss(attempt)
    assert added < 32 * MiB, f"peak rose by {added / MiB:.0f} MiB"
    with pytest.raises(DatasetError, match="zeros/0.png"):
        inspect_image_folder(path)


def test_capped_reader_counts_real_bytes_not_declared_ones():
    """What is actually read is capped per file and in total, whatever a header declared."""
    with pytest.raises(DatasetError, match="'f.png' holds more than 10 bytes, the limit for one file"):
        _Capped(io.BytesIO(b"x" * 11), "f.png", cap=10).read()
    assert _Capped(io.BytesIO(b"x" * 10), "f.png", cap=10).read() == b"x" * 10
    budget = _Budget(15)
    _Capped(io.BytesIO(b"x" * 10), "a.png", cap=10, budget=budget).read()
    with pytest.raises(DatasetError, match="more than 15 bytes, the limit for uncompressed data"):
        _Capped(io.BytesIO(b"x" * 10), "b.png", cap=10, budget=budget).read()


def test_entry_count_is_checked_before_the_directory_is_parsed(tmp_path, monkeypatch):
    path = write_zip(tmp_path / "many.zip", {f"{i}.png": b"" for i in range(50)})
    monkeypatch.setattr(zipfile, "ZipFile", lambda *a, **k: pytest.fail("the central directory was parsed"))
    with pytest.raises(DatasetError, match="archive has 50 entries, more than the limit of 10"):
        load_dataset(str(path), limits=LoadLimits(max_files=10))


def test_gray_and_colour_images_give_the_same_pixels_as_before(tmp_path):
    """An L image and an RGB image with equal channels load alike; one colour image (sorted last, so
    the output grows to three channels midway) makes the set RGB, with the gray images in all three."""
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (300, 200), dtype=np.uint8)
    folder = tmp_path / "set"
    folder.mkdir()
    Image.fromarray(gray).save(folder / "a.png")
    Image.fromarray(np.stack([gray] * 3, -1)).save(folder / "b.png")
    data = load_dataset(str(folder))
    assert data.images.shape == (2, 1, 96, 96) and torch.equal(data.images[0], data.images[1])
    expected = np.asarray(fit_square(Image.fromarray(gray), 96))
    assert np.array_equal(data.images[0, 0].numpy(), expected)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "c.png")
    data = load_dataset(str(folder))
    assert data.images.shape == (3, 3, 96, 96)
    for i in (0, 1):
        assert all(np.array_equal(data.images[i, c].numpy(), expected) for c in range(3))
    assert inspect_image_folder(folder).channels == 3


def test_inspection_matches_loading(tmp_path, small_digits):
    root = write_image_folder(tmp_path / "set", small_digits, count=30, step=13)
    summary, data = inspect_image_folder(root), load_dataset(str(root))
    assert (summary.count, summary.image_size, summary.channels) == (len(data), data.image_size, data.channels)
    assert summary.class_names == data.class_names and summary.names == data.names


def test_inspection_keeps_a_preview_of_one_image_per_class_first(tmp_path, small_digits):
    root = write_image_folder(tmp_path / "set", small_digits, count=30, step=13)
    data = load_dataset(str(root))
    summary = inspect_image_folder(root, preview=4)
    names = [name for name, _ in summary.preview]
    assert len(names) == 4 and len({n.split("/")[0] for n in names}) == 4  # four different classes
    for name, pixels in summary.preview:
        assert np.array_equal(pixels, data.images[data.names.index(name)].numpy())  # 8 px: no resize
    small = inspect_image_folder(root, preview=40, preview_side=4)
    assert len(small.preview) == 30 and small.preview[0][1].shape == (1, 4, 4)
    assert inspect_image_folder(root).preview == []


def test_jpeg_is_decoded_at_reduced_scale(tmp_path):
    """A 4000x3000 JPEG shrunk to 32 px decodes at 1/8 scale (draft) and looks like the full decode."""
    rng = np.random.default_rng(2)
    small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((4000, 3000), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=90)
    drafted = load_square(buf.getvalue(), "big.jpg", 32, "RGB", 4096 * 4096)
    full = pil_to_uint8(fit_square(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), 32))
    assert drafted.shape == (3, 32, 32)
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 3
    sizes = []
    original = Image.Image.resize
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image.Image, "resize", lambda self, *a, **k: sizes.append(self.size) or original(self, *a, **k))
        load_square(buf.getvalue(), "big.jpg", 32, "RGB", 4096 * 4096)
    assert sizes[0] == (500, 375)  # 1/8 scale
    assert decode_pixels(4000, 3000, "JPEG", 32) == 500 * 375 and decode_pixels(4000, 3000, "PNG", 32) == 12_000_000


def test_pixel_budget_refuses_before_decoding(tmp_path, monkeypatch):
    """All images of one call together may decode to at most `max_total_pixels`, read from headers."""
    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or original(self))
    images = [(f"{i}.png", blank_png(4000)) for i in range(5)]
    with pytest.raises(PixelBudgetError, match="the 5 images declare 80000000 pixels to decode, more than the limit "
                                               "of 64000000 for one request"):
        assign_images(tiny_model(), images, limits=LoadLimits(max_total_pixels=64_000_000))
    folder = tmp_path / "set"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(png_bytes(np.zeros((64, 64), np.uint8)))
    refusal = "the images declare 12288 pixels to decode, more than the limit of 10000"
    with pytest.raises(PixelBudgetError, match=refusal):
        load_dataset(str(folder), limits=LoadLimits(max_total_pixels=10_000))
    assert loads == []


def tiny_model(in_channels: int = 1, size: int = 16) -> TrainedModel:
    """An untrained 3-cluster model: enough to run assignment end to end."""
    backbone = BackboneConfig(width=4)
    info = ModelInfo(backbone=backbone, in_channels=in_channels, image_size=size, mean=[0.5] * in_channels,
                     std=[0.25] * in_channels, clusters=3, class_names=["a", "b", "c"], cluster_to_class=[0, 1, 2])
    return TrainedModel(ClusteringModel(build_backbone(backbone, in_channels), 3, heads=1).eval(), info)


@needs_peak_rss
def test_assign_decodes_one_image_at_a_time(tmp_path):
    """24 blank 4000x4000 PNGs to `assign_images` (bytes, as the CLI once read them): a few images at most."""
    model = tiny_model()
    images = [(f"{i}.png", blank_png(4000)) for i in range(24)]
    results, added = added_peak_rss(lambda: assign_images(model, images))
    assert [r["image"] for r in results] == [name for name, _ in images]
    assert len({r["cluster"] for r in results}) == 1  # identical images, identical answers
    assert added < DECODE_BOUND, f"peak rose by {added / MiB:.0f} MiB"


def test_assign_takes_bytes_paths_and_open_files_and_names_a_bad_one(tmp_path):
    model = tiny_model(in_channels=3, size=8)
    png = png_bytes(np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    (tmp_path / "a.png").write_bytes(png)
    with open(tmp_path / "a.png", "rb") as f:
        f.read(5)  # an upload file is read from its start, wherever it was left
        results = assign_images(model, [("bytes.png", png), *read_image_files([tmp_path / "a.png"]), ("file.png", f)])
    assert [r["cluster"] for r in results] == [results[0]["cluster"]] * 3
    assert all(r["class_name"] == "abc"[r["cluster"]] for r in results)
    with pytest.raises(DatasetError, match="huge.png' declares 9000x9000 pixels, more than the limit"):
        assign_images(model, [("ok.png", png), ("huge.png", bomb_png(9000, 9000))],
                      limits=LoadLimits(max_image_pixels=4096 * 4096))
    with pytest.raises(DatasetError, match="half.png' is corrupt or truncated"):
        assign_images(model, [("half.png", blank_png(4000)[:20_000])])
    with pytest.raises(DatasetError, match="cannot read image '.*missing.png'"):
        read_image_files([tmp_path / "missing.png"])


def _split_folder(root, data, with_unlabeled=True, missing_test_class=None):
    """digits as train/ (even indices), test/ (odd) and unlabeled/ (flat, every 5th) inside `root/set/`."""
    for i in range(len(data)):
        arr = data.images[i].numpy()[0]
        name = data.class_names[int(data.labels[i])]
        split = "train" if i % 2 == 0 else "test"
        if with_unlabeled and i % 5 == 0:
            (root / "set" / "unlabeled").mkdir(parents=True, exist_ok=True)
            (root / "set" / "unlabeled" / f"u{i:05d}.png").write_bytes(png_bytes(arr))
        if split == "test" and name == missing_test_class:
            continue
        folder = root / "set" / split / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.png").write_bytes(png_bytes(arr))
    return root


def test_folder_with_train_and_test_has_splits(tmp_path, small_digits):
    root = _split_folder(tmp_path / "f", small_digits, missing_test_class="3")
    z = write_zip(tmp_path / "s.zip", {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))
    })
    labels = small_digits.labels.numpy()
    for spec in (str(root), str(z)):
        train = load_dataset(spec)
        test = load_dataset(spec + ":test")
        assert load_dataset(spec, "train").names == train.names
        assert train.source.endswith(":train") and test.source.endswith(":test")
        assert train.extra["splits"] == ["test", "train", "unlabeled"]
        # class names are shared: test/ has no class 3, yet its labels index the same ten names
        assert train.class_names == test.class_names == [str(c) for c in range(10)]
        assert len(train) == 200 and len(test) == 200 - 20
        np.testing.assert_array_equal(train.labels.numpy(), labels[0::2])
        np.testing.assert_array_equal(test.labels.numpy(), labels[1::2][labels[1::2] != 3])
        assert all(n.startswith("set/test/") for n in test.names)
        both = load_dataset(spec, "train+unlabeled")
        assert len(both) == 200 + 80 and not both.has_labels
        assert (both.labels == -1).sum() == 80
        with pytest.raises(DatasetError, match="no split 'val'"):
            load_dataset(spec, "val")
    summary = inspect_image_folder(z)
    assert summary.splits == {"test": 180, "train": 200, "unlabeled": 80}
    assert summary.class_names == [str(c) for c in range(10)]


def test_folder_without_splits_refuses_a_split_and_class_folders_named_train_stay_classes(tmp_path, small_digits):
    flat = write_image_folder(tmp_path / "plain", small_digits)
    with pytest.raises(DatasetError, match="has no splits"):
        load_dataset(str(flat) + ":test")
    # a single folder called train/ is not a split layout: its sub-folders are the classes
    only_train = write_image_folder(tmp_path / "one" / "train", small_digits)
    data = load_dataset(str(only_train.parent))
    assert data.class_names == [str(c) for c in range(10)] and "splits" not in data.extra


def test_the_held_out_split_is_test_when_a_data_set_has_one_that_was_not_trained_on(tmp_path, small_digits):
    from nnm.engine.data import held_out_split, parse_dataset_spec

    assert held_out_split("cifar10", None) == "test"
    assert held_out_split("cifar20", "train") == "test"
    assert held_out_split("stl10", None) == "test"
    assert held_out_split("cifar10:test", None) is None
    assert held_out_split("cifar10", "train+test") is None
    assert held_out_split("digits", None) is None and held_out_split("mnist5k", None) is None
    root = _split_folder(tmp_path / "f", small_digits, with_unlabeled=False)
    train = load_dataset(str(root))
    assert held_out_split(str(root), None, train) == "test"
    plain = write_image_folder(tmp_path / "plain", small_digits)
    assert held_out_split(str(plain), None, load_dataset(str(plain))) is None
    assert parse_dataset_spec(f"{root}:test") == (str(root), "test")
    assert parse_dataset_spec("cifar10:test") == ("cifar10", "test")


def test_mnist5k_without_its_package_says_which_extra(monkeypatch):
    from nnm.engine import data as data_module

    monkeypatch.setitem(data_module.BUILTIN_PACKAGES, "mnist5k", "nnm_no_such_package")
    with pytest.raises(DatasetError, match=r"nnm\[small-data\]"):
        data_module.load_dataset("mnist5k", "train", 20, None)
