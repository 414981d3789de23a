"""The decoded-image cache: decoded once, memory-mapped, equal to decoding into memory, bounded on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import png_bytes, write_image_folder, write_zip
from hostile_inputs import blank_png
from nnm.engine import cache as cache_mod
from nnm.engine.cache import CachePolicy, MappedImages, cache_policy, prune
from nnm.engine.config import ClusterConfig, DataConfig, MineConfig, PretextConfig, RuntimeConfig
from nnm.engine.data import ImageSet, load_dataset
from nnm.engine.errors import DatasetError
from nnm.engine.stages import run_cluster, run_mine, run_pretext
from PIL import Image


def _same(a: ImageSet, b: ImageSet) -> None:
    assert torch.equal(a.images[0 : len(a)], b.images[0 : len(b)])
    assert (a.labels is None) == (b.labels is None)
    if a.labels is not None:
        assert torch.equal(a.labels, b.labels)
    assert a.names == b.names and a.class_names == b.class_names and a.source == b.source
    assert a.fingerprint() == b.fingerprint()


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_folder_is_decoded_once_and_mapped(tmp_path, digits):
    folder = write_image_folder(tmp_path / "digits", digits, step=6)
    policy = CachePolicy(tmp_path / "cache")
    memory = load_dataset(str(folder))
    first = load_dataset(str(folder), cache=policy)
    assert isinstance(first.images, MappedImages) and not isinstance(memory.images, MappedImages)
    _same(first, memory)
    files = _entries(policy.directory)
    assert [f for f in files if f.endswith(".npy")] and not [f for f in files if f.endswith(".part")]
    # Unreadable image files cannot be decoded again: the second load comes from the cache alone. (As root,
    # which reads anything, the check is that nothing new was written.)
    for png in folder.rglob("*.png"):
        png.chmod(0)
    try:
        again = load_dataset(str(folder), cache=policy)
    finally:
        for png in folder.rglob("*.png"):
            png.chmod(0o644)
    _same(again, memory)
    assert _entries(policy.directory) == files
    # Rows come back as tensors of their own, by index tensor, slice or position.
    idx = torch.tensor([7, 0, 7, len(memory) - 1])
    rows = again.images[idx]
    assert torch.equal(rows, memory.images[idx])
    rows[0] = 255  # a copy: the file is unchanged
    assert torch.equal(again.images[7], memory.images[7])


def test_changed_files_get_a_new_entry(tmp_path, digits):
    folder = write_image_folder(tmp_path / "digits", digits, count=60)
    policy = CachePolicy(tmp_path / "cache")
    load_dataset(str(folder), cache=policy)
    victim = sorted(folder.rglob("*.png"))[3]
    flipped = np.ascontiguousarray(np.array(Image.open(victim))[:, ::-1])
    victim.write_bytes(png_bytes(flipped))
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    changed = load_dataset(str(folder), cache=policy)
    _same(changed, load_dataset(str(folder)))
    assert len([f for f in _entries(policy.directory) if f.endswith(".npy")]) == 2


def test_archive_with_splits_and_native_size_alias(tmp_path, digits):
    members = {}
    for i in range(0, 300, 3):
        split = "test" if i % 4 == 0 else "train"
        members[f"set/{split}/{int(digits.labels[i])}/{i}.png"] = png_bytes(digits.images[i, 0].numpy())
    archive = write_zip(tmp_path / "split.zip", members)
    policy = CachePolicy(tmp_path / "cache")
    for split in ("train", "test"):
        _same(load_dataset(f"{archive}:{split}", cache=policy), load_dataset(f"{archive}:{split}"))
    cached = load_dataset(str(archive), split="test", cache=policy)
    assert cached.extra["splits"] == ["test", "train"] and cached.source.endswith(":test")
    # Asked for at their own side (8 px) and then at 8 px explicitly: one entry, reached by an alias.
    npys = [f for f in _entries(policy.directory) if f.endswith(".npy")]
    sized = load_dataset(str(archive), split="test", image_size=8, cache=policy)
    assert [f for f in _entries(policy.directory) if f.endswith(".npy")] == npys
    _same(sized, cached)


def test_a_colour_image_after_grayscale_ones_widens_the_file(tmp_path, digits):
    members = {f"flat/{i:03d}.png": png_bytes(digits.images[i, 0].numpy()) for i in range(40)}
    colour = np.stack([digits.images[40, 0].numpy(), np.zeros((8, 8), np.uint8), digits.images[41, 0].numpy()], 2)
    members["flat/999.png"] = png_bytes(colour)
    archive = write_zip(tmp_path / "mixed.zip", members)
    policy = CachePolicy(tmp_path / "cache")
    cached = load_dataset(str(archive), cache=policy)
    assert cached.channels == 3 and cached.labels is None
    _same(cached, load_dataset(str(archive)))
    assert torch.equal(cached.images[0][0], cached.images[0][2])  # grayscale rows fill every channel


def test_a_failed_decode_leaves_nothing_behind(tmp_path, digits):
    members = {f"flat/{i:03d}.png": png_bytes(digits.images[i, 0].numpy()) for i in range(30)}
    members["flat/015.png"] = blank_png(2000, "L")[:2000]  # a sound header, its pixels cut short
    archive = write_zip(tmp_path / "bad.zip", members)
    policy = CachePolicy(tmp_path / "cache")
    with pytest.raises(DatasetError, match="015.png"):
        load_dataset(str(archive), cache=policy)
    assert policy.directory.exists() and _entries(policy.directory) == []


def test_a_damaged_entry_is_rebuilt(tmp_path, digits):
    folder = write_image_folder(tmp_path / "digits", digits, count=50)
    policy = CachePolicy(tmp_path / "cache")
    load_dataset(str(folder), cache=policy)
    (npy,) = policy.directory.glob("*.npy")
    with open(npy, "r+b") as f:
        f.truncate(npy.stat().st_size - 10)
    _same(load_dataset(str(folder), cache=policy), load_dataset(str(folder)))
    assert MappedImages(npy).shape[0] == 50


def test_unwritable_cache_is_one_clear_error(tmp_path, digits):
    folder = write_image_folder(tmp_path / "digits", digits, count=20)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(DatasetError, match="cannot write the decoded-image cache"):
        load_dataset(str(folder), cache=CachePolicy(blocker / "cache"))


def test_builtin_set_is_cached_after_resizing(tmp_path):
    policy = CachePolicy(tmp_path / "cache")
    cached = load_dataset("digits", image_size=16, cache=policy)
    assert isinstance(cached.images, MappedImages) and cached.image_size == 16
    _same(cached, load_dataset("digits", image_size=16))
    assert isinstance(load_dataset("digits", image_size=16, cache=policy).images, MappedImages)


def test_auto_caches_only_large_sets_and_off_never(tmp_path, monkeypatch):
    monkeypatch.setenv("NNM_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setenv("NNM_CACHE_MAX_BYTES", "12345")
    auto = DataConfig(dataset="digits").cache_policy()
    assert auto == CachePolicy(tmp_path / "env-cache", cache_mod.AUTO_CACHE_BYTES, 12345)
    assert not isinstance(load_dataset("digits", cache=auto).images, MappedImages)  # 115 KB: in memory
    assert not (tmp_path / "env-cache").exists()
    assert DataConfig(dataset="digits", cache="off").cache_policy() is None
    assert cache_policy("on", tmp_path / "x", 7) == CachePolicy(tmp_path / "x", 0, 7)


def test_prune_removes_least_recently_used_entries(tmp_path, digits):
    policy = CachePolicy(tmp_path / "cache")
    sizes = (8, 12, 16)
    for side in sizes:
        load_dataset("digits", image_size=side, cache=policy)
    entries = {p.stem: p.stat().st_size + p.with_suffix(".json").stat().st_size
               for p in policy.directory.glob("*.npy")}
    assert len(entries) == 3
    # Use the 8 px entry again: the 12 px one is now the least recently used.
    metas = sorted(policy.directory.glob("*.json"), key=lambda p: json.loads(p.read_text())["shape"][-1])
    for age, meta in zip((300, 200, 100), metas, strict=True):
        os.utime(meta, (meta.stat().st_atime - age, meta.stat().st_mtime - age))
    load_dataset("digits", image_size=8, cache=policy)
    twelve, sixteen = metas[1].stem, metas[2].stem
    bound = sum(entries.values()) - entries[twelve]  # room for all but one entry
    removed = prune(CachePolicy(policy.directory, max_bytes=bound), keep=None)
    assert removed == [twelve]
    assert sorted(p.stem for p in policy.directory.glob("*.npy")) == sorted(set(entries) - {twelve})
    # A bound of nothing removes everything but the entry being kept.
    assert prune(CachePolicy(policy.directory, max_bytes=0), keep=sixteen) == [metas[0].stem]
    # A killed writer's part is removed once a day old.
    part = policy.directory / f".{'0' * 32}.abc.npy.part"
    part.write_bytes(b"x")
    os.utime(part, (0, 0))
    prune(CachePolicy(policy.directory))
    assert not part.exists()


def test_reading_does_not_grow_resident_memory(tmp_path, monkeypatch):
    """Reading a whole 256 MiB set in batches leaves at most about DROP_EVERY of it mapped in the process."""
    monkeypatch.setattr(cache_mod, "DROP_EVERY", 16 * 1024**2)
    n, side = 87_382, 32  # 3 x 32 x 32 bytes each: 256 MiB
    with cache_mod.EntryWriter(tmp_path, "big", n, 3, side) as writer:
        block = np.random.default_rng(0).integers(0, 256, (4096, 3, side, side), dtype=np.uint8)
        for start in range(0, n, 4096):
            writer.append(block[: min(4096, n - start)])
        entry = writer.finish(None, [str(i) for i in range(n)], None, {"source": "random"})

    def rss_file() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no RssFile")

    images, before, peak = entry.images, rss_file(), 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    total = 0
    for batch in order.split(512):
        total += int(images[batch].sum(dtype=torch.int64))
        peak = max(peak, rss_file() - before)
    assert total == int(block.sum(dtype=np.int64)) * (n // 4096) + int(block[: n % 4096].sum(dtype=np.int64))
    assert peak < 64 * 1024**2, peak  # the set is 256 MiB


def test_stages_give_the_same_results_from_the_cache(tmp_path, small_digits, one_thread):
    """pretext, mine and cluster on a mapped set write what they write on the same set in memory."""
    folder = write_image_folder(tmp_path / "digits", small_digits)
    pre = PretextConfig(epochs=1, batch_size=64, backbone={"width": 8})
    outs = {}
    for name, policy in (("memory", None), ("cache", CachePolicy(tmp_path / "cache"))):
        data = load_dataset(str(folder), cache=policy)
        assert isinstance(data.images, MappedImages) == (policy is not None)
        rt = RuntimeConfig(threads=1)
        out = tmp_path / name
        run_pretext(pre, data, out / "pretext", rt)
        run_mine(MineConfig(topk=5, feature="backbone"), data, out / "pretext", out / "mine", rt)
        summary = run_cluster(ClusterConfig(epochs=1, batch_size=64, heads=2), data, out / "pretext", out / "mine",
                              out / "cluster", rt)
        outs[name] = (np.load(out / "mine" / "neighbors.npy"), summary["head_losses"])
    assert np.array_equal(outs["memory"][0], outs["cache"][0])
    assert outs["memory"][1] == outs["cache"][1]


def test_an_archive_is_one_entry_wherever_it_lies_and_a_new_one_when_changed(tmp_path, digits):
    members = {f"{int(digits.labels[i])}/{i}.png": png_bytes(digits.images[i, 0].numpy()) for i in range(40)}
    first = write_zip(tmp_path / "a.zip", members)
    policy = CachePolicy(tmp_path / "cache")
    load_dataset(str(first), cache=policy)
    elsewhere = tmp_path / "copy" / "b.zip"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(first.read_bytes())  # a worker downloads the same upload for another job
    assert cache_mod.archive_source(elsewhere) == cache_mod.archive_source(first)
    load_dataset(str(elsewhere), cache=policy)
    assert len(list(policy.directory.glob("*.npy"))) == 1
    members["0/0.png"] = png_bytes(255 - digits.images[0, 0].numpy())  # one member's pixels changed
    changed = write_zip(tmp_path / "c.zip", members)
    assert cache_mod.archive_source(changed) != cache_mod.archive_source(first)
    _same(load_dataset(str(changed), cache=policy), load_dataset(str(changed)))
    with pytest.raises(DatasetError, match="not a readable .zip"):
        cache_mod.archive_source(tmp_path / "cache" / next(policy.directory.glob("*.json")).name)
