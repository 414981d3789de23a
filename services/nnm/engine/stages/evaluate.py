"""Stage 5: metrics, confusion matrix, prototypes and per-image assignments."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import atomic_write_bytes, atomic_write_json
from ..config import EvaluateConfig, RuntimeConfig
from ..data import ImageSet
from ..gallery import write_gallery
from ..metrics import cluster_summary, clustering_metrics
from ..model_io import TrainedModel
from ..progress import ProgressSink
from ..runtime import Runtime
from ..visualize import confusion_matrix_png, prototypes_png


def prototype_members(probs: np.ndarray, features: np.ndarray, members: int, shown: int) -> list[list[int]]:
    """Per cluster: average the features of its `members` most confident images and return the
    `shown` images closest to that mean (fewer when the cluster is small, none when empty)."""
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    feats = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    rows: list[list[int]] = []
    for c in range(probs.shape[1]):
        idx = np.nonzero(pred == c)[0]
        if idx.size == 0:
            rows.append([])
            continue
        top = idx[np.argsort(-conf[idx], kind="stable")[:members]]
        center = feats[top].mean(axis=0)
        dist = np.linalg.norm(feats[idx] - center, axis=1)
        rows.append(idx[np.argsort(dist, kind="stable")[:shown]].tolist())
    return rows


def run_evaluate(
    model: TrainedModel,
    data: ImageSet,
    out_dir: Path | str,
    cfg: EvaluateConfig | None = None,
    runtime_cfg: RuntimeConfig | None = None,
    sink: ProgressSink | None = None,
    prefix: str = "",
    gallery_neighbors: np.ndarray | None = None,
    gallery: bool | None = None,
) -> dict[str, Any]:
    """Evaluate `model` on `data` and write into `out_dir`:

    `metrics.json` (acc, nmi, ari, top5 and per-class accuracy when labels exist; cluster sizes and
    confidences always), `confusion_matrix.json` / `.png` (labelled data), `prototypes.png` /
    `.json` and `assignments.csv`, each name preceded by `prefix`; and, when `gallery` (default:
    `cfg.gallery` for an unprefixed evaluation), the cluster gallery in `gallery/` with the mined
    `gallery_neighbors` of each image when given.
    """
    cfg = cfg or EvaluateConfig()
    sink = sink or ProgressSink()
    rt = Runtime(runtime_cfg or RuntimeConfig())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if data.channels != model.info.in_channels:
        from ..errors import DatasetError

        raise DatasetError(
            f"the model expects {model.info.in_channels}-channel images, the dataset has {data.channels}"
        )
    images = data.images
    if data.image_size != model.info.image_size:
        from ..data import resize_batch

        images = resize_batch(images, model.info.image_size)
    sink.stage_started("evaluate", 1, 1)
    probs, features = model.predict(images, rt, cfg.batch_size)
    metrics: dict[str, Any] = {"dataset": data.source, "num_images": len(data)} | cluster_summary(probs)
    pred = probs.argmax(axis=1)
    labels = data.labels.numpy() if data.has_labels else None
    if labels is not None:
        m = clustering_metrics(probs, labels, data.class_names)
        cm = np.asarray(m.pop("confusion_matrix"))
        atomic_write_json(
            out / f"{prefix}confusion_matrix.json",
            {
                "class_names": m["class_names"],
                "normalization": "rows divided by true-class counts",
                "rows": "true class",
                "columns": "predicted class",
                "matrix": cm.tolist(),
            },
        )
        confusion_matrix_png(
            cm,
            m["class_names"],
            out / f"{prefix}confusion_matrix.png",
            title=f"ACC {m['acc']:.3f}  NMI {m['nmi']:.3f}  ARI {m['ari']:.3f}",
        )
        metrics |= m
    mapping = metrics.get("cluster_to_class")
    rows = prototype_members(probs, features, cfg.prototype_members, cfg.prototype_images)
    sizes = metrics["cluster_sizes"]
    names = data.class_names if labels is not None else None
    captions = []
    for c in range(probs.shape[1]):
        cap = f"cluster {c}\n{sizes[c]} images"
        if mapping is not None and names and mapping[c] >= 0:
            cap += f"\n-> {names[mapping[c]]}"
        captions.append(cap)
    prototypes_png(images.numpy(), rows, captions, out / f"{prefix}prototypes.png")
    atomic_write_json(
        out / f"{prefix}prototypes.json",
        {
            "clusters": [
                {"cluster": c, "size": sizes[c], "images": [data.names[i] for i in r]} for c, r in enumerate(rows)
            ]
        },
    )
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "cluster", "confidence"] + (["label"] if labels is not None else []))
    conf = probs.max(axis=1)
    for i in range(len(data)):
        row = [data.names[i], int(pred[i]), f"{conf[i]:.4f}"]
        if labels is not None and data.class_names:
            row.append(data.class_names[labels[i]])
        writer.writerow(row)
    atomic_write_bytes(out / f"{prefix}assignments.csv", buf.getvalue().encode())
    # By default only the unprefixed evaluation (the clustered images' own, or the only one) has a gallery.
    write = (cfg.gallery and not prefix) if gallery is None else gallery
    if write:
        write_gallery(out / "gallery", images, data.names, probs, rows, labels, names, gallery_neighbors,
                      cfg.gallery_thumbnail)
    atomic_write_json(out / f"{prefix}metrics.json", metrics)
    sink.stage_finished("evaluate", metrics)
    return metrics
