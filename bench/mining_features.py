"""Which pretext feature finds the best neighbours? A study on a finished run's pretext model (issue 10).

    python bench/mining_features.py RUN_DIR [--dataset PATH_OR_NAME] [--variants base flip size24 ...]

The mine stage takes the backbone's output for each full image at the training resolution. This
script computes the features again in other ways from the same pretext model (no training) and
prints, per variant, the top-k neighbour accuracy of an exact search (labels used only to score)
and the seconds the feature pass took:

- `base`: what the mine stage does (the control: it must match the run's `mine/metrics.json`);
- `flip`: the mean of the L2-normalised features of the image and of its mirror image;
- `sizeN`: the image resized to N px (bilinear, antialiased) before the backbone, e.g. `size24`, the
  side of the `cpu` preset's SimCLR crops;
- `layers`: the pooled outputs of the backbone's last two stages, each L2-normalised, side by side.

One JSON line per variant on stdout. Needs labels; run it beside nothing else if the seconds matter.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _features(backbone, images, normalize, rt, variant: str, batch_size: int = 512) -> torch.Tensor:
    from nnm.engine.model_io import compute_outputs

    def pooled_last_two(x: torch.Tensor) -> torch.Tensor:
        # The backbone's own forward (stem, pooling) with layer3's output caught on the way: no second
        # copy of the layout to drift from models.py.
        caught: list[torch.Tensor] = []
        hook = backbone.layer3.register_forward_hook(lambda _m, _i, out: caught.append(out))
        try:
            x4 = backbone(x).float()
        finally:
            hook.remove()
        x3 = torch.flatten(F.adaptive_avg_pool2d(caught[0], 1), 1).float()
        return torch.cat([F.normalize(p, dim=1) for p in (x3, x4)], dim=1)

    def fn(x: torch.Tensor) -> torch.Tensor:
        if variant.startswith("size"):
            side = int(variant.removeprefix("size"))
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        if variant == "layers":
            return pooled_last_two(x)
        out = backbone(x).float()
        if variant == "flip":
            out = F.normalize(out, dim=1) + F.normalize(backbone(torch.flip(x, dims=[3])).float(), dim=1)
        return out

    with torch.no_grad():
        return compute_outputs(fn, images, normalize, rt, batch_size)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path, help="a pipeline run directory (its pretext/ and config.json)")
    ap.add_argument("--dataset", help="the run's data set (default: the one in its config.json)")
    ap.add_argument("--variants", nargs="+", default=["base", "flip", "size24", "size28", "layers"])
    ap.add_argument("--topk", type=int, default=20)
    args = ap.parse_args()

    from nnm.engine.augment import Normalize
    from nnm.engine.config import RuntimeConfig
    from nnm.engine.data import load_dataset
    from nnm.engine.mining import knn, neighbor_accuracy
    from nnm.engine.model_io import load_pretext
    from nnm.engine.runtime import Runtime

    cfg = json.loads((args.run / "config.json").read_text())
    data = load_dataset(args.dataset or cfg["data"]["dataset"], cfg["data"]["split"], cfg["data"]["image_size"],
                        cfg["data"]["root"])
    if not data.has_labels:
        raise SystemExit("the data set has no labels to score neighbours with")
    labels = data.labels.numpy()
    rt = Runtime(RuntimeConfig.model_validate(cfg["runtime"]))
    backbone, _, info = load_pretext(args.run / "pretext")
    backbone = rt.prepare(backbone).eval()
    normalize = Normalize(info.mean, info.std)
    for variant in args.variants:
        t0 = time.perf_counter()
        feats = _features(backbone, data.images, normalize, rt, variant)
        seconds = time.perf_counter() - t0
        neighbors, _ = knn(feats, args.topk)
        row = {"variant": variant, "dim": feats.shape[1], "feature_seconds": round(seconds, 1),
               "neighbor_accuracy": {str(k): round(neighbor_accuracy(neighbors, labels, k), 4)
                                     for k in (1, 5, 10, 20) if k <= args.topk}}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
