"""Helpers shared by the training stages."""

from __future__ import annotations

import time

import torch

from ..checkpoint import file_digest
from ..progress import ProgressEvent, ProgressSink, StepTimer

__all__ = ["EpochMeter", "file_digest"]


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
