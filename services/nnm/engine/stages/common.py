"""Helpers shared by the training stages."""

from __future__ import annotations

import time

import torch

from ..checkpoint import file_digest
from ..progress import ProgressEvent, ProgressSink, StepTimer

__all__ = ["EpochMeter", "file_digest"]


class EpochMeter:
    """Accumulates one epoch's losses, reports steps to the sink and checks for cancellation."""

    def __init__(self, sink: ProgressSink, stage: str, epoch: int, epochs: int, steps: int):
        self.sink, self.stage, self.epoch, self.epochs, self.steps = sink, stage, epoch, epochs, steps
        self.timer = StepTimer()
        self.sums: dict[str, float] = {}
        self.count = 0
        self.started = time.perf_counter()

    def before_step(self) -> None:
        self.sink.check()

    def after_step(self, step: int, images: int, values: dict[str, float | torch.Tensor]) -> None:
        self.count += 1
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        rate = self.timer.add(images)
        self.sink.update(
            ProgressEvent(
                self.stage,
                self.epoch + 1,
                self.epochs,
                step,
                self.steps,
                loss=float(values.get("loss", 0.0)),
                images_per_s=rate,
            )
        )

    def summary(self) -> dict[str, float]:
        stats = {k: v / max(1, self.count) for k, v in self.sums.items()}
        seconds = time.perf_counter() - self.started
        stats.update(
            epoch=self.epoch + 1, seconds=seconds, images_per_s=self.timer.images / seconds if seconds > 0 else 0.0
        )
        return stats
