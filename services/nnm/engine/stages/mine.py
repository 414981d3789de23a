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
from ..mining import exact_rows, knn, neighbor_accuracy, recall_at_k
from ..model_io import compute_outputs, load_pretext
from ..progress import ProgressSink
from ..runtime import Runtime
from .common import file_digest, finished, stage_end, wait_for_main

STAGE = "mine"
#: Rows whose exact neighbours measure an approximate index's recall.
RECALL_SAMPLE = 1000


def save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def pretext_features(
    pretext_dir: Path, data: ImageSet, rt: Runtime, feature: str, batch_size: int = 512
) -> tuple[torch.Tensor, str]:
    """Every image's pretext output that neighbours are mined in, and which output it was.

    `feature` "head" takes the contrastive head's output, "backbone" the backbone's; a model saved
    without a head gives the backbone's whatever was asked, and the returned name says so.
    """
    backbone, contrastive, info = load_pretext(pretext_dir)
    use_head = feature == "head" and contrastive is not None
    net: torch.nn.Module = contrastive if use_head else backbone
    out = compute_outputs(rt.prepare(net).eval(), data.images, Normalize(info.mean, info.std), rt, batch_size)
    return out, "head" if use_head else "backbone"


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
        writer=rt.dist.main,
    )
    done = finished(stage, rt)
    if done is not None:
        return done
    if not rt.dist.main:  # one search of the whole set, on rank 0
        return wait_for_main(stage, rt)
    sink.stage_started(STAGE, 1, 1)
    started = time.perf_counter()
    features, feature = pretext_features(pretext_dir, data, rt, cfg.feature, cfg.batch_size)
    extract_s = time.perf_counter() - started
    params = {"ivf_lists": cfg.ivf_lists, "ivf_probe": cfg.ivf_probe, "hnsw_m": cfg.hnsw_m, "ef_search": cfg.ef_search}
    neighbors, _ = knn(features, cfg.topk, device=rt.device, chunk=cfg.chunk_size, index=cfg.index,
                       index_params={k: v for k, v in params.items() if v is not None})
    summary: dict[str, Any] = {
        "topk": cfg.topk,
        "feature": feature,
        "index": cfg.index,
        "num_images": len(data),
        "seconds_features": extract_s,
        "seconds_search": time.perf_counter() - started - extract_s,
    }
    if cfg.index != "exact":
        # How much the approximation costs, without labels: recall against exact search on a sample.
        rows = np.random.default_rng(0).choice(len(data), min(len(data), RECALL_SAMPLE), replace=False)
        summary["recall_at_topk"] = recall_at_k(neighbors[rows], exact_rows(features, rows, cfg.topk))
    if data.has_labels:
        labels = data.labels.numpy()
        summary["neighbor_accuracy"] = {
            str(k): neighbor_accuracy(neighbors, labels, k) for k in sorted({1, 5, 10, 20, cfg.topk}) if k <= cfg.topk
        }
    save_npy(out / "neighbors.npy", neighbors)
    atomic_write_json(out / "metrics.json", summary)
    stage.mark_done(summary)
    stage_end(rt)
    sink.stage_finished(STAGE, summary)
    return summary
