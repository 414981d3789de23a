"""Estimating the number of clusters without labels.

Three criteria, computed from what the pipeline already has after mining (the pretext features and the
mined k-nearest-neighbour graph):

- `modularity`: k-means on the features for every candidate K, each partition scored by its modularity
  on the mined graph (the share of neighbour pairs inside clusters minus the share expected by chance
  given the clusters' degrees). It asks the question SCAN's loss asks: do an image's mined neighbours
  fall in its own cluster, more than chance would put them there?
- `silhouette`: the same k-means partitions, scored by the mean silhouette of a sample of features.
- `eigengap`: the spectrum of the normalised Laplacian of the mined graph. A graph made of K loosely
  joined groups has K eigenvalues near 0 and then a jump; the estimate is the K after which the jump is
  largest. It needs no k-means, but on real features the spectrum rises smoothly and the largest jump
  lands elsewhere (docs/benchmarks.md, "Estimating the number of clusters").

The modularity and silhouette scores come with their standard error under resampling of the images.
Near the top their curves are flat and the highest point moves from seed to seed, so the estimate is
the smallest K whose score is within a few standard errors of the highest (CART's and the gap
statistic's "one standard error" rule, with two: `choose_k`); a fixed tolerance can be set instead.
The error shrinks as the set grows, which a fixed tolerance cannot do (docs/benchmarks.md,
"Estimating the number of clusters").

Each returns its whole curve over K, so a person can see how clear the choice was.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError, DatasetError


@dataclass
class KEstimate:
    """The estimated number of clusters and the criterion's value for every candidate K."""

    k: int
    criterion: str
    #: Candidate K -> criterion value (higher is better for both criteria).
    curve: dict[int, float]
    #: Extra figures worth keeping (e.g. the Laplacian's eigenvalues).
    details: dict[str, list[float]] = field(default_factory=dict)
    #: The highest-scoring K, which `k` is not when a tolerance preferred a smaller one.
    best_scoring: int | None = None
    #: Candidate K -> standard error of its value under resampling of the images (not for eigengap).
    standard_error: dict[int, float] | None = None
    #: How far below the highest value the chosen K was allowed to score.
    tolerance: float = 0.0


def parsimonious(curve: dict[int, float], tolerance: float) -> tuple[int, int]:
    """(chosen K, highest-scoring K): the smallest K whose value is within `tolerance` of the highest.

    Near its top the curve is often flat (digits: 0.7840 at K = 11, 0.7820 at 10), and there the highest
    point is noise; the smallest K that scores about as well is the plainer explanation of the data.
    """
    best = max(curve, key=lambda kk: (curve[kk], -kk))
    return min(kk for kk, v in curve.items() if v >= curve[best] - tolerance), best


def choose_k(
    curve: dict[int, float], standard_error: dict[int, float], tolerance: float | None, standard_errors: float = 2.0
) -> tuple[int, int, float]:
    """(chosen K, highest-scoring K, tolerance used): `parsimonious` with a fixed `tolerance`, or, when it
    is None, with `standard_errors` times the highest-scoring K's standard error."""
    best = max(curve, key=lambda kk: (curve[kk], -kk))
    tol = float(tolerance) if tolerance is not None else standard_errors * standard_error[best]
    chosen, best = parsimonious(curve, tol)
    return chosen, best, tol


def knn_graph(neighbors: np.ndarray, k: int | None = None):
    """Symmetric 0/1 adjacency (scipy CSR) of the mined graph: i~j when either lists the other.

    `neighbors` is (N, 1+topk) with each row's own index in column 0 (as `mining.knn` returns);
    `k` keeps only the first k neighbours of each row (None: all).
    """
    from scipy import sparse

    nb = neighbors[:, 1 : (k + 1 if k else None)]
    n = neighbors.shape[0]
    rows = np.repeat(np.arange(n), nb.shape[1])
    cols = nb.reshape(-1)
    keep = cols != rows  # duplicates may list one another, never themselves
    adj = sparse.csr_matrix((np.ones(int(keep.sum()), dtype=np.float64), (rows[keep], cols[keep])), shape=(n, n))
    adj = adj.maximum(adj.T)
    return adj.tocsr()


def laplacian_spectrum(neighbors: np.ndarray, count: int, k: int | None = None, seed: int = 0) -> np.ndarray:
    """The `count` smallest eigenvalues (ascending) of the graph's normalised Laplacian I - D^-1/2 A D^-1/2.

    The graph's spectrum is the union of its connected components' spectra, so each component is solved
    on its own: a graph of several components has a zero eigenvalue per component, a repeated eigenvalue
    that Lanczos iterations on the whole graph miss (measured: 6 of 8 found).
    """
    from scipy.sparse.csgraph import connected_components

    adj = knn_graph(neighbors, k)
    count = min(count, adj.shape[0] - 1)
    _, labels = connected_components(adj, directed=False)
    parts = [_component_spectrum(adj, np.flatnonzero(labels == c), count, seed) for c in np.unique(labels)]
    return np.sort(np.concatenate(parts))[:count]


def _component_spectrum(adj, members: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Up to `count` smallest normalised-Laplacian eigenvalues of one connected component."""
    from scipy import sparse
    from scipy.sparse.linalg import eigsh

    sub = adj[members][:, members]
    n = len(members)
    degree = np.asarray(sub.sum(axis=1)).ravel()
    inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, 1e-12))
    norm_adj = sparse.diags(inv_sqrt) @ sub @ sparse.diags(inv_sqrt)
    if n <= max(2000, 2 * count):  # small components: a dense solve is exact and quick
        eig = np.linalg.eigvalsh(norm_adj.toarray())[::-1][:count]
    else:
        # The largest eigenvalues of the normalised adjacency are 1 minus the smallest of the Laplacian;
        # Lanczos finds the largest ones without a factorisation. A fixed start vector keeps it repeatable.
        start = np.random.default_rng(seed).standard_normal(n)
        eig = eigsh(norm_adj, k=count, which="LA", v0=start, tol=1e-6, return_eigenvectors=False)
    return np.clip(1.0 - np.asarray(eig), 0.0, 2.0)


def eigengap_estimate(
    neighbors: np.ndarray, k_min: int = 2, k_max: int = 50, k: int | None = None, seed: int = 0
) -> KEstimate:
    """K in [k_min, k_max] after which the Laplacian's spectrum jumps most: gap(K) = lambda_{K+1} - lambda_K."""
    _check_range(k_min, k_max, neighbors.shape[0])
    lam = laplacian_spectrum(neighbors, k_max + 1, k, seed)
    # lam[K] is the (K+1)-th smallest eigenvalue (0-based index K).
    curve = {kk: float(lam[kk] - lam[kk - 1]) for kk in range(k_min, min(k_max, len(lam) - 1) + 1)}
    best, _ = parsimonious(curve, 0.0)  # no tolerance: gaps are not on one scale across data sets
    return KEstimate(best, "eigengap", curve, {"eigenvalues": [float(v) for v in lam]}, best_scoring=best)


def kmeans_partitions(
    features: np.ndarray, ks: range, seed: int = 0, fit_sample: int = 20000, n_init: int = 3
) -> Iterator[tuple[int, np.ndarray]]:
    """(K, labels) for every K in `ks`: spherical-ish k-means (on L2-normalised features).

    k-means is fitted on at most `fit_sample` images and then assigns all of them, so its cost stays
    bounded on large sets.
    """
    from sklearn.cluster import KMeans

    x = normalized(features)
    rng = np.random.default_rng(seed)
    fit = x if len(x) <= fit_sample else x[rng.choice(len(x), size=fit_sample, replace=False)]
    for k in ks:
        model = KMeans(k, n_init=n_init, random_state=seed, max_iter=100).fit(fit)
        yield k, model.labels_ if fit is x else model.predict(x)


def normalized(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32."""
    x = np.asarray(features, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def modularity_with_error(adj, labels: np.ndarray) -> tuple[float, float]:
    """Newman's modularity of a partition of the graph `adj` (scipy sparse, symmetric, 0/1), and its
    standard error under resampling of the nodes.

    Q = A / T - sum_c (D_c / T)^2, with A the edge ends that lie inside their own cluster, T all edge ends
    and D_c the edge ends of cluster c. The error is the delta method's: each node's first-order effect on
    Q (its influence z_i, which sum to zero) gives sqrt(n) * std(z). Nodes share edges, which this ignores;
    on sets drawn afresh from one distribution it came within a factor of two of Q's real spread
    (tests/test_estimate.py).
    """
    rows, cols = adj.nonzero()
    degree = np.asarray(adj.sum(axis=1)).ravel()
    total = degree.sum()
    inside = np.bincount(rows, weights=(labels[rows] == labels[cols]).astype(np.float64), minlength=len(labels))
    per_cluster = np.bincount(labels, weights=degree, minlength=int(labels.max()) + 1) / total
    share_inside, chance = inside.sum() / total, float((per_cluster**2).sum())
    # dQ/d(node i): its ends inside, less what it changes in A/T's denominator and in the chance term.
    z = (inside - degree * share_inside - 2 * degree * per_cluster[labels] + 2 * degree * chance) / total
    error = float(np.sqrt(len(z)) * z.std(ddof=1)) if len(z) > 1 else 0.0
    return float(share_inside - chance), error


def modularity(adj, labels: np.ndarray) -> float:
    """Newman's modularity of a partition of the graph `adj` (scipy sparse, symmetric, 0/1)."""
    return modularity_with_error(adj, labels)[0]


def modularity_estimate(
    features: np.ndarray, neighbors: np.ndarray, k_min: int = 2, k_max: int = 50, k: int | None = None,
    seed: int = 0, partitions: dict[int, np.ndarray] | None = None, tolerance: float | None = 0.0,
    standard_errors: float = 2.0,
) -> KEstimate:
    """K in [k_min, k_max] whose k-means partition of the features has the highest modularity on the mined graph
    (the smallest K within `tolerance` of it; with `tolerance` None, within `standard_errors` standard
    errors of it: `choose_k`).

    `partitions` (K -> labels from `kmeans_partitions`) saves refitting when several criteria score one set.
    """
    _check_range(k_min, k_max, len(features))
    if len(features) != neighbors.shape[0]:
        raise ValueError("features and neighbours cover different numbers of images")
    adj = knn_graph(neighbors, k)
    ks = range(k_min, k_max + 1)
    parts = partitions.items() if partitions is not None else kmeans_partitions(features, ks, seed)
    curve, errors = {}, {}
    for kk, labels in parts:
        if kk in ks:
            curve[kk], errors[kk] = modularity_with_error(adj, labels)
    chosen, best, tol = choose_k(curve, errors, tolerance, standard_errors)
    return KEstimate(chosen, "modularity", curve, best_scoring=best, standard_error=errors, tolerance=tol)


def silhouette_estimate(
    features: np.ndarray, k_min: int = 2, k_max: int = 50, sample: int = 4000, seed: int = 0,
    partitions: dict[int, np.ndarray] | None = None, tolerance: float | None = 0.0, standard_errors: float = 2.0,
) -> KEstimate:
    """K in [k_min, k_max] whose k-means partition of the L2-normalised features has the best silhouette
    (the smallest K within `tolerance`, or `standard_errors` standard errors, of it, as for modularity).

    `partitions` as for `modularity_estimate`.
    """
    from sklearn.metrics import silhouette_samples

    _check_range(k_min, k_max, len(features))
    x = normalized(features)
    scored = np.random.default_rng(seed).choice(len(x), size=min(sample, len(x)), replace=False)
    ks = range(k_min, k_max + 1)
    curve, errors = {}, {}
    for kk, labels in partitions.items() if partitions is not None else kmeans_partitions(x, ks, seed):
        if kk not in ks:
            continue
        if len(np.unique(labels[scored])) < 2:
            curve[kk], errors[kk] = -1.0, 0.0
            continue
        values = silhouette_samples(x[scored], labels[scored], metric="euclidean")
        curve[kk], errors[kk] = float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))
    chosen, best, tol = choose_k(curve, errors, tolerance, standard_errors)
    return KEstimate(chosen, "silhouette", curve, best_scoring=best, standard_error=errors, tolerance=tol)


def _check_range(k_min: int, k_max: int, n: int) -> None:
    if not 2 <= k_min <= k_max:
        raise ConfigError(f"the range of clusters to consider must satisfy 2 <= min <= max, got {k_min}..{k_max}")
    if k_max + 1 >= n:
        raise DatasetError(f"the dataset has {n} images, too few to consider up to {k_max} clusters")
