import numpy as np
import pytest
import torch
from nnm.engine.errors import DatasetError
from nnm.engine.mining import knn, nearest_other, neighbor_accuracy


def brute_topk(x: torch.Tensor, k: int) -> np.ndarray:
    x = torch.nn.functional.normalize(x, dim=1)
    return (x @ x.t()).topk(k + 1, dim=1).indices.numpy()


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_knn_matches_brute_force(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 32, generator=g)
    idx, sims = knn(x, 10, backend=backend, chunk=64)  # chunk < N exercises the chunked search
    ref = brute_topk(x, 10)
    assert idx.shape == (500, 11)
    assert (idx[:, 0] == np.arange(500)).all()
    assert (np.sort(idx[:, 1:], axis=1) == np.sort(ref[:, 1:], axis=1)).all()
    assert (np.diff(sims[:, 1:], axis=1) <= 1e-6).all()  # sorted by similarity


def test_knn_puts_self_first_with_duplicates():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    idx, _ = knn(x, 2, backend="torch")
    assert (idx[:, 0] == np.arange(4)).all()
    assert idx[0, 1] == 1 and idx[1, 1] == 0
    assert all(i not in row[1:] for i, row in enumerate(idx))


def test_knn_refuses_more_neighbours_than_images():
    with pytest.raises(DatasetError, match="cannot find 5 neighbours among 4 images"):
        knn(torch.randn(4, 3), 5)


def test_neighbor_accuracy_excludes_self():
    neighbors = np.array([[0, 1, 2], [1, 0, 3], [2, 3, 0], [3, 2, 1]])
    labels = np.array([0, 0, 1, 1])
    assert neighbor_accuracy(neighbors, labels, 1) == 1.0
    assert neighbor_accuracy(neighbors, labels, 2) == 0.5


def test_nearest_other_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 8, generator=g)
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    assert (nearest_other(x, chunk=37) == d.argmin(1).numpy()).all()
