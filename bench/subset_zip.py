"""Copy the first N images of every folder of an image zip into a smaller zip (JPEG bytes unchanged).

    python bench/subset_zip.py SRC.zip DST.zip --per-folder 200 [--per-test-folder 50]

A folder is an image's parent path (`airplane/`, or `train/airplane/` in a zip with splits); folders
under `test/` take `--per-test-folder` images when it is given. Used by the GPU smoke run and the SimCLR
sweep to make small sets from `bench/split_cifar10.py`'s zips.
"""

from __future__ import annotations

import argparse
import zipfile
from collections import Counter
from pathlib import PurePosixPath


def subset(src: str, dst: str, per_folder: int, per_test_folder: int | None = None) -> Counter:
    """Write `dst` with the first images of each folder of `src`; returns the count per folder."""
    taken: Counter = Counter()
    with zipfile.ZipFile(src) as source, zipfile.ZipFile(dst, "w") as out:
        for name in source.namelist():
            path = PurePosixPath(name)
            if path.suffix.lower() != ".jpg":
                continue
            folder = str(path.parent)
            limit = per_test_folder if per_test_folder is not None and path.parts[0] == "test" else per_folder
            if taken[folder] < limit:
                taken[folder] += 1
                out.writestr(name, source.read(name))
    return taken


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--per-folder", type=int, required=True)
    ap.add_argument("--per-test-folder", type=int)
    a = ap.parse_args()
    counts = subset(a.src, a.dst, a.per_folder, a.per_test_folder)
    print(f"{a.dst}: {sum(counts.values())} images in {len(counts)} folders")
