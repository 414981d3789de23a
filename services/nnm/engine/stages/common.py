"""Helpers shared by the training stages."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..checkpoint import StageDir, file_digest
from ..errors import CheckpointError
from ..progress import ProgressEvent, ProgressSink, StepTimer
from ..runtime import Runtime

__all__ = ["Chunked", "EpochMeter", "file_digest", "finished", "stage_end", "wait_for_main"]


class Chunked(torch.nn.Module):
    """`module` run over micro-batches (`Runtime.forward_chunked`) as one module, so that DDP wraps the
    whole step's forward pass."""

    def __init__(self, module: torch.nn.Module, rt: Runtime):
        super().__init__()
        self.module = module
        self.rt = rt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rt.forward_chunked(self.module, x)


def finished(stage: StageDir, rt: Runtime) -> dict[str, Any] | None:
    """The stage's completion summary when it already finished, else None: rank 0 decides for all ranks
    (a rank that looked later could see the marker rank 0 is about to write, and skip the collectives)."""
    done = stage.completed() if rt.dist.main else None
    if not rt.dist.agree(done is not None):
        return None
    return done if rt.dist.main else stage.completed()


def stage_end(rt: Runtime) -> None:
    """Every rank waits here until rank 0 has written the stage's outputs (the next stage reads them)."""
    rt.dist.barrier()


def wait_for_main(stage: StageDir, rt: Runtime) -> dict[str, Any]:
    """On a rank other than 0, for a stage only rank 0 runs: wait for it, then read its summary."""
    rt.dist.barrier()
    done = stage.completed()
    if done is None:
        raise CheckpointError(f"rank 0 did not finish the {stage.stage} stage in {stage.path}")
    return done


class EpochMeter:
    """Accumulates one epoch's losses, reports steps to the sink and checks for cancellation.

    Loss values may be device tensors: with `sync_every` > 1 they are summed on the device and read back
    once per epoch, and the progress events carry the loss of every `sync_every`-th step (a read waits
    for the GPU to finish its queued work; it costs nothing on a CPU).
    """

    def __init__(self, sink: ProgressSink, stage: str, epoch: int, epochs: int, steps: int, sync_every: int = 1):
        self.sink, self.stage, self.epoch, self.epochs, self.steps = sink, stage, epoch, epochs, steps
        self.sync_every = sync_every
        self.timer = StepTimer()
        self.sums: dict[str, float | torch.Tensor] = {}
        self.count = 0
        self.last_loss: float | None = None
        self.started = time.perf_counter()

    def before_step(self) -> None:
        self.sink.check()

    def after_step(self, step: int, images: int, values: dict[str, float | torch.Tensor]) -> None:
        self.count += 1
        deferred = self.sync_every > 1
        for key, value in values.items():
            if deferred and isinstance(value, torch.Tensor):
                self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
            else:
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
        if "loss" in values and (not deferred or step % self.sync_every == 0 or step == self.steps):
            self.last_loss = float(values["loss"])
        rate = self.timer.add(images)
        self.sink.update(
            ProgressEvent(
                self.stage,
                self.epoch + 1,
                self.epochs,
                step,
                self.steps,
                loss=self.last_loss if "loss" in values else 0.0,
                images_per_s=rate,
            )
        )

    def summary(self) -> dict[str, float]:
        stats = {k: float(v) / max(1, self.count) for k, v in self.sums.items()}
        seconds = time.perf_counter() - self.started
        stats.update(
            epoch=self.epoch + 1, seconds=seconds, images_per_s=self.timer.images / seconds if seconds > 0 else 0.0
        )
        return stats
