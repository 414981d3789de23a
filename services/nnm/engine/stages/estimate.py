"""Stage between mining and clustering: estimate the number of clusters when it is not given."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import StageDir, atomic_write_json
from ..config import EstimateConfig, RuntimeConfig
from ..data import ImageSet
from ..errors import CheckpointError, DatasetError
from ..estimate import eigengap_estimate, modularity_estimate, silhouette_estimate
from ..progress import ProgressSink
from ..runtime import Runtime
from ..visualize import criterion_curve_png
from .common import file_digest, finished, stage_end, wait_for_main
from .mine import pretext_features

STAGE = "estimate"


def candidate_range(cfg: EstimateConfig, num_images: int) -> tuple[int, int]:
    """The K range actually searched: the configured one, capped so every cluster could hold two images."""
    k_max = min(cfg.max_clusters, num_images // 2)
    if k_max < cfg.min_clusters:
        raise DatasetError(
            f"the dataset has {num_images} images, too few to look for at least {cfg.min_clusters} clusters"
        )
    return cfg.min_clusters, k_max


def mined_feature(mine_dir: Path) -> str:
    """The pretext output ("head" or "backbone") the mine stage searched neighbours in."""
    try:
        return json.loads((mine_dir / "metrics.json").read_text())["feature"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"the mine stage in {mine_dir} left no record of its feature: run it again") from e


def run_estimate(
    cfg: EstimateConfig,
    data: ImageSet,
    pretext_dir: Path | str,
    mine_dir: Path | str,
    out_dir: Path | str,
    runtime_cfg: RuntimeConfig | None = None,
    sink: ProgressSink | None = None,
) -> dict[str, Any]:
    """Write `estimate.json` (the estimate, the criterion's curve over K) and `curve.png`; return the summary.

    The k-means partitions are scored in the space the neighbours were mined in: the pretext output that
    the mine stage recorded in its `metrics.json`.
    """
    sink = sink or ProgressSink()
    rt = Runtime(runtime_cfg or RuntimeConfig())
    pretext_dir, mine_dir, out = Path(pretext_dir), Path(mine_dir), Path(out_dir)
    k_min, k_max = candidate_range(cfg, len(data))
    feature = None if cfg.criterion == "eigengap" else mined_feature(mine_dir)  # eigengap reads the graph only
    stage = StageDir(
        out,
        STAGE,
        {
            "config": cfg.model_dump(mode="json"),
            "seed": rt.seed,
            "feature": feature,
            "data": data.fingerprint(),
            "pretext": file_digest(pretext_dir / "model.pt"),
            "neighbors": file_digest(mine_dir / "neighbors.npy"),
        },
        writer=rt.dist.main,
    )
    done = finished(stage, rt)
    if done is not None:
        return done
    if not rt.dist.main:  # a search over K on the mined graph, on rank 0
        return wait_for_main(stage, rt)
    neighbors = np.load(mine_dir / "neighbors.npy")
    if neighbors.shape[0] != len(data):
        raise DatasetError(f"the mined neighbours cover {neighbors.shape[0]} images, the dataset has {len(data)}")
    sink.stage_started(STAGE, 1, 1)
    started = time.perf_counter()
    if cfg.criterion == "eigengap":
        est = eigengap_estimate(neighbors, k_min, k_max, cfg.graph_neighbors, rt.seed)
    else:
        features = pretext_features(pretext_dir, data, rt, feature)[0].numpy()
        if cfg.criterion == "modularity":
            est = modularity_estimate(features, neighbors, k_min, k_max, cfg.graph_neighbors, rt.seed,
                                      tolerance=cfg.tolerance, standard_errors=cfg.standard_errors)
        else:
            est = silhouette_estimate(features, k_min, k_max, cfg.sample, rt.seed, tolerance=cfg.tolerance,
                                      standard_errors=cfg.standard_errors)
    scored = est.standard_error is not None  # eigengap has no error and no tolerance
    summary: dict[str, Any] = {
        "clusters": est.k,
        "criterion": est.criterion,
        "min_clusters": k_min,
        "max_clusters": k_max,
        "curve": {str(k): v for k, v in est.curve.items()},
        # With a tolerance the estimate may be a smaller K than the curve's highest point: both are kept,
        # with the rule that allowed it and the tolerance it came to.
        "best_scoring": est.best_scoring,
        "rule": ("standard_error" if cfg.tolerance is None else "tolerance") if scored else None,
        "standard_errors": cfg.standard_errors if scored and cfg.tolerance is None else None,
        "tolerance": est.tolerance if scored else None,
        "standard_error": {str(k): v for k, v in est.standard_error.items()} if scored else None,
        "num_images": len(data),
        "seconds": round(time.perf_counter() - started, 2),
        **est.details,
    }
    if data.has_labels:  # for reference only: the estimate never sees labels
        summary["num_classes"] = data.num_classes
    atomic_write_json(out / "estimate.json", summary)
    title = f"{est.criterion}: estimated {est.k} clusters"
    band = est.curve[est.best_scoring] - est.tolerance if scored and est.best_scoring is not None else None
    criterion_curve_png(est.curve, est.k, est.criterion, out / "curve.png", title=title, accept_above=band)
    stage.mark_done(summary)
    stage_end(rt)
    sink.stage_finished(STAGE, summary)
    sink.message(f"estimate: {est.k} clusters ({est.criterion}, searched {k_min}..{k_max})")
    return summary
