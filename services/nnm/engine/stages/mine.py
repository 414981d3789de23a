"""Stage 2: mine every image's top-k neighbours in the pretext feature space."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..augment import Normalize
from ..checkpoint import StageDir, atomic_write_bytes, atomic_write_json
from ..config import MineConfig, RuntimeConfig
from ..data import ImageSet
from ..mining import knn, neighbor_accuracy
from ..model_io import compute_outputs, load_pretext
from ..progress import ProgressSink
from ..runtime import Runtime
from .common import file_digest

STAGE = "mine"


def save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def run_mine(
    cfg: MineConfig,
    data: ImageSet,
    pretext_dir: Path | str,
    out_dir: Path | str,
    runtime_cfg: RuntimeConfig | None = None,
    sink: ProgressSink | None = None,
) -> dict[str, Any]:
    """Write `neighbors.npy` (N, topk+1; column 0 is the image itself) and `metrics.json`.

    With labels, `metrics.json` holds the neighbour accuracy (self excluded) at several k.
    """
    sink = sink or ProgressSink()
    rt = Runtime(runtime_cfg or RuntimeConfig())
    pretext_dir, out = Path(pretext_dir), Path(out_dir)
    stage = StageDir(
        out,
        STAGE,
        {
            "config": cfg.model_dump(mode="json"),
            "data": data.fingerprint(),
            "pretext": file_digest(pretext_dir / "model.pt"),
        },
    )
    done = stage.completed()
    if done is not None:
        return done
    backbone, contrastive, info = load_pretext(pretext_dir)
    net: torch.nn.Module = contrastive if (cfg.feature == "head" and contrastive is not None) else backbone
    net = rt.prepare(net).eval()
    sink.stage_started(STAGE, 1, 1)
    started = time.perf_counter()
    features = compute_outputs(net, data.images, Normalize(info.mean, info.std), rt, cfg.batch_size)
    extract_s = time.perf_counter() - started
    neighbors, _ = knn(features, cfg.topk, device=rt.device, chunk=cfg.chunk_size)
    summary: dict[str, Any] = {
        "topk": cfg.topk,
        "feature": "head" if net is contrastive else "backbone",
        "num_images": len(data),
        "seconds_features": extract_s,
        "seconds_search": time.perf_counter() - started - extract_s,
    }
    if data.has_labels:
        labels = data.labels.numpy()
        summary["neighbor_accuracy"] = {
            str(k): neighbor_accuracy(neighbors, labels, k) for k in sorted({1, 5, 10, 20, cfg.topk}) if k <= cfg.topk
        }
    save_npy(out / "neighbors.npy", neighbors)
    atomic_write_json(out / "metrics.json", summary)
    stage.mark_done(summary)
    sink.stage_finished(STAGE, summary)
    return summary
