"""Device, precision, seeding and small training utilities shared by the stages."""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .config import RuntimeConfig
from .distributed import from_env
from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN can run bf16 natively (AMX or avx512_bf16), where autocast pays off."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "fp32":
        return False
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
    if precision == "bf16" and not supported:
        raise ConfigError(f"precision 'bf16' is not supported on this {device.type}; use fp32 or auto")
    return supported


class Runtime:
    """Resolved runtime: device, autocast and seeding, built once per stage from RuntimeConfig."""

    def __init__(self, cfg: RuntimeConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        #: This process's rank among `torchrun`'s (rank 0 of 1 without it); see `distributed`.
        self.dist = from_env()
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.bf16 = use_bf16(cfg.precision, self.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.channels_last = True
        self.micro_batch = cfg.micro_batch or (256 if self.device.type == "cpu" else 0)
        self.sync_every = cfg.sync_every or (50 if self.device.type == "cuda" else 1)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once

    @property
    def seed(self) -> int:
        return self.cfg.seed

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """Move a uint8 batch to the device (augmentation runs there)."""
        return images.to(self.device, non_blocking=True)

    def resident(self, images: torch.Tensor) -> torch.Tensor:
        """The data set where batches are gathered: on the device when `resident_data` says so (None: a GPU
        with room for it), else where it is."""
        want = self.cfg.resident_data
        if want is None:
            want = self.device.type == "cuda" and images.nbytes < 0.25 * torch.cuda.mem_get_info(self.device)[0]
        return images.to(self.device) if want else images

    def gather(self, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` of a data set from `resident`, on the device (gathered there when it is resident)."""
        if images.device.type == self.device.type:  # one device per process: 'cuda' is 'cuda:0' here
            return images[idx.to(images.device, non_blocking=True)]
        return images[idx.cpu()].to(self.device, non_blocking=True)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward_chunked(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """`fn(x)` computed over chunks of at most `micro_batch` rows and concatenated (with autograd)."""
        if not self.micro_batch or x.shape[0] <= self.micro_batch:
            return fn(x)
        return torch.cat([fn(chunk) for chunk in x.split(self.micro_batch)])

    def seed_all(self, *salt: object) -> None:
        """Seed every global RNG from the run seed and a salt (e.g. the stage name)."""
        s = derive_seed(self.seed, *salt)
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)

    def generator(self, *salt: object) -> torch.Generator:
        """A generator on the device, seeded from the run seed and a salt (stage, epoch)."""
        g = torch.Generator(device=self.device)
        g.manual_seed(derive_seed(self.seed, *salt))
        return g

    def rank_generator(self, shared: torch.Generator, *salt: object) -> torch.Generator:
        """The generator this rank draws its augmentations from: `shared` itself in a single process (so
        one process draws exactly what it always drew), a rank's own one among several."""
        return self.generator(*salt, "rank", self.dist.rank) if self.dist.enabled else shared


def derive_seed(seed: int, *salt: object) -> int:
    """A 63-bit seed from the run seed and any salt, stable across processes and machines."""
    text = "/".join([str(seed), *map(str, salt)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def cosine_lr(base: float, final: float, epoch: int, epochs: int, warmup: int = 0) -> float:
    """Linear warm-up, then cosine decay from `base` to `final` over the remaining epochs."""
    if warmup and epoch < warmup:
        return base * (epoch + 1) / warmup
    span = max(1, epochs - warmup)
    t = min(1.0, (epoch - warmup) / span)
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def shuffled_batches(n: int, batch_size: int, gen: torch.Generator, drop_last: bool = True,
                     limit: int | None = None) -> Iterator[torch.Tensor]:
    """Index batches of a random permutation (CPU indices). A set smaller than one batch is one batch.

    `limit` stops after that many batches: the epoch sees a random share of the set (the same draws as
    without a limit, so a limit above the set's batch count changes nothing)."""
    perm = torch.randperm(n, generator=gen, device=gen.device).cpu()
    bs = min(batch_size, n)
    stop = (n // bs) * bs if drop_last else n
    if limit is not None:
        stop = min(stop, limit * bs)
    for start in range(0, stop, bs):
        yield perm[start : start + bs]


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = True, limit: int | None = None) -> int:
    """The number of batches `shuffled_batches` yields for the same arguments."""
    bs = min(batch_size, n)
    steps = n // bs if drop_last else math.ceil(n / bs)
    return steps if limit is None else min(steps, limit)


def ordered_batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))
