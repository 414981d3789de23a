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
    target = np.array([0, 1, 2, 3, 4, 5, 5])
    probs = np.full((7, 6), 0.01)
    probs[np.arange(7), [0, 1, 2, 3, 4, 5, 0]] = 0.9  # last sample wrong at top-1
    probs[6, 5] = 0.5  # but class 5 is its second choice
    m = clustering_metrics(probs, target)
    assert np.isclose(m["acc"], 6 / 7)
    assert m["top5"] == 1.0
    assert m["per_class_accuracy"]["5"] == 0.5


def test_cluster_summary_counts_empty_clusters():
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.3, 0.7, 0.0]])
    s = cluster_summary(probs)
    assert s["cluster_sizes"] == [2, 1, 0]
    assert s["empty_clusters"] == 1
    assert np.isclose(s["cluster_confidence"][0], 0.85)
