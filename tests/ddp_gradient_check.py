"""Run by tests/test_distributed_training.py under `torchrun --nproc-per-node 2`: one SimCLR step and one
SCAN step on a global batch split over the ranks, with the engine's DDP helpers, against the same step in
one process on the whole batch; and NNM's nearest-other search answered by blocks of rows, one per rank,
then gathered, against the whole search (exact, and through an IVF index the ranks build together); and
`share`, rank 0's result or error on every rank; and that the exit handlers leave the process group.
Rank 0 writes what it found into argv[1].
"""

from __future__ import annotations

import atexit
import copy
import json
import sys

import torch
import torch.distributed as dist
from nnm.engine.config import BackboneConfig
from nnm.engine.distributed import Distributed, from_env, unwrap
from nnm.engine.errors import DatasetError
from nnm.engine.losses import nt_xent, scan_loss
from nnm.engine.mining import nearest_other
from nnm.engine.models import ClusteringModel, ContrastiveModel, build_backbone
from test_mining import clustered  # this script's directory, tests/, is first on the path


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in unwrap(model).named_parameters() if p.grad is not None}


def step(kind: str, model: torch.nn.Module, ranks, x: torch.Tensor, y: torch.Tensor) -> None:
    """One forward/backward: `x` and `y` are this process's rows of the two views (anchor, neighbour)."""
    if kind == "simclr":
        z = model(torch.cat([x, y]))
        loss = nt_xent(ranks.gather(z[: len(x)]), ranks.gather(z[len(x) :]), 0.5)
    else:
        _, logits = model(torch.cat([x, y]))
        lg = logits[0]
        loss = scan_loss(ranks.gather(lg[: len(x)]), ranks.gather(lg[len(x) :]), 2.0)["total"]
    loss.backward()


def main(out: str) -> None:
    torch.set_num_threads(1)
    ranks = from_env()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(13, 1, 12, 12, generator=gen)  # a global batch of 13: 7 rows on rank 0, 6 on rank 1
    y = x + 0.1 * torch.randn(13, 1, 12, 12, generator=gen)
    idx = torch.arange(13)
    ordered = ranks.order(idx)  # the rows in the order the gathered outputs come back
    results = {}
    for kind in ("simclr", "scan"):
        torch.manual_seed(1)
        backbone = build_backbone(BackboneConfig(width=4), 1)
        plain = ContrastiveModel(backbone, 16) if kind == "simclr" else ClusteringModel(backbone, 4)
        reference = copy.deepcopy(plain)
        model = ranks.ddp(ranks.sync_batchnorm(plain, torch.device("cpu")), torch.device("cpu"))
        mine = ranks.shard(idx)
        step(kind, model, ranks, x[mine], y[mine])
        if ranks.main:
            # One process, the whole batch in the gathered order, plain batch norm.
            step(kind, reference, Distributed(), x[ordered], y[ordered])
            got, want = grads(model), grads(reference)
            assert got.keys() == want.keys(), (got.keys() ^ want.keys())
            results[kind] = {"max_abs_diff": max(float((got[k] - want[k]).abs().max()) for k in want),
                             "max_abs_grad": max(float(want[k].abs().max()) for k in want),
                             "params": len(want)}
    # The cluster stage's global memory: each rank searches its block of rows against all of them.
    feats = torch.randn(301, 16, generator=torch.Generator().manual_seed(2))
    lo, hi = ranks.rows(len(feats))
    gathered = ranks.gather_rows(torch.from_numpy(nearest_other(feats, chunk=64, rows=(lo, hi))))
    if ranks.main:
        whole = torch.from_numpy(nearest_other(feats))
        results["nearest_other"] = {"rows": [lo, hi], "equal": bool(torch.equal(gathered, whole)),
                                    "dtype": str(gathered.dtype), "n": len(gathered)}
    # Its IVF index, built by the ranks together (rank 0 trains, each encodes its block): one process's.
    many = clustered(6000, 32, 40, seed=3)
    together = ranks.gather_rows(torch.from_numpy(nearest_other(many, index="ivf", chunk=1000, ranks=ranks)))
    if ranks.main:
        alone = torch.from_numpy(nearest_other(many, index="ivf", chunk=1000))
        results["nearest_other_ivf"] = {"equal": bool(torch.equal(together, alone)), "n": len(together),
                                        "self": int((together == torch.arange(6000)).sum())}
    # `share`: rank 0 alone runs the call; every rank receives its result, or raises its error.
    calls: list[int] = []
    got = ranks.share(lambda: calls.append(1) or 10 + ranks.rank)
    try:
        ranks.share(lambda: (_ for _ in ()).throw(DatasetError("no such data set")))
        error = None
    except DatasetError as exc:
        error = str(exc)
    results["share"] = ranks.all_objects({"calls": len(calls), "got": got, "error": error})
    ranks.barrier()
    # What runs at exit leaves the gloo group, so interpreter shutdown does not abort on its threads.
    atexit._run_exitfuncs()
    results["left_group_at_exit"] = not dist.is_initialized()
    if ranks.main:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
