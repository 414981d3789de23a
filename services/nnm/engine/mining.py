"""Top-k neighbours on L2-normalised features: exact (faiss on CPU or GPU, torch as fallback), or
approximate with a faiss IVF or HNSW index for collections where exact search costs too much.

Memory stays bounded by the set, not by its square: queries go in chunks against the whole index and
each chunk's results are written into the output arrays, so the working memory is the features, the
index (a copy of them, plus HNSW's graph) and one chunk's scores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import DatasetError

if TYPE_CHECKING:
    from .distributed import Distributed


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def unit_rows(features: torch.Tensor) -> np.ndarray:
    """Rows scaled to unit length, as a new float32 array (the caller's features stay as they are)."""
    return torch.nn.functional.normalize(features.float(), dim=1).contiguous().numpy()


def _on_gpu(index: Any, use_gpu: bool) -> Any:
    """`index` moved to the first GPU when asked for and faiss has one; else `index` itself."""
    faiss = _faiss()
    if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def _add(index: Any, features: torch.Tensor, chunk: int) -> None:
    """Add the rows to `index` a normalised chunk at a time (no normalised copy of the whole set)."""
    for start in range(0, len(features), chunk):
        index.add(unit_rows(features[start : start + chunk]))


def _faiss_search(features: torch.Tensor, k: int, chunk: int, use_gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    index = _on_gpu(_faiss().IndexFlatIP(features.shape[1]), use_gpu)
    _add(index, features, chunk)
    return _search(index, features, k, chunk)


def _search(index: Any, features: torch.Tensor, k: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of every row against `index`. Queries go in chunks, each normalised on its own: no
    normalised copy of the whole set is kept beside the index (memory: the features, the index, the
    results and one chunk)."""
    sims = np.empty((len(features), k), dtype=np.float32)
    idx = np.empty((len(features), k), dtype=np.int64)
    for start in range(0, len(features), chunk):
        s, i = index.search(unit_rows(features[start : start + chunk]), k)
        sims[start : start + chunk], idx[start : start + chunk] = s, i
    return sims, idx


def _approximate_index(features: torch.Tensor, kind: str, params: dict[str, int], use_gpu: bool,
                       chunk: int = 65536) -> Any:
    """A faiss IVF or HNSW inner-product index over the unit-length `features`, built and ready to search
    (added a normalised chunk at a time)."""
    faiss = _faiss()
    n, d = features.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params.get("hnsw_m", 32), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, 2 * params.get("hnsw_m", 32))
        _add(index, features, chunk)
        index.hnsw.efSearch = params.get("ef_search", 128)
        return index
    lists = params.get("ivf_lists") or ivf_lists_for(n)
    quantizer = faiss.IndexFlatIP(d)
    index = _on_gpu(faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_INNER_PRODUCT), use_gpu)
    if hasattr(index, "cp"):
        index.cp.niter = 10
    index.train(unit_rows(features[torch.as_tensor(_training_rows(n, lists))]))
    _add(index, features, chunk)
    index.nprobe = min(lists, params.get("ivf_probe", 32))
    return index


def _training_rows(n: int, lists: int) -> np.ndarray:
    """Rows an IVF quantizer's k-means is trained on: a sample of 40 a list (just above faiss' minimum of
    39), with 10 iterations set by the caller: the lists only have to partition the space, and training
    stays cheap on a CPU."""
    if n <= 40 * lists:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, 40 * lists, replace=False))


def ivf_lists_for(n: int) -> int:
    """Inverted lists of an IVF index over n points: about 4 sqrt(n), as faiss suggests."""
    return max(1, min(n // 39, int(4 * np.sqrt(n))))


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row's exact neighbours (self excluded) that the approximate search found."""
    hits = [len(set(a[1:]) & set(e[1:])) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits) / max(1, exact.shape[1] - 1))


def exact_rows(features: torch.Tensor | np.ndarray, rows: np.ndarray, k: int, block: int = 65536) -> np.ndarray:
    """Exact top-k neighbours (self first) of the given rows only: the reference an approximate index's
    recall is measured against, without an exact search of every row. The set is read a block at a
    time (no normalised copy of it), merging each block's best into the running top-k."""
    x = torch.as_tensor(features)
    query_rows = torch.as_tensor(rows)
    q = torch.nn.functional.normalize(x[query_rows].float(), dim=1)
    best_s = torch.full((len(rows), k + 1), -float("inf"))
    best_i = torch.zeros((len(rows), k + 1), dtype=torch.int64)
    for start in range(0, len(x), block):
        scores = q @ torch.nn.functional.normalize(x[start : start + block].float(), dim=1).t()
        mine = (query_rows >= start) & (query_rows < start + scores.shape[1])
        scores[mine.nonzero().squeeze(1), query_rows[mine] - start] = float("inf")  # self first
        s, i = scores.topk(min(k + 1, scores.shape[1]), dim=1)
        merged_s, order = torch.cat([best_s, s], dim=1).topk(k + 1, dim=1)
        best_i = torch.cat([best_i, i + start], dim=1).gather(1, order)
        best_s = merged_s
    return best_i.numpy()


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
    index: str = "exact",
    index_params: dict[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product top-k of every row, self included and always in column 0.

    `features` are L2-normalised here, so inner product is cosine similarity. Returns
    (indices (N, k+1) int64, similarities (N, k+1) float32). `backend`: auto | faiss | torch.
    `index`: exact, or ivf / hnsw (faiss; approximate, for large sets) with `index_params`
    (ivf_lists, ivf_probe, hnsw_m, ef_search).
    """
    x = torch.as_tensor(features)  # no copy of a float32 array or tensor: chunks are normalised as used
    n = x.shape[0]
    if k + 1 > n:
        raise DatasetError(f"cannot find {k} neighbours among {n} images; use fewer neighbours (topk < {n})")
    device = torch.device(device)
    # One spare column: with duplicate images, self may not come first and is moved there below.
    kk = min(n, k + 2)
    if index != "exact":
        if _faiss() is None:
            raise DatasetError(f"the {index} index needs faiss (pip install faiss-cpu)")
        built = _approximate_index(x, index, index_params or {}, use_gpu=device.type == "cuda")
        sims, idx = _search(built, x, kk, chunk)
        # An approximate search can come back short (-1) for a row: fill with the row itself, which
        # _self_first drops like a duplicate.
        short = idx < 0
        if short.any():
            rows = np.broadcast_to(np.arange(n)[:, None], idx.shape)
            idx[short], sims[short] = rows[short], -np.inf
        return _self_first(idx, sims, k)
    if backend == "faiss" or (backend == "auto" and _faiss() is not None):
        if _faiss() is None:
            raise DatasetError("faiss is not installed (pip install faiss-cpu)")
        sims, idx = _faiss_search(x, kk, chunk, use_gpu=device.type == "cuda")
    else:
        sims, idx = _torch_search(unit_rows(x), kk, chunk, device)
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


#: Rows from which `nearest_other(index="auto")` uses an IVF index: exact search costs N^2 d (measured on
#: a 2-core AVX2 CPU, 512-d: 48 s at 50,000 rows, so about 13 minutes at 200,000 and 5 hours at a
#: million), and the global memory asks for it after every epoch.
NEAREST_EXACT_MAX = 200_000


def nearest_index_for(n: int, index: str) -> str:
    """The search `nearest_other(index=index)` makes over n rows: exact or ivf (auto resolved)."""
    if index == "auto":
        return "ivf" if n >= NEAREST_EXACT_MAX and _faiss() is not None else "exact"
    return index


def nearest_other(features: torch.Tensor, device: torch.device | str = "cpu", chunk: int = 16384,
                  index: str = "exact", probe: int = 16, rows: tuple[int, int] | None = None,
                  ranks: Distributed | None = None) -> np.ndarray:
    """Index of each row's nearest other row by L2 distance on the given features.

    `index`: exact (blocked: one chunk of distances at a time), ivf (approximate: a faiss IVF index of
    8-bit scalar-quantised rows, `probe` lists searched per query), or auto (ivf from
    `NEAREST_EXACT_MAX` rows when faiss is installed). `rows` = (start, stop) answers only those rows
    (still searched against all of them). `ranks` (the ranks of a distributed job, each holding all the
    features) answers this rank's block `ranks.rows(n)`, and the ranks build an IVF index together.
    """
    n = len(features)
    if ranks is not None and ranks.enabled:
        rows = ranks.rows(n)
    else:
        ranks = None
    lo, hi = rows if rows is not None else (0, n)
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"rows {rows} outside 0..{n}")
    index = nearest_index_for(n, index)
    if index == "ivf" and n > 2:
        return _nearest_other_ivf(torch.as_tensor(features), probe, chunk, lo, hi, ranks)
    x = torch.as_tensor(features).float()
    base = x.to(device)
    sq = (base * base).sum(dim=1)
    chunk = _score_rows(len(x), chunk)
    out = [torch.empty(0, dtype=torch.long)]
    for start in range(lo, hi, chunk):
        stop = min(start + chunk, hi)
        # In place: one block of scores alive at a time, not four temporaries of its size.
        d = (base[start:stop] @ base.t()).mul_(-2).add_(sq[None, :]).add_(sq[start:stop, None])
        own = torch.arange(stop - start, device=base.device)
        d[own, own + start] = float("inf")
        out.append(d.argmin(dim=1).cpu())
    return torch.cat(out).numpy()


def _nearest_other_ivf(x: torch.Tensor, probe: int, chunk: int, lo: int, hi: int,
                       ranks: Distributed | None = None) -> np.ndarray:
    """`nearest_other` of rows [lo, hi) with an IVF-SQ8 L2 index of all rows: each row's two best
    matches, self dropped. Rows the index answers with fewer than one other row are searched exactly.

    With `ranks`, [lo, hi) is this rank's block: rank 0 trains the quantizer, each rank encodes its own
    block, and every rank merges the blocks in rank order, the order one process adds the rows in, so
    the index (and the answer) is one process's, built once instead of once per rank."""
    faiss = _faiss()
    if faiss is None:
        raise DatasetError("the ivf index needs faiss (pip install faiss-cpu)")
    x = x.detach().cpu()
    n, d = x.shape
    lists = ivf_lists_for(n)

    def float32(rows: torch.Tensor) -> np.ndarray:
        return rows.float().contiguous().numpy()

    def trained() -> Any:
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, lists, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_L2)
        index.cp.niter = 10
        index.train(float32(x[torch.as_tensor(_training_rows(n, lists))]))
        return index

    if ranks is None:
        index = trained()
        for start in range(0, n, chunk):
            index.add(float32(x[start : start + chunk]))
    else:
        block = faiss.deserialize_index(ranks.share(lambda: faiss.serialize_index(trained())))
        for start in range(lo, hi, chunk):
            stop = min(start + chunk, hi)
            block.add_with_ids(float32(x[start:stop]), np.arange(start, stop, dtype=np.int64))
        parts = ranks.all_objects(faiss.serialize_index(block))
        del block
        index = faiss.deserialize_index(parts[0])
        for i in range(1, len(parts)):
            index.merge_from(faiss.deserialize_index(parts[i]), 0)  # ids kept: each block carries its own
            parts[i] = None
    index.nprobe = min(lists, probe)
    out = np.empty(hi - lo, dtype=np.int64)
    for start in range(lo, hi, chunk):
        _, found = index.search(float32(x[start : min(start + chunk, hi)]), 2)
        own = np.arange(start, start + len(found))
        # Self is usually first; with duplicates (or quantisation ties) it may come second or not at all.
        out[start - lo : start - lo + len(found)] = np.where(found[:, 0] == own, found[:, 1], found[:, 0])
    for i in np.nonzero((out < 0) | (out == np.arange(lo, hi)))[0]:
        out[i] = _nearest_exact(x, lo + i, chunk)
    return out


def _nearest_exact(x: torch.Tensor, row: int, chunk: int) -> int:
    """Row `row`'s nearest other row by exact L2, in float32 a chunk at a time (`x` may be float16:
    no float32 copy of the whole set is made)."""
    q = x[row].float()
    best, best_at = float("inf"), -1
    for start in range(0, len(x), chunk):
        dist = ((x[start : start + chunk].float() - q) ** 2).sum(dim=1)
        if start <= row < start + len(dist):
            dist[row - start] = float("inf")
        at = int(dist.argmin())
        if float(dist[at]) < best:
            best, best_at = float(dist[at]), start + at
    return best_at
