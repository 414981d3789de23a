"""Progress reporting and cooperative cancellation.

Stages report to a `ProgressSink`. The CLI shows tqdm bars; the service records progress in its job
store and answers `should_stop()` from a cancel flag. A stage checks `should_stop()` at every batch
boundary and raises `Cancelled`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from .errors import Cancelled


@dataclass
class ProgressEvent:
    """Where a stage is. `epoch` counts from 1; `step` is the step within the epoch."""

    stage: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float | None = None
    images_per_s: float | None = None

    @property
    def fraction(self) -> float:
        done = (self.epoch - 1) * self.steps + self.step
        return min(1.0, done / max(1, self.epochs * self.steps))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fraction"] = self.fraction
        return d


class ProgressSink:
    """No-op sink; subclasses override what they need."""

    def stage_started(self, stage: str, epochs: int, steps: int) -> None:
        """A stage begins (or resumes) with this many epochs of this many steps."""

    def update(self, event: ProgressEvent) -> None:
        """Called after each training step."""

    def epoch_finished(self, stage: str, epoch: int, stats: dict[str, float]) -> None:
        """Called after each epoch with its mean statistics."""

    def stage_finished(self, stage: str, summary: dict[str, Any]) -> None:
        """A stage completed and wrote its outputs."""

    def message(self, text: str) -> None:
        """A one-line note for the user."""

    def should_stop(self) -> bool:
        """True when the run should stop at the next batch boundary."""
        return False

    def check(self) -> None:
        """Raise Cancelled if the run should stop."""
        if self.should_stop():
            raise Cancelled()


class TqdmSink(ProgressSink):
    """Progress bars on stderr: epoch, loss, images/s and ETA per stage.

    Where the stream is no terminal (a log file, `docker logs`), bars would write a carriage-return
    line per refresh; there it prints one plain line per epoch instead.
    """

    def __init__(self, stream: Any = None, enabled: bool = True, lines: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        isatty = getattr(self.stream, "isatty", None)
        self.lines = (not (isatty and isatty())) if lines is None else lines
        self._bar: Any = None

    def epoch_finished(self, stage: str, epoch: int, stats: dict[str, float]) -> None:
        if not (self.enabled and self.lines):
            return
        timing = ("epoch", "seconds", "images_per_s")
        shown = " ".join(f"{k}={v:.4g}" for k, v in stats.items() if k not in timing and isinstance(v, float))
        speed = f"{stats.get('seconds', 0.0):.1f} s, {stats.get('images_per_s', 0.0):.0f} images/s"
        print(f"{stage} epoch {epoch}: {speed} {shown}", file=self.stream, flush=True)

    def stage_started(self, stage: str, epochs: int, steps: int) -> None:
        if not self.enabled or self.lines:
            return
        from tqdm import tqdm

        self._close()
        self._bar = tqdm(
            total=epochs * steps,
            desc=f"{stage:>9}",
            file=self.stream,
            unit="step",
            dynamic_ncols=True,
            leave=True,
            mininterval=0.5,
        )

    def update(self, event: ProgressEvent) -> None:
        if self._bar is None:
            return
        done = (event.epoch - 1) * event.steps + event.step
        self._bar.n = done
        post = {"epoch": f"{event.epoch}/{event.epochs}"}
        if event.loss is not None:
            post["loss"] = f"{event.loss:.4f}"
        if event.images_per_s:
            post["img/s"] = f"{event.images_per_s:.0f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.refresh()

    def stage_finished(self, stage: str, summary: dict[str, Any]) -> None:
        self._close()

    def message(self, text: str) -> None:
        self._close()
        print(text, file=self.stream, flush=True)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class StepTimer:
    """Images/s over a sliding window of steps."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.images = 0

    def add(self, n: int) -> float:
        self.images += n
        elapsed = time.perf_counter() - self.start
        return self.images / elapsed if elapsed > 0 else 0.0


__all__ = ["Cancelled", "ProgressEvent", "ProgressSink", "StepTimer", "TqdmSink"]
