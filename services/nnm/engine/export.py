"""Export a finished cluster / selflabel directory as a self-contained model directory."""

from __future__ import annotations

from pathlib import Path

from .data import ImageSet
from .model_io import InputSpec, ModelInfo, TrainedModel
from .stages.cluster import load_cluster_model


def export_model(stage_dir: Path | str, data: ImageSet | None, out_dir: Path | str) -> TrainedModel:
    """Write `model.pt` + `model.json` for the selected head of `stage_dir`.

    With labelled `data`, the cluster-to-class map is learnt on it so assignments carry class names.
    """
    model, meta = load_cluster_model(Path(stage_dir))
    spec = InputSpec.model_validate(meta["input"])
    info = ModelInfo(**spec.model_dump(), clusters=meta["clusters"], method=meta.get("method"))
    trained = TrainedModel(model, info)
    if data is not None and data.has_labels:
        from .config import RuntimeConfig
        from .metrics import match_clusters
        from .runtime import Runtime

        probs, _ = trained.predict(data.images, Runtime(RuntimeConfig()))
        labels = data.labels.numpy()
        info.class_names = data.class_names
        info.dataset = data.source
        info.cluster_to_class = match_clusters(
            probs.argmax(1), labels, info.clusters, len(data.class_names or [])
        ).tolist()
    trained.save(Path(out_dir))
    return trained
