"""Training on several processes with torch.distributed (started by `torchrun`), one device each.

Every stage keeps its single-process schedule: the same shuffled global batches (one generator seeded
from the run seed, shared by all ranks), of which rank r takes rows r, r + W, r + 2W, ... Each rank
runs its rows through the DistributedDataParallel model, the outputs are gathered across ranks with
their gradients, and every rank computes the loss of the whole global batch (NT-Xent with the global
batch's negatives, as SimCLR trains; the SCAN/NNM batch entropy and in-batch matching over the global
batch). With DDP's gradient averaging that is the gradient of the global batch's loss. Batch norm
statistics are synchronised across ranks (SyncBatchNorm on GPUs; `GlooSyncBatchNorm` on CPUs, where
PyTorch's has no kernel). Only rank 0 writes checkpoints and outputs, and they hold the plain model, so
a run resumes on any number of processes.

What differs from one process: each rank draws its own augmentations (its own generator), so two
processes do not repeat one process's random numbers, only its distribution.
"""

from __future__ import annotations

import atexit
import datetime as dt
import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

T = TypeVar("T")

#: How long a rank waits for the others at a collective (rank 0 mining a large set, say) before failing.
TIMEOUT = dt.timedelta(hours=4)


@dataclass(frozen=True)
class Distributed:
    """This process's place among the ranks of a run (one rank and world size 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this rank writes outputs and reports progress."""
        return self.rank == 0

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch."""
        return idx[self.rank :: self.world] if self.enabled else idx

    def order(self, idx: torch.Tensor) -> torch.Tensor:
        """The global batch in the order `gather` returns its rows (rank 0's rows, then rank 1's, ...)."""
        if not self.enabled:
            return idx
        return torch.cat([idx[r :: self.world] for r in range(self.world)])

    def shard_of_ordered(self, ordered: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a batch already in `order` (they lie together there)."""
        if not self.enabled:
            return ordered
        sizes = [len(range(r, len(ordered), self.world)) for r in range(self.world)]
        start = sum(sizes[: self.rank])
        return ordered[start : start + sizes[self.rank]]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` concatenated along rows, with gradients flowing back to each rank's part.

        Ranks may hold different numbers of rows (a global batch that does not divide evenly).
        """
        if not self.enabled:
            return x
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
        counts = [int(s) for s in sizes]
        most = max(counts)
        padded = F.pad(x, (0,) * (2 * (x.dim() - 1)) + (0, most - x.shape[0])) if x.shape[0] < most else x
        parts = _AllGather.apply(padded.contiguous())
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])

    def rows(self, n: int) -> tuple[int, int]:
        """This rank's block [start, stop) of n rows, for passes over a whole set split between ranks."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's block of a whole-set pass (`rows`), concatenated in order on `x`'s device; no
        gradients. NCCL gathers on the GPU, so CPU tensors make the trip there and back."""
        if not self.enabled:
            return x
        device = x.device
        if dist.get_backend() == "nccl" and device.type != "cuda":
            x = x.to("cuda")
        with torch.no_grad():
            out = self.gather(x)
        return out.to(device)

    def sum(self, value: float) -> float:
        """`value` summed over the ranks (a count, say)."""
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextmanager
    def main_first(self, needed: bool = True) -> Iterator[None]:
        """Rank 0 runs the body first, then the other ranks do: rank 0 writes what they reuse (a data
        set's decoded-image cache, say). If rank 0's body fails, the others are released all the same.
        With `needed` False every rank runs it at once."""
        ordered = needed and self.enabled
        if ordered and not self.main:
            self.barrier()
        try:
            yield
        finally:
            if ordered and self.main:
                self.barrier()

    def agree(self, value: bool) -> bool:
        """Rank 0's `value` on every rank (a decision all ranks must take alike)."""
        return bool(self.share(lambda: value))

    def share(self, make: Callable[[], T]) -> T:
        """`make()` run on rank 0 alone and its result handed to every rank (a decoded set's traits, a
        trained index): one rank does the work. If `make` raises, every rank raises it."""
        if not self.enabled:
            return make()
        box: list[Any] = [None]
        if self.main:
            try:
                box = [(True, make())]
            except Exception as exc:
                box = [(False, exc if _picklable(exc) else RuntimeError(f"{type(exc).__name__}: {exc}"))]
        dist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def all_objects(self, obj: T) -> list[T]:
        """Every rank's picklable `obj`, in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sync_batchnorm(self, model: nn.Module, device: torch.device) -> nn.Module:
        """`model` with batch norm over the global batch (unchanged alone). Call it before making the
        optimizer: the layers are replaced."""
        if not self.enabled:
            return model
        if device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return GlooSyncBatchNorm.convert(model)

    def ddp(self, module: nn.Module, device: torch.device) -> nn.Module:
        """`module` in DistributedDataParallel (itself alone). Train through what this returns and save
        the module inside: checkpoints then hold the plain model."""
        if not self.enabled:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)


class _AllGather(torch.autograd.Function):
    """Every rank's tensor stacked (world, ...); the gradient of each rank's part goes back to it, summed
    over the ranks (each rank's loss uses every part)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


class _AllReduce(torch.autograd.Function):
    """The sum over ranks, whose gradient is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _picklable(obj: object) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # any failure to pickle means "send a plain error instead"
        return False
    return True


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def from_env() -> Distributed:
    """The ranks `torchrun` describes in the environment; joins their process group on first use."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Distributed()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and os.environ.get("NNM_DIST_BACKEND", "") != "gloo"
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        if not cuda:
            atexit.register(leave_process_group)
    return Distributed(rank, world, local)


def leave_process_group() -> None:
    """Destroy the process group if this process joined one (registered at exit for gloo).

    Left to interpreter shutdown, gloo's worker threads can still hold work (and its tensors) while
    Python is torn down, and the process dies of SIGABRT ("terminate called without an active
    exception", pytorch/pytorch#190489), most often on a loaded machine. Destroying a gloo group is
    local to the process, so it is safe at exit even when another rank has failed; NCCL's destroy can
    wait on the other ranks, so it is not registered for it.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """Batch norm whose training statistics are those of the whole global batch, on any device.

    The per-channel sums and sums of squares are all-reduced with autograd, so the gradient is that of
    batch norm over the global batch. Running statistics are updated as BatchNorm2d does (unbiased
    variance), identically on every rank.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        local = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)),
                           xf.new_tensor([x.numel() / c])])
        total = _AllReduce.apply(local)
        count = total[-1]
        mean = total[:c] / count
        var = (total[c : 2 * c] / count - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * (count / (count - 1).clamp_min(1))
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """`module` with every BatchNorm2d replaced by this class, weights and statistics kept."""
        if isinstance(module, nn.BatchNorm2d) and not isinstance(module, cls):
            new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            new.load_state_dict(module.state_dict())
            new.to(device=module.weight.device if module.affine else None)
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module
