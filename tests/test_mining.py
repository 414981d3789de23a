import numpy as np
import pytest
import torch
from nnm.engine.errors import DatasetError
from nnm.engine.mining import exact_rows, knn, nearest_other, neighbor_accuracy, recall_at_k


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
    # Blocks of rows (one per rank of a distributed job) put together give the whole answer.
    blocks = [nearest_other(x, chunk=37, rows=(lo, hi)) for lo, hi in [(0, 100), (100, 100), (100, 300)]]
    assert [len(b) for b in blocks] == [100, 0, 200]
    assert (np.concatenate(blocks) == d.argmin(1).numpy()).all()
    with pytest.raises(ValueError, match="outside"):
        nearest_other(x, rows=(200, 301))


def clustered(n: int, d: int, centers: int, seed: int = 0) -> torch.Tensor:
    """Points around random centres: features with the structure an approximate index relies on."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=g)
    return c[torch.randint(centers, (n,), generator=g)] + 0.35 * torch.randn(n, d, generator=g)


def test_nearest_other_through_an_ivf_index_finds_close_rows_and_never_self(monkeypatch):
    x = clustered(6000, 32, 40, seed=5)
    x[100] = x[200]  # a duplicate: its nearest other row is its twin, at distance 0
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    exact = d.argmin(1).numpy()
    approx = nearest_other(x, index="ivf", chunk=1000)
    rows = np.arange(len(x))
    assert approx.shape == (6000,) and (approx != rows).all() and approx.min() >= 0 and approx.max() < 6000
    assert approx[100] == 200 and approx[200] == 100
    halves = [nearest_other(x, index="ivf", chunk=1000, rows=r) for r in [(0, 150), (150, 6000)]]
    assert (np.concatenate(halves) == approx).all()
    # Approximate: most rows get the exact answer, and the others a row barely farther away.
    assert (approx == exact).mean() >= 0.9
    ratio = d[rows, approx] / d[rows, exact].clamp_min(1e-6)
    assert float(ratio.median()) == 1.0 and float(ratio.quantile(0.99)) < 1.2
    # auto: exact below the threshold, the IVF index from it.
    assert (nearest_other(x, index="auto") == exact).all()
    monkeypatch.setattr("nnm.engine.mining.NEAREST_EXACT_MAX", 5000)
    assert (nearest_other(x, index="auto", chunk=1000) == approx).all()


@pytest.mark.parametrize("index, params", [("ivf", {"ivf_probe": 8}), ("hnsw", {"hnsw_m": 16, "ef_search": 64})])
def test_approximate_index_finds_most_exact_neighbours(index, params):
    x = clustered(4000, 32, 40)
    exact, _ = knn(x, 20)
    approx, sims = knn(x, 20, index=index, index_params=params, chunk=500)
    assert approx.shape == (4000, 21) and (approx[:, 0] == np.arange(4000)).all()
    assert all(i not in row[1:] for i, row in enumerate(approx))
    assert recall_at_k(approx, exact) >= 0.9
    assert (np.diff(sims[:, 1:], axis=1) <= 1e-6).all()
    # Fewer probes find less: the knob does what it says.
    if index == "ivf":
        coarse, _ = knn(x, 20, index="ivf", index_params={"ivf_probe": 1, "ivf_lists": 64})
        assert recall_at_k(coarse, exact) < recall_at_k(approx, exact)


def test_recall_and_exact_rows_agree_with_brute_force():
    x = clustered(1500, 16, 10, seed=1)
    rows = np.array([0, 7, 1499, 300])
    ref = brute_topk(x, 12)[rows]
    got = exact_rows(x, rows, 12, block=100)  # blocks < N exercise the running merge
    assert (got[:, 0] == rows).all()
    assert (np.sort(got[:, 1:], axis=1) == np.sort(ref[:, 1:], axis=1)).all()
    assert recall_at_k(got, ref) == 1.0
    half = got.copy()
    half[:, 7:] = -1  # 5 of 12 neighbours lost
    assert abs(recall_at_k(half, ref) - 6 / 12) < 1e-9


def test_mine_stage_reports_the_index_recall(tmp_path):
    """`mine.index = ivf` on real digits: neighbours close to exact search's, recall in metrics.json."""
    from nnm.engine.config import MineConfig, PretextConfig, RuntimeConfig
    from nnm.engine.data import load_dataset
    from nnm.engine.stages import run_mine, run_pretext

    data = load_dataset("digits")
    rt = RuntimeConfig(seed=0)
    run_pretext(PretextConfig(epochs=1, batch_size=128, backbone={"arch": "resnet18-cifar", "width": 8}), data,
                tmp_path / "pretext", rt)
    # Backbone features: after one epoch the contrastive head's outputs can be all but equal (on an AVX2-only
    # CPU in fp32 their spread was 1e-4), and among ties any index's neighbours are as right as exact ones.
    exact = run_mine(MineConfig(topk=10, feature="backbone"), data, tmp_path / "pretext", tmp_path / "exact", rt)
    approx = run_mine(MineConfig(topk=10, feature="backbone", index="ivf", ivf_probe=4), data, tmp_path / "pretext",
                      tmp_path / "ivf", rt)
    assert exact["index"] == "exact" and "recall_at_topk" not in exact
    assert approx["index"] == "ivf" and 0.5 <= approx["recall_at_topk"] <= 1.0
    a, e = np.load(tmp_path / "ivf" / "neighbors.npy"), np.load(tmp_path / "exact" / "neighbors.npy")
    assert abs(recall_at_k(a, e) - approx["recall_at_topk"]) < 0.1  # the 1,000-row sample estimates the whole


def test_float16_features_give_the_ivf_search_the_float32_answer_and_the_exact_fallback_its_own():
    """The cluster stage hands an IVF search float16 features (8-bit codes cannot tell them apart); the
    exact search of a row the index leaves unanswered runs in float32 a chunk at a time."""
    from nnm.engine.mining import _nearest_exact

    x = clustered(6000, 32, 40, seed=7)
    half = x.half()
    d = torch.cdist(half.float(), half.float())
    d.fill_diagonal_(float("inf"))
    exact = d.argmin(1).numpy()
    wide, narrow = nearest_other(x, index="ivf", chunk=1000), nearest_other(half, index="ivf", chunk=1000)
    # Not bit-equal (the quantizer is trained on rounded rows), and as good: as many exact answers, and
    # the others barely farther.
    assert (narrow == wide).mean() >= 0.97 and (narrow != np.arange(6000)).all()
    assert (narrow == exact).mean() >= (wide == exact).mean() - 0.01
    ratio = d[np.arange(6000), narrow] / d[np.arange(6000), exact].clamp_min(1e-6)
    assert float(ratio.quantile(0.99)) < 1.2
    for row in [0, 999, 1000, 5999]:  # chunk borders: the row's own distance is skipped wherever it falls
        assert _nearest_exact(half, row, chunk=1000) == int(d[row].argmin())
