"""Clustering metrics: Hungarian / many-to-one accuracy, NMI, ARI, top-5, per-class accuracy."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def contingency(pred: np.ndarray, target: np.ndarray, clusters: int, classes: int) -> np.ndarray:
    """counts[k, c] = number of samples in cluster k with class c."""
    counts = np.zeros((clusters, classes), dtype=np.int64)
    np.add.at(counts, (pred, target), 1)
    return counts


def match_clusters(pred: np.ndarray, target: np.ndarray, clusters: int, classes: int) -> np.ndarray:
    """Map every cluster to a class.

    With clusters <= classes: the one-to-one Hungarian matching that maximises agreement (unmatched
    classes get no cluster). With more clusters than classes: each cluster goes to its majority class
    (many-to-one), since a one-to-one matching would leave clusters without a class.
    """
    counts = contingency(pred, target, clusters, classes)
    if clusters > classes:
        return counts.argmax(axis=1)
    rows, cols = linear_sum_assignment(-counts)
    mapping = np.full(clusters, -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def accuracy_after_matching(pred: np.ndarray, target: np.ndarray, mapping: np.ndarray) -> float:
    return float((mapping[pred] == target).mean())


def top5_accuracy(probs: np.ndarray, target: np.ndarray, mapping: np.ndarray) -> float:
    """Fraction of samples whose class is among the classes of their 5 most likely clusters."""
    k = min(5, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    return float((mapping[top] == target[:, None]).any(axis=1).mean())


def confusion_matrix(pred_class: np.ndarray, target: np.ndarray, classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class; each row divided by that class's count."""
    counts = np.zeros((classes, classes), dtype=np.float64)
    valid = pred_class >= 0
    np.add.at(counts, (target[valid], pred_class[valid]), 1)
    totals = np.bincount(target, minlength=classes).astype(np.float64)
    return counts / np.maximum(totals, 1)[:, None]


def clustering_metrics(probs: np.ndarray, target: np.ndarray, class_names: list[str] | None = None) -> dict[str, Any]:
    """All metrics for predictions `probs` (N, K) against labels `target` (N,)."""
    pred = probs.argmax(axis=1)
    clusters = probs.shape[1]
    classes = int(max(target.max() + 1, len(class_names) if class_names else 0))
    mapping = match_clusters(pred, target, clusters, classes)
    pred_class = mapping[pred]
    cm = confusion_matrix(pred_class, target, classes)
    names = class_names or [str(c) for c in range(classes)]
    return {
        "acc": accuracy_after_matching(pred, target, mapping),
        "nmi": float(normalized_mutual_info_score(target, pred)),
        "ari": float(adjusted_rand_score(target, pred)),
        "top5": top5_accuracy(probs, target, mapping),
        "matching": "many-to-one" if clusters > classes else "hungarian",
        "cluster_to_class": mapping.tolist(),
        "per_class_accuracy": {names[c]: float(cm[c, c]) for c in range(classes)},
        "confusion_matrix": cm.tolist(),
        "class_names": names,
        "num_samples": len(target),
    }


def sizes_and_confidence(pred: np.ndarray, conf: np.ndarray, k: int) -> tuple[np.ndarray, list[float]]:
    """Images per cluster and their mean confidence (0.0 for an empty cluster)."""
    sizes = np.bincount(pred, minlength=k)
    totals = np.bincount(pred, weights=conf.astype(np.float64), minlength=k)
    return sizes, [float(totals[c] / sizes[c]) if sizes[c] else 0.0 for c in range(k)]


def cluster_summary(probs: np.ndarray) -> dict[str, Any]:
    """Label-free summary: cluster sizes and mean confidence per cluster."""
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    k = probs.shape[1]
    sizes, mean_conf = sizes_and_confidence(pred, conf, k)
    return {
        "num_clusters": int(k),
        "cluster_sizes": sizes.tolist(),
        "cluster_confidence": mean_conf,
        "mean_confidence": float(conf.mean()),
        "empty_clusters": int((sizes == 0).sum()),
    }
