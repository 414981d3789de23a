"""Split the CIFAR-10 training JPEGs into a training zip and a held-out zip (500 per class).

    python bench/split_cifar10.py ../shared/data/cifar10-train-jpg.zip OUT_DIR [--per-class 500]

Writes OUT_DIR/cifar10-train45k.zip and OUT_DIR/cifar10-holdout5k.zip (ImageFolder layout,
JPEG bytes copied unchanged), and OUT_DIR/cifar10-split.zip holding both as `train/` and `test/`
(the layout from which `nnm pipeline` reports the held-out figures itself). The choice is a
fixed-seed shuffle per class, so reruns agree.
"""

from __future__ import annotations

import argparse
import random
import zipfile
from collections import defaultdict
from pathlib import Path, PurePosixPath


def split(source: Path, out_dir: Path, per_class: int = 500, seed: int = 0) -> tuple[Path, Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    train_zip = out_dir / f"cifar10-train{(50000 - 10 * per_class) // 1000}k.zip"
    hold_zip = out_dir / f"cifar10-holdout{10 * per_class // 1000}k.zip"
    both_zip = out_dir / "cifar10-split.zip"
    if train_zip.exists() and hold_zip.exists() and both_zip.exists():
        return train_zip, hold_zip, both_zip
    with zipfile.ZipFile(source) as src:
        by_class: dict[str, list[str]] = defaultdict(list)
        for name in src.namelist():
            p = PurePosixPath(name)
            if p.suffix.lower() == ".jpg":
                by_class[p.parts[-2]].append(name)
        rng = random.Random(seed)
        held = set()
        for cls in sorted(by_class):
            names = sorted(by_class[cls])
            rng.shuffle(names)
            held.update(names[:per_class])
        for target, parts in ((train_zip, ((False, ""),)), (hold_zip, ((True, ""),)),
                              (both_zip, ((False, "train/"), (True, "test/")))):
            tmp = target.with_suffix(".tmp")
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
                for keep, prefix in parts:
                    for cls in sorted(by_class):
                        for name in sorted(by_class[cls]):
                            if (name in held) == keep:
                                p = PurePosixPath(name).parts
                                dst.writestr(f"{prefix}{p[-2]}/{p[-1]}", src.read(name))
            tmp.replace(target)
    return train_zip, hold_zip, both_zip


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("source", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--per-class", type=int, default=500)
    a = ap.parse_args()
    for path in split(a.source, a.out_dir, a.per_class):
        print(path)
