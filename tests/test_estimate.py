"""Estimating the number of clusters: the criteria on data whose number of groups is known, and the stage."""

import json

import numpy as np
import pytest
from nnm.engine.config import EstimateConfig, PipelineConfig
from nnm.engine.data import ImageSet
from nnm.engine.errors import CheckpointError, ConfigError, DatasetError
from nnm.engine.estimate import (
    choose_k,
    eigengap_estimate,
    kmeans_partitions,
    knn_graph,
    laplacian_spectrum,
    modularity,
    modularity_estimate,
    modularity_with_error,
    parsimonious,
    silhouette_estimate,
)
from nnm.engine.mining import knn
from nnm.engine.stages.estimate import candidate_range
from PIL import Image


def blobs(groups: int, per_group: int, dim: int = 32, spread: float = 0.15, seed: int = 0) -> np.ndarray:
    """Points around `groups` random unit directions: `groups` well separated clusters on the sphere."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((groups, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.repeat(centres, per_group, axis=0) + spread * rng.standard_normal((groups * per_group, dim)) / np.sqrt(dim)
    return x.astype(np.float32)


@pytest.mark.parametrize("groups", [3, 7, 12])
def test_eigengap_finds_the_number_of_groups(groups):
    neighbors, _ = knn(blobs(groups, 60, seed=groups), 10)
    est = eigengap_estimate(neighbors, 2, 30)
    assert est.k == groups
    assert est.criterion == "eigengap"
    assert sorted(est.curve) == list(range(2, 31))
    # The curve's best value is the chosen K's, and it stands well above the rest.
    others = [v for k, v in est.curve.items() if k != groups]
    assert est.curve[groups] == max(est.curve.values()) and est.curve[groups] > 3 * max(others)


def test_eigengap_on_a_large_graph_uses_the_sparse_solver_and_agrees():
    # 8 components of 300 nodes each (solved densely), then the same groups joined by a few edges into
    # one connected graph of 2,400 nodes (above the dense solver's limit: Lanczos).
    neighbors, _ = knn(blobs(8, 300, seed=1), 10)
    est = eigengap_estimate(neighbors, 2, 20)
    assert est.k == 8
    rng = np.random.default_rng(0)
    bridged = neighbors.copy()
    rows = rng.choice(len(bridged), 40, replace=False)
    bridged[rows, -1] = rng.choice(len(bridged), 40)
    from scipy.sparse.csgraph import connected_components

    assert connected_components(knn_graph(bridged), directed=False)[0] == 1
    est = eigengap_estimate(bridged, 2, 20)
    assert est.k == 8
    lam = np.asarray(est.details["eigenvalues"])
    assert len(lam) == 21 and np.all(np.diff(lam) >= -1e-9)  # ascending
    assert lam[:8].max() < 0.05 < lam[8]  # eight nearly disconnected groups, then the jump


def test_spectrum_of_disconnected_groups_has_one_zero_per_group():
    # Two groups of 5 images whose neighbours never leave their group: exactly two zero eigenvalues.
    groups = [range(0, 5), range(5, 10)]
    nb = np.array([[i, *[j for j in g if j != i][:3]] for g in groups for i in g])
    lam = laplacian_spectrum(nb, 4)
    assert np.allclose(lam[:2], 0, atol=1e-9) and lam[2] > 0.5
    adj = knn_graph(nb)
    assert (adj != adj.T).nnz == 0 and adj.diagonal().sum() == 0


def test_graph_neighbours_can_be_fewer_than_mined():
    nb, _ = knn(blobs(4, 30), 10)
    assert knn_graph(nb, 3).nnz < knn_graph(nb).nnz


def test_silhouette_finds_the_number_of_groups():
    est = silhouette_estimate(blobs(5, 80, seed=3), 2, 12, sample=400)
    assert est.k == 5 and est.criterion == "silhouette"
    assert est.curve[5] == max(est.curve.values())


def test_modularity_finds_the_number_of_groups_on_the_mined_graph():
    x = blobs(6, 70, seed=4)
    nb, _ = knn(x, 10)
    est = modularity_estimate(x, nb, 2, 15)
    assert est.k == 6 and est.criterion == "modularity" and sorted(est.curve) == list(range(2, 16))
    # Splitting a group or merging two costs modularity: the curve peaks at 6.
    assert est.curve[6] > est.curve[5] and est.curve[6] > est.curve[7]


def test_a_tolerance_prefers_the_smallest_k_that_scores_about_as_well():
    # digits seed 0's modularity near its top (2026-11-28): highest at 12, 10 within 0.006 of it.
    curve = {9: 0.7559, 10: 0.7660, 11: 0.7700, 12: 0.7718, 13: 0.7590}
    assert parsimonious(curve, 0.0) == (12, 12)
    assert parsimonious(curve, 0.002) == (11, 12)
    assert parsimonious(curve, 0.01) == (10, 12)
    assert parsimonious(curve, 1.0) == (9, 12)
    # On the blobs: a tolerance just over what splitting one group costs still finds the 6 groups at
    # 0; past what merging two costs it takes 5, and says 6 scored highest.
    x = blobs(6, 70, seed=4)
    nb, _ = knn(x, 10)
    plain = modularity_estimate(x, nb, 2, 15)
    merged = plain.curve[6] - plain.curve[5]
    assert plain.k == plain.best_scoring == 6
    assert modularity_estimate(x, nb, 2, 15, tolerance=merged / 2).k == 6
    wide = modularity_estimate(x, nb, 2, 15, tolerance=merged * 1.01)
    assert wide.k == 5 and wide.best_scoring == 6 and wide.curve == pytest.approx(plain.curve)
    assert silhouette_estimate(x, 2, 15, sample=400, tolerance=1.0).k == 2


def test_modularity_error_is_the_spread_over_fresh_samples():
    """The standard error of modularity, computed from one sample, predicts how much the value moves
    between samples drawn afresh from the same distribution (the partition: the true groups)."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 16))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(n: int, spread: float, seed: int) -> tuple[float, float]:
        r = np.random.default_rng(100 + seed)
        groups = r.integers(0, 4, n)
        x = (centres[groups] + spread * r.standard_normal((n, 16)) / 4).astype(np.float32)
        nb, _ = knn(x, 10)
        adj = knn_graph(nb)
        q, err = modularity_with_error(adj, groups)
        # Q itself, from its definition: neighbour pairs inside a group less the degree-share product.
        rows, cols = adj.nonzero()
        share = np.bincount(groups, weights=np.asarray(adj.sum(axis=1)).ravel()) / len(rows)
        assert q == pytest.approx(np.mean(groups[rows] == groups[cols]) - (share**2).sum())
        return q, err

    errors = {}
    for spread in (0.5, 1.0):
        values, errs = zip(*(draw(300, spread, s) for s in range(30)), strict=True)
        # Measured: ratio 1.3 (tight groups) and 0.65 (overlapping ones).
        assert 0.5 < np.mean(errs) / np.std(values, ddof=1) < 2.0
        errors[spread] = np.mean(errs)
    assert errors[1.0] > errors[0.5]  # groups that overlap give a noisier score
    # Four times the images: the error falls by about half (here more, as the graph gets denser).
    assert np.mean([draw(1200, 1.0, s)[1] for s in range(5)]) < errors[1.0] / 1.8


def test_the_estimate_is_the_smallest_k_within_two_standard_errors_of_the_best():
    # digits seed 1 (2026-11-29): highest at 12, 11 behind by 0.0051, with standard error 0.0050 at 12.
    curve = {9: 0.7452, 10: 0.7497, 11: 0.7597, 12: 0.7648, 13: 0.7561}
    errors = dict.fromkeys(curve, 0.0050)
    assert choose_k(curve, errors, None, 2.0) == (11, 12, pytest.approx(0.0100))
    assert choose_k(curve, errors, None, 1.0)[:2] == (12, 12)
    assert choose_k(curve, errors, 0.018) == (10, 12, 0.018)  # a fixed tolerance overrides the errors
    assert EstimateConfig().tolerance is None and EstimateConfig().standard_errors == 2.0
    # On the blobs the rule keeps the 6 groups and says what tolerance it came to.
    x = blobs(6, 70, seed=4)
    nb, _ = knn(x, 10)
    est = modularity_estimate(x, nb, 2, 15, tolerance=None)
    assert est.k == est.best_scoring == 6 and sorted(est.standard_error) == list(range(2, 16))
    assert est.tolerance == pytest.approx(2 * est.standard_error[6]) and 0 < est.tolerance < 0.05
    sil = silhouette_estimate(x, 2, 15, sample=400, tolerance=None)
    assert sil.k == 6 and sil.tolerance == pytest.approx(2 * sil.standard_error[6]) and sil.tolerance > 0


def test_criteria_can_share_one_set_of_partitions():
    """Partitions fitted once (as the benchmark does) give each criterion the curve it computes alone,
    restricted to its own range."""
    x = blobs(6, 70, seed=4)
    nb, _ = knn(x, 10)
    parts = dict(kmeans_partitions(x, range(2, 16), seed=0))
    alone = modularity_estimate(x, nb, 2, 15)
    shared = modularity_estimate(x, nb, 3, 12, partitions=parts)
    assert sorted(shared.curve) == list(range(3, 13))
    assert all(shared.curve[k] == pytest.approx(alone.curve[k]) for k in shared.curve)
    sil = silhouette_estimate(x, 2, 15, sample=400, partitions=parts)
    assert sil.curve == pytest.approx(silhouette_estimate(x, 2, 15, sample=400).curve) and sil.k == 6


def test_modularity_values():
    # Two triangles joined by one edge: the natural split scores 5/14, putting everything in one cluster 0.
    edges = [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5), (2, 3)]
    from scipy import sparse

    a = sparse.coo_matrix((np.ones(len(edges)), tuple(np.array(edges).T)), shape=(6, 6)).tocsr()
    a = a.maximum(a.T)
    assert modularity(a, np.array([0, 0, 0, 1, 1, 1])) == pytest.approx(5 / 14)
    assert modularity(a, np.zeros(6, dtype=int)) == pytest.approx(0.0)
    assert modularity(a, np.array([0, 1, 0, 1, 0, 1])) < 0


def test_ranges_are_checked():
    nb, _ = knn(blobs(3, 10), 5)
    with pytest.raises(ConfigError, match="2 <= min <= max"):
        eigengap_estimate(nb, 5, 4)
    with pytest.raises(DatasetError, match="too few"):
        eigengap_estimate(nb, 2, 40)
    with pytest.raises(ValueError, match="min_clusters"):
        EstimateConfig(min_clusters=10, max_clusters=5)
    # The stage searches at most n // 2 clusters, and says so when even the minimum does not fit.
    assert candidate_range(EstimateConfig(), 60) == (2, 30)
    assert candidate_range(EstimateConfig(), 10_000) == (2, 50)
    with pytest.raises(DatasetError, match="too few to look for at least 8"):
        candidate_range(EstimateConfig(min_clusters=8), 15)


def test_clusters_setting_takes_a_number_or_auto():
    base = {"data": {"dataset": "digits"}}
    assert PipelineConfig.model_validate(base | {"cluster": {"clusters": "auto"}}).cluster.clusters == "auto"
    assert PipelineConfig.model_validate(base | {"cluster": {"clusters": 7}}).cluster.clusters == 7
    for bad in (1, "seven", "Auto", 2.5):
        with pytest.raises(ValueError):
            PipelineConfig.model_validate(base | {"cluster": {"clusters": bad}})
    with pytest.raises(ValueError, match="graph_neighbors"):
        PipelineConfig.model_validate(base | {"estimate": {"graph_neighbors": 30}, "mine": {"topk": 20}})


def test_estimate_stage_writes_its_curve_and_resumes(tmp_path):
    """The stage on a tiny set whose 'mined' neighbours form 4 groups: estimate.json, curve.png, done."""
    import torch
    from nnm.engine.config import RuntimeConfig
    from nnm.engine.stages.estimate import run_estimate

    n = 4 * 25
    images = torch.randint(0, 255, (n, 1, 8, 8), dtype=torch.uint8)
    data = ImageSet(images, None, None, [f"img{i}" for i in range(n)], "tiny")
    nb, _ = knn(blobs(4, 25, seed=5), 8)
    (tmp_path / "mine").mkdir()
    np.save(tmp_path / "mine" / "neighbors.npy", nb)
    (tmp_path / "pretext").mkdir()
    (tmp_path / "pretext" / "model.pt").write_bytes(b"any model")  # fingerprinted, not read by eigengap
    out = tmp_path / "estimate"
    pre, mine = tmp_path / "pretext", tmp_path / "mine"
    summary = run_estimate(EstimateConfig(criterion="eigengap", max_clusters=20), data, pre, mine, out, RuntimeConfig())
    assert summary["clusters"] == 4 and summary["max_clusters"] == 20 and "num_classes" not in summary
    saved = json.loads((out / "estimate.json").read_text())
    assert saved["clusters"] == 4 and set(saved["curve"]) == {str(k) for k in range(2, 21)}
    assert saved["best_scoring"] == 4 and saved["tolerance"] is None  # the eigengap takes no tolerance
    with Image.open(out / "curve.png") as im:
        assert im.size[0] > 300
    assert (out / "done.json").exists()
    # Done: a second call returns the recorded summary and writes nothing; other settings are refused.
    written = (out / "estimate.json").stat().st_mtime_ns
    again = run_estimate(EstimateConfig(criterion="eigengap", max_clusters=20), data, pre, mine, out, RuntimeConfig())
    assert again == summary and (out / "estimate.json").stat().st_mtime_ns == written
    with pytest.raises(Exception, match="other settings"):
        run_estimate(EstimateConfig(criterion="eigengap", max_clusters=10), data, pre, mine, out, RuntimeConfig())
    # The partition criteria score features in the space the neighbours were mined in, read from the
    # mine stage's record; without one the stage says so rather than guessing.
    with pytest.raises(CheckpointError, match="left no record of its feature"):
        run_estimate(EstimateConfig(max_clusters=20), data, pre, mine, tmp_path / "other", RuntimeConfig())
