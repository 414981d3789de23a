"""Exact top-k neighbours on L2-normalised features (faiss on CPU or GPU, torch as fallback)."""

from __future__ import annotations

import numpy as np
import torch

from .errors import DatasetError


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_search(features: np.ndarray, k: int, chunk: int, use_gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    faiss = _faiss()
    index = faiss.IndexFlatIP(features.shape[1])
    if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(features)
    sims = np.empty((len(features), k), dtype=np.float32)
    idx = np.empty((len(features), k), dtype=np.int64)
    # Query in chunks so the result buffers of one call stay small on very large sets.
    for start in range(0, len(features), chunk):
        s, i = index.search(features[start : start + chunk], k)
        sims[start : start + chunk], idx[start : start + chunk] = s, i
    return sims, idx


def _score_rows(n: int, chunk: int) -> int:
    """Query rows per block so one block of scores stays near 2^26 values (256 MB) at most."""
    return max(1, min(chunk, 2**26 // max(1, n)))


def _torch_search(features: np.ndarray, k: int, chunk: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    base = torch.from_numpy(features).to(device)
    chunk = _score_rows(len(features), chunk)
    sims, idx = [], []
    for start in range(0, len(features), chunk):
        scores = base[start : start + chunk] @ base.t()
        s, i = scores.topk(k, dim=1)
        sims.append(s.cpu())
        idx.append(i.cpu())
    return torch.cat(sims).numpy(), torch.cat(idx).numpy()


def knn(
    features: torch.Tensor | np.ndarray,
    k: int,
    device: torch.device | str = "cpu",
    chunk: int = 16384,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of every row, self included and always in column 0.

    `features` are L2-normalised here, so inner product is cosine similarity. Returns
    (indices (N, k+1) int64, similarities (N, k+1) float32). `backend`: auto | faiss | torch.
    """
    x = torch.as_tensor(features).float()
    n = x.shape[0]
    if k + 1 > n:
        raise DatasetError(f"cannot find {k} neighbours among {n} images; use fewer neighbours (topk < {n})")
    x = torch.nn.functional.normalize(x, dim=1).contiguous().numpy()
    device = torch.device(device)
    # One spare column: with duplicate images, self may not come first and is moved there below.
    kk = min(n, k + 2)
    if backend == "faiss" or (backend == "auto" and _faiss() is not None):
        if _faiss() is None:
            raise DatasetError("faiss is not installed (pip install faiss-cpu)")
        sims, idx = _faiss_search(x, kk, chunk, use_gpu=device.type == "cuda")
    else:
        sims, idx = _torch_search(x, kk, chunk, device)
    return _self_first(idx, sims, k)


def _self_first(idx: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = idx.shape[0]
    rows = np.arange(n)
    out_idx = np.empty((n, k + 1), dtype=np.int64)
    out_sim = np.empty((n, k + 1), dtype=np.float32)
    out_idx[:, 0], out_sim[:, 0] = rows, 1.0
    first = idx[:, 0] == rows  # the usual case: self is the best match
    out_idx[first, 1:], out_sim[first, 1:] = idx[first, 1 : k + 1], sims[first, 1 : k + 1]
    for i in np.nonzero(~first)[0]:  # duplicates tie with self: drop self wherever it is
        others = idx[i] != i
        out_idx[i, 1:] = idx[i, others][:k]
        out_sim[i, 1:] = sims[i, others][:k]
    return out_idx, out_sim


def neighbor_accuracy(neighbors: np.ndarray, labels: np.ndarray, k: int | None = None) -> float:
    """Fraction of the k neighbours (self excluded) that share the anchor's label."""
    nb = neighbors[:, 1 : (k + 1 if k else None)]
    return float((labels[nb] == labels[:, None]).mean())


def nearest_other(features: torch.Tensor, device: torch.device | str = "cpu", chunk: int = 16384) -> np.ndarray:
    """Index of each row's nearest other row by L2 distance on the given features."""
    x = torch.as_tensor(features).float()
    base = x.to(device)
    sq = (base * base).sum(dim=1)
    chunk = _score_rows(len(x), chunk)
    out = []
    for start in range(0, len(x), chunk):
        q = base[start : start + chunk]
        d = sq[start : start + chunk, None] - 2 * q @ base.t() + sq[None, :]
        rows = torch.arange(q.shape[0], device=base.device)
        d[rows, rows + start] = float("inf")
        out.append(d.argmin(dim=1).cpu())
    return torch.cat(out).numpy()
