"""Named presets: the papers' settings per dataset, and budgets for CPUs.

A preset is a partial `PipelineConfig` (a dict) chosen from the preset name and a few traits of the
dataset; user overrides are merged on top of it and the result is validated.

- `nnm`:   NNM's published setup (ResNet-18, SimCLR 500 epochs, NNM 100 epochs, self-label).
- `scan`:  SCAN's published setup (same pretext; SCAN loss, one head).
- `fast`:  one GPU, minutes: the papers' networks and augmentations on short schedules sized by the
           data (CIFAR-10's 45,000 images: SimCLR 80 epochs, NNM 20, self-label 20).
- `cpu`:   small budgets that finish in minutes on a 2-core CPU (narrow ResNet-18, bf16 where fast).
- `quick`: a smoke run of seconds, for tests and trying the plumbing.
- `auto`:  `fast` on a CUDA machine, `cpu` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

PRESETS = ("auto", "nnm", "scan", "fast", "cpu", "quick")


@dataclass(frozen=True)
class DatasetTraits:
    """What a preset needs to know about the data."""

    builtin: str | None  # cifar10, cifar20, stl10, mnist5k, digits, or None for a folder
    image_size: int
    channels: int
    num_images: int
    #: Splits of the data set (a built-in's, or a folder's train/ test/ unlabeled/); () when it has none.
    splits: tuple[str, ...] = ()


def _paper_family(t: DatasetTraits) -> str:
    if t.builtin in {"cifar10", "cifar20", "stl10"}:
        return t.builtin
    if t.image_size <= 64:
        return "cifar10"
    return "stl10" if t.image_size <= 160 else "imagenet"


def _paper(method: str, t: DatasetTraits) -> dict[str, Any]:
    fam = _paper_family(t)
    arch = {"stl10": "resnet18-stl", "imagenet": "resnet50"}.get(fam, "resnet18-cifar")
    cutout = 0.5 if fam in {"cifar10", "cifar20"} else 1 / 3
    cfg: dict[str, Any] = {
        "pretext": {
            "backbone": {"arch": arch},
            "epochs": 500,
            "batch_size": 512,
            "lr": 0.4,
            "lr_min": 4e-4,
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "temperature": 0.1,
        },
        "mine": {"topk": 20},
        "selflabel": {
            "epochs": 100 if fam == "stl10" else 200,
            "batch_size": 1000,
            "lr": 1e-4,
            "threshold": 0.99,
            "augment": {"cutout": cutout},
        },
    }
    if fam == "stl10" and t.builtin == "stl10":
        cfg["data"] = {"pretext_split": "train+unlabeled"}
    if method == "nnm":
        cfg["cluster"] = {
            "method": "nnm",
            "heads": 3,
            "epochs": 100,
            "lr": 1e-4,
            "weight_decay": 1e-4,
            "batch_size": 500 if fam == "cifar20" else 200,
            "augment": {"cutout": cutout},
        }
    else:
        epochs = 50 if fam == "cifar10" else 100
        cfg["cluster"] = {
            "method": "scan",
            "heads": 1,
            "epochs": epochs,
            "lr": 1e-4,
            "weight_decay": 1e-4,
            "batch_size": 512 if fam == "cifar20" else 128,
            "augment": {"cutout": cutout},
        }
    return cfg


#: Digit-like images: no flips, gentle crops and rotations, no colour.
_DIGIT_SIMCLR = {
    "crop_scale": [0.4, 1.0],
    "flip": False,
    "rotate_degrees": 15,
    "jitter": [0.4, 0.4, 0.0, 0.0],
    "grayscale_p": 0.0,
}
#: SCAN's shear and shift maxima: 3x wider ranges were measured not to help (docs/fidelity.md).
_DIGIT_STRONG = {
    "flip": False,
    "magnitude": 0.6,
    "cutout": 0.3,
    "ops": [
        "identity",
        "autocontrast",
        "equalize",
        "rotate",
        "solarize",
        "posterize",
        "contrast",
        "brightness",
        "sharpness",
        "shear_x",
        "shear_y",
        "translate_x",
        "translate_y",
    ],
}


def _cpu(t: DatasetTraits) -> dict[str, Any]:
    if t.builtin == "digits" or (t.channels == 1 and t.image_size <= 16):
        return {
            "data": {"image_size": 16},
            "pretext": {
                "backbone": {"width": 16},
                "epochs": 150,
                "batch_size": 256,
                "lr": 0.4,
                "warmup_epochs": 5,
                "augment": _DIGIT_SIMCLR,
            },
            "mine": {"topk": 10, "feature": "backbone"},
            "cluster": {
                "method": "nnm",
                "heads": 3,
                "epochs": 40,
                "batch_size": 256,
                "lr": 2e-4,
                "augment": _DIGIT_STRONG,
            },
            "selflabel": {"epochs": 30, "batch_size": 256, "lr": 3e-5, "augment": _DIGIT_STRONG},
        }
    if t.channels == 1 and t.image_size <= 32:
        # MNIST-like: 20 px keeps strokes legible and makes every step about 2x cheaper than 28 px,
        # which is what fits 5,000 images in well under 20 minutes on 2 cores.
        return {
            "data": {"image_size": min(t.image_size, 20)},
            "pretext": {
                "backbone": {"width": 16},
                "epochs": 60,
                "batch_size": 256,
                "lr": 0.4,
                "warmup_epochs": 3,
                "augment": _DIGIT_SIMCLR,
            },
            "mine": {"topk": 20, "feature": "backbone"},
            # 10 heads (SCAN's number), the lowest-loss one kept: with 3, one seed in three settled with
            # two digits in one cluster (docs/benchmarks.md); the extra heads cost about 5 % of the stage.
            "cluster": {
                "method": "nnm",
                "heads": 10,
                "epochs": 25,
                "batch_size": 256,
                "lr": 2e-4,
                "augment": _DIGIT_STRONG,
            },
            "selflabel": {"epochs": 15, "batch_size": 256, "lr": 1e-4, "augment": _DIGIT_STRONG},
        }
    # Colour images: a quarter-width ResNet-18 (wider ones run far less efficiently on a 2-core CPU)
    # and SimCLR views of 3/4 the image side (1.5x cheaper steps; features are still taken from full
    # images). Sized so CIFAR-10's 45k training images fit in an hour on 2 cores with bf16 (measured in
    # docs/benchmarks.md). With only 7 clustering epochs on big sets, lr 5e-4 rather than the papers'
    # 1e-4: at 1e-4 the loss was still falling steeply when the epochs ran out.
    big = t.num_images > 20000
    size = min(t.image_size, 32 if t.image_size <= 48 else 64)
    return {
        "data": {"image_size": size},
        "pretext": {"backbone": {"width": 16}, "epochs": 40 if big else 80, "batch_size": 512, "lr": 0.6,
                    "warmup_epochs": 2, "augment": {"crop_size": max(8, size * 3 // 4)}},
        "mine": {"topk": 20, "feature": "backbone"},
        "cluster": {"method": "nnm", "heads": 3, "epochs": 7 if big else 30, "batch_size": 256,
                    "lr": 5e-4 if big else 1e-4},
        "selflabel": {"epochs": 2 if big else 15, "batch_size": 512, "lr": 1e-4},
    }


#: Work of the `fast` preset per stage, in image-epochs at 32 px (CIFAR-10's 45,000 training images:
#: SimCLR 80 epochs, NNM 20, self-label 20). A data set's epochs are this divided by its size in those
#: units, within the bounds: a small set gets more epochs, a large or high-resolution one fewer.
#: Sized from the H100 speeds measured before issue 11 (SimCLR 3.0 s per CIFAR epoch, self-label 2.4 s)
#: and its bar for clustering (>= 10,000 images/s): about 7 minutes in all, under the 8 it allows.
FAST_WORK = {"pretext": (3_600_000, 20, 300), "cluster": (900_000, 10, 100), "selflabel": (900_000, 10, 100)}


def fast_epochs(stage: str, t: DatasetTraits, images: int | None = None) -> int:
    """Epochs of `stage` under the `fast` preset for a data set with `t` (`images`: those it trains on)."""
    work, lo, hi = FAST_WORK[stage]
    units = max(1, images or t.num_images) * (t.image_size / 32) ** 2
    return int(min(hi, max(lo, round(work / units))))


def _fast(t: DatasetTraits) -> dict[str, Any]:
    """The papers' networks and augmentations, NNM, on schedules that fit minutes of one GPU.

    Shorter schedules need larger steps: the clustering learning rate is 5e-4 (the papers' 1e-4 over
    100 epochs), as the `cpu` preset measured for its 7 epochs, and self-labelling runs at 2e-4.
    Neighbours are mined on backbone features: after short SimCLR schedules they were right more often
    than the head's (+1.6 to +4.6 points of top-k neighbour accuracy, `bench/simclr_sweep.sh`).
    """
    cfg = _paper("nnm", t)
    pretext_images = t.num_images
    if cfg.get("data", {}).get("pretext_split") == "train+unlabeled" and t.builtin == "stl10":
        pretext_images = 105_000  # STL-10's 5,000 training and 100,000 unlabelled images
    cfg["pretext"] |= {"epochs": fast_epochs("pretext", t, pretext_images), "warmup_epochs": 5}
    cfg["mine"] |= {"feature": "backbone"}
    cfg["cluster"] |= {"epochs": fast_epochs("cluster", t), "batch_size": 512, "lr": 5e-4}
    cfg["selflabel"] |= {"epochs": fast_epochs("selflabel", t), "lr": 2e-4}
    return cfg


QUICK_MAX_STEPS = 100


def _quick(t: DatasetTraits) -> dict[str, Any]:
    base = _cpu(t)
    # A smoke run: its time is bounded on any set (100 steps are 51,200 SimCLR images an epoch).
    cap = {"max_steps": QUICK_MAX_STEPS}
    base["pretext"] = base["pretext"] | {"epochs": 3, "warmup_epochs": 0} | cap
    base["cluster"] = base["cluster"] | {"epochs": 2} | cap
    base["selflabel"] = base["selflabel"] | {"epochs": 1} | cap
    return base


def build_preset(name: str, traits: DatasetTraits, cuda: bool) -> dict[str, Any]:
    """The partial configuration of preset `name` for a dataset with `traits`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    if name == "auto":
        name = "fast" if cuda else "cpu"
    if name in {"nnm", "scan"}:
        cfg = _paper(name, traits)
    elif name == "fast":
        cfg = _fast(traits)
    elif name == "cpu":
        cfg = _cpu(traits)
    else:
        cfg = _quick(traits)
    if traits.builtin is None and "unlabeled" in traits.splits:
        # A folder's unlabeled/ images train the backbone, as STL-10's do in the papers.
        cfg["data"] = cfg.get("data", {}) | {"pretext_split": "train+unlabeled"}
    return cfg
