"""The whole pipeline: pretext -> mine -> (estimate K) -> cluster -> self-label -> export -> evaluate."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import atomic_write_json
from .config import DataConfig, PipelineConfig, deep_merge, parse_config
from .data import ImageSet, dataset_splits, held_out_split, is_builtin, load_dataset, parse_dataset_spec
from .distributed import from_env
from .errors import DatasetError
from .memory import peak_rss_bytes
from .model_io import InputSpec, ModelInfo, TrainedModel
from .presets import DatasetTraits, build_preset
from .progress import ProgressSink
from .runtime import resolve_device
from .stages.cluster import load_cluster_model, resolve_clusters, run_cluster
from .stages.estimate import run_estimate
from .stages.evaluate import run_evaluate
from .stages.mine import run_mine
from .stages.pretext import run_pretext
from .stages.selflabel import run_selflabel


def resolve_config(
    dataset: str, preset: str = "auto", overrides: dict[str, Any] | None = None, data: ImageSet | None = None
) -> PipelineConfig:
    """Preset for `dataset` (loaded to learn its traits unless given), with `overrides` on top.

    Under torchrun rank 0 alone loads the set to learn its traits and hands them to the other ranks."""
    overrides = overrides or {}
    if data is not None:
        traits = dataset_traits(dataset, data)
    else:
        data_cfg = overrides.get("data", {}) if isinstance(overrides.get("data"), dict) else {}
        policy = parse_config(DataConfig, {**data_cfg, "dataset": dataset}).cache_policy()
        traits = from_env().share(lambda: dataset_traits(
            dataset, load_dataset(dataset, data_cfg.get("split"), None, data_cfg.get("root"), cache=policy)))
    return config_for_traits(dataset, preset, overrides, traits)


def dataset_traits(dataset: str, data: ImageSet) -> DatasetTraits:
    """What the presets look at in a loaded data set."""
    name, _ = parse_dataset_spec(dataset)
    return DatasetTraits(
        builtin=name if is_builtin(dataset) else None,
        image_size=data.image_size,
        channels=data.channels,
        num_images=len(data),
        splits=dataset_splits(dataset, data),
    )


def config_for_traits(dataset: str, preset: str, overrides: dict[str, Any], traits: DatasetTraits) -> PipelineConfig:
    """Preset `preset` for a dataset with `traits`, `overrides` merged on top, validated."""
    runtime = overrides.get("runtime") if isinstance(overrides.get("runtime"), dict) else {}
    device = runtime.get("device", "auto") if isinstance(runtime.get("device", "auto"), str) else "auto"
    cuda = device == "cuda" or (device == "auto" and resolve_device("auto").type == "cuda")
    merged = deep_merge(build_preset(preset, traits, cuda), overrides)
    merged = deep_merge(merged, {"data": {"dataset": dataset}})
    return parse_config(PipelineConfig, merged)


#: What the self-labelling guard saw (label-free), kept in metrics.json.
GUARD_KEYS = ("quality_before", "quality_after", "scan_loss_before", "scan_loss_after")
#: Figures of the clustered images kept beside the held-out split's headline figures in metrics.json.
TRAIN_KEYS = ("dataset", "num_images", "acc", "nmi", "ari", "top5", "cluster_sizes")


def _stage_timing(summary: dict[str, Any]) -> dict[str, Any]:
    history = summary.get("history") or []
    seconds = [h["seconds"] for h in history if "seconds" in h]
    out: dict[str, Any] = {"epochs": len(history), "seconds": round(sum(seconds), 2)}
    if seconds:
        out["seconds_per_epoch"] = round(sum(seconds) / len(seconds), 2)
        out["images_per_s"] = round(sum(h.get("images_per_s", 0) for h in history) / len(history), 1)
    return out


def run_pipeline(cfg: PipelineConfig, out_dir: Path | str, sink: ProgressSink | None = None) -> dict[str, Any]:
    """Run every stage into `out_dir` and return the metrics (also written to `metrics.json`).

    Each stage writes its own sub-directory; re-running after a kill resumes where it stopped.
    The final model is exported to `out_dir/model`, usable by `nnm assign` and `nnm evaluate`.
    """
    sink = sink or ProgressSink()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks = from_env()  # under torchrun every rank trains; rank 0 alone writes, evaluates and exports
    if ranks.main:
        atomic_write_json(out / "config.json", cfg.model_dump(mode="json"))
    started = time.perf_counter()
    d = cfg.data
    cache = d.cache_policy()
    # Rank 0 decodes a large set into the cache once; the other ranks then map it.
    with ranks.main_first(cache is not None):
        data = load_dataset(d.dataset, d.split, d.image_size, d.root, cache=cache)
    auto_k = cfg.cluster.clusters == "auto"
    k = None if auto_k else resolve_clusters(cfg.cluster.clusters, data)
    if cfg.mine.topk >= len(data):
        raise DatasetError(f"the dataset has {len(data)} images, too few for {cfg.mine.topk} neighbours each")
    pretext_data = data
    if d.pretext_split and d.pretext_split != (d.split or "train"):
        with ranks.main_first(cache is not None):
            pretext_data = load_dataset(d.dataset, d.pretext_split, d.image_size or data.image_size, d.root,
                                        cache=cache)
    rt = cfg.runtime
    timings: dict[str, Any] = {}
    # The process's peak resident memory at the end of each step: where it rises, that step set it.
    peaks: dict[str, int | None] = {"load": peak_rss_bytes()}

    summary = run_pretext(cfg.pretext, pretext_data, out / "pretext", rt, sink)
    timings["pretext"] = _stage_timing(summary)
    peaks["pretext"] = peak_rss_bytes()
    summary = run_mine(cfg.mine, data, out / "pretext", out / "mine", rt, sink)
    timings["mine"] = {"seconds": round(summary["seconds_features"] + summary["seconds_search"], 2)}
    mine_summary = summary
    peaks["mine"] = peak_rss_bytes()
    estimate = None
    if auto_k:
        estimate = run_estimate(cfg.estimate, data, out / "pretext", out / "mine", out / "estimate", rt, sink)
        timings["estimate"] = {"seconds": estimate["seconds"]}
        k = int(estimate["clusters"])
        peaks["estimate"] = peak_rss_bytes()
    cluster_cfg = cfg.cluster.model_copy(update={"clusters": k})
    summary = run_cluster(cluster_cfg, data, out / "pretext", out / "mine", out / "cluster", rt, sink)
    timings["cluster"] = _stage_timing(summary)
    peaks["cluster"] = peak_rss_bytes()
    final = out / "cluster"
    selflabel_kept, guard = None, None
    if cfg.selflabel.enabled:
        neighbors = out / "mine" / "neighbors.npy" if cfg.selflabel.guard else None
        summary = run_selflabel(cfg.selflabel, data, out / "cluster", out / "selflabel", rt, sink, neighbors)
        timings["selflabel"] = _stage_timing(summary)
        peaks["selflabel"] = peak_rss_bytes()
        selflabel_kept = summary.get("improved", True)
        guard = {k: summary[k] for k in GUARD_KEYS if k in summary}
        if selflabel_kept:
            final = out / "selflabel"
        else:
            sink.message("selflabel: fewer mined neighbours share a cluster after self-labelling (or a cluster "
                         "shrank), so the clustering model is kept")

    if not ranks.main:
        return {}
    model, meta = load_cluster_model(final)
    spec = InputSpec.model_validate(meta["input"])
    trained = TrainedModel(
        model,
        ModelInfo(
            **spec.model_dump(),
            clusters=k,
            class_names=data.class_names,
            dataset=data.source,
            method=cfg.cluster.method,
        ),
    )
    held_out = held_out_split(d.dataset, d.split, data) if d.eval_split == "auto" else d.eval_split
    # The clustered images' own figures (the model's cluster -> class mapping comes from them); with a
    # held-out split they are kept beside the headline as `train` and files prefixed `train_`.
    # The gallery shows the clustered images, the ones with mined neighbours.
    train_metrics = run_evaluate(trained, data, out, cfg.evaluate, rt, None if held_out else sink,
                                 prefix="train_" if held_out else "", gallery=cfg.evaluate.gallery,
                                 gallery_neighbors=np.load(out / "mine" / "neighbors.npy") if cfg.evaluate.gallery
                                 else None)
    if data.has_labels:
        trained.info.cluster_to_class = train_metrics["cluster_to_class"]
    else:
        trained.info.class_names = None
    if held_out:
        test_data = load_dataset(d.dataset, held_out, d.image_size or data.image_size, d.root, cache=cache)
        metrics = run_evaluate(trained, test_data, out, cfg.evaluate, rt, sink, gallery=False)
        metrics["evaluated_on"] = held_out
        metrics["train"] = {key: train_metrics[key] for key in TRAIN_KEYS if key in train_metrics}
    else:
        metrics = train_metrics
        metrics["evaluated_on"] = "train"
    trained.save(out / "model")
    metrics["neighbor_accuracy"] = mine_summary.get("neighbor_accuracy")
    metrics["processes"] = ranks.world  # trained on this many processes (torchrun ranks)
    metrics["threads"] = torch.get_num_threads()  # CPU threads of each (runtime.threads, or a worker's cap)
    metrics["final_stage"] = final.name
    if estimate is not None:
        metrics["estimated_clusters"] = {key: estimate[key] for key in ("clusters", "criterion", "min_clusters",
                                                                          "max_clusters")}
    metrics["selflabel_kept"] = selflabel_kept
    if guard:
        metrics["selflabel_guard"] = guard
    metrics["timings"] = timings | {"total_seconds": round(time.perf_counter() - started, 2)}
    peaks["evaluate"] = peak_rss_bytes()
    metrics["memory"] = {"peak_rss_bytes": peaks["evaluate"], "peak_rss_bytes_after": peaks}
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
