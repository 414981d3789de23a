"""Baseline: k-means on raw pixels, scored like the pipeline (Hungarian ACC, NMI, ARI).

    python bench/kmeans_pixels.py DATASET [--clusters K] [--seed S]

Prints one JSON line. DATASET is anything `nnm` accepts (a built-in name, a folder or a .zip).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from nnm.engine.data import load_dataset
from nnm.engine.metrics import accuracy_after_matching, match_clusters
from sklearn.cluster import KMeans


def kmeans_pixels(spec: str, clusters: int | None = None, seed: int = 0) -> dict[str, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    data = load_dataset(spec)
    x = data.images.reshape(len(data), -1).numpy().astype(np.float32) / 255.0
    y = data.labels.numpy()
    k = clusters or data.num_classes
    started = time.perf_counter()
    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    mapping = match_clusters(pred, y, k, data.num_classes)
    return {
        "dataset": spec,
        "method": "kmeans-pixels",
        "seed": seed,
        "acc": accuracy_after_matching(pred, y, mapping),
        "nmi": float(normalized_mutual_info_score(y, pred)),
        "ari": float(adjusted_rand_score(y, pred)),
        "seconds": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("--clusters", type=int)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(json.dumps(kmeans_pixels(a.dataset, a.clusters, a.seed)))
