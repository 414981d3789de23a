import itertools

import numpy as np
from nnm.engine.metrics import (
    accuracy_after_matching,
    cluster_summary,
    clustering_metrics,
    confusion_matrix,
    match_clusters,
)
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def brute_force_acc(pred, target, k):
    best = 0.0
    for perm in itertools.permutations(range(k)):
        best = max(best, float((np.array(perm)[pred] == target).mean()))
    return best


def test_hungarian_accuracy_equals_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        k = 5
        target = rng.integers(0, k, 200)
        pred = np.where(rng.random(200) < 0.6, (target + trial) % k, rng.integers(0, k, 200))
        mapping = match_clusters(pred, target, k, k)
        assert np.isclose(accuracy_after_matching(pred, target, mapping), brute_force_acc(pred, target, k))


def test_nmi_ari_match_sklearn_and_are_permutation_invariant():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 4, 300)
    pred = (target + 1) % 4
    pred[:50] = rng.integers(0, 4, 50)
    probs = np.eye(4)[pred]
    m = clustering_metrics(probs, target)
    assert np.isclose(m["nmi"], normalized_mutual_info_score(target, pred))
    assert np.isclose(m["ari"], adjusted_rand_score(target, pred))
    relabelled = clustering_metrics(np.eye(4)[(pred + 2) % 4], target)
    for key in ("acc", "nmi", "ari"):
        assert np.isclose(m[key], relabelled[key])


def test_many_to_one_matching_when_overclustering():
    target = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 2, 2, 3, 3])  # 4 clusters, 2 classes, each cluster pure
    m = clustering_metrics(np.eye(4)[pred], target)
    assert m["matching"] == "many-to-one"
    assert m["acc"] == 1.0
    assert m["cluster_to_class"] == [0, 0, 1, 1]


def test_confusion_matrix_is_normalised_by_true_class_counts():
    # Imbalanced: 3 samples of class 0, 1 of class 1.
    target = np.array([0, 0, 0, 1])
    pred_class = np.array([0, 0, 1, 1])
    cm = confusion_matrix(pred_class, target, 2)
    assert np.allclose(cm, [[2 / 3, 1 / 3], [0.0, 1.0]])
    assert np.allclose(cm.sum(axis=1), 1.0)


def test_top5_and_per_class_accuracy():
    """8 clusters and classes, cluster PERM[c] holds class c. Two clear members per class fix the
    matching; four more images of class 0 have its cluster (3) at rank 2, 5, 6 and 8 of their 8."""
    perm = [3, 7, 0, 5, 1, 6, 2, 4]
    values = [0.30, 0.20, 0.15, 0.12, 0.09, 0.07, 0.04, 0.03]  # probabilities by rank

    def row(first: list[int]) -> list[float]:
        order = first + [k for k in range(8) if k not in first]
        p = [0.0] * 8
        for rank, k in enumerate(order):
            p[k] = values[rank]
        return p

    probs, target = [], []
    for c in range(8):
        for _ in range(2):
            probs.append(row([perm[c]]))
            target.append(c)
    others = [0, 1, 2, 4, 5, 6, 7]  # every cluster but 3
    for shift, rank in enumerate((2, 5, 6, 8)):
        ahead = (others[shift:] + others[:shift])[: rank - 1]  # different top clusters: the matching stays
        probs.append(row([*ahead, 3]))
        target.append(0)
    m = clustering_metrics(np.array(probs), np.array(target))
    assert m["cluster_to_class"] == [perm.index(k) for k in range(8)]
    assert np.isclose(m["acc"], 16 / 20)
    assert np.isclose(m["top5"], 18 / 20)  # the 16 clear ones, and ranks 2 and 5; not 6 or 8
    assert np.isclose(m["per_class_accuracy"]["0"], 2 / 6)
    assert all(m["per_class_accuracy"][str(c)] == 1.0 for c in range(1, 8))


def test_cluster_summary_counts_empty_clusters():
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.3, 0.7, 0.0]])
    s = cluster_summary(probs)
    assert s["cluster_sizes"] == [2, 1, 0]
    assert s["empty_clusters"] == 1
    assert np.isclose(s["cluster_confidence"][0], 0.85)
