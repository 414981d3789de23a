"""Concurrent assign requests share forward passes.

A request of one image costs a whole forward pass when it runs alone, so 50 clients posting one image
each got about 60 requests/s while one request of 256 images ran at 4,000 images/s. Requests decode
their images on their own threads, then queue the pixels here; one inference thread takes what has
queued for a model (after a short collection window when little has) as one batch, and hands each
request its rows. The queue is bounded in images: past it, requests are refused at once (503 with
Retry-After) instead of waiting behind minutes of work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from nnm.engine.config import RuntimeConfig
from nnm.engine.model_io import TrainedModel
from nnm.engine.runtime import Runtime


class Overloaded(Exception):
    """More images wait for the model than the queue holds; retry shortly."""


@dataclass
class _Request:
    key: str
    model: TrainedModel
    pixels: np.ndarray
    future: asyncio.Future


@dataclass
class BatcherStats:
    """Counters since start: batches run, images and requests classified, requests refused."""

    batches: int = 0
    images: int = 0
    requests: int = 0
    refused: int = 0


class AssignBatcher:
    """Classifies uint8 image batches for many concurrent requests in shared forward passes.

    `window_s`: how long the inference thread waits for more requests when fewer than `max_batch`
    images are queued (requests that arrive while a batch runs join the next one without waiting).
    `max_queued_images`: images queued or being classified, beyond which `classify` raises Overloaded
    (a single request larger than that is still taken when nothing else waits).
    """

    def __init__(self, window_s: float = 0.002, max_batch: int = 256, max_queued_images: int = 4096,
                 runtime: RuntimeConfig | None = None):
        self.window_s, self.max_batch, self.max_queued_images = window_s, max_batch, max_queued_images
        self.stats = BatcherStats()
        self._runtime = Runtime(runtime or RuntimeConfig(device="cpu"))
        self._queue: deque[_Request] = deque()
        self._queued_images = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="nnm-assign")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def classify(self, key: str, model: TrainedModel, pixels: np.ndarray) -> np.ndarray:
        """Cluster probabilities (N, K) of `pixels` (N, C, S, S uint8) under `model` (cached as `key`)."""
        n = len(pixels)
        if n == 0:
            return np.zeros((0, model.info.clusters), np.float32)
        if self._queued_images and self._queued_images + n > self.max_queued_images:
            self.stats.refused += 1
            raise Overloaded(f"{self._queued_images} images are already waiting to be classified "
                             f"(the queue holds {self.max_queued_images}); retry shortly")
        loop = asyncio.get_running_loop()
        self._start(loop)
        request = _Request(key, model, pixels, loop.create_future())
        self._queue.append(request)
        self._queued_images += n
        assert self._wakeup is not None
        self._wakeup.set()
        return await request.future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop and self._task is not None and not self._task.done():
            return
        # First use, or a new event loop (a test client per test): the old loop's task is gone with it.
        self._loop, self._wakeup = loop, asyncio.Event()
        self._task = loop.create_task(self._run(), name="nnm-assign-batcher")

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.window_s > 0 and self._queued_images < self.max_batch:
                await asyncio.sleep(self.window_s)
            batch = self._take()
            live = [r for r in batch if not r.future.done()]  # a client that went away was cancelled
            try:
                if live:
                    probs = await loop.run_in_executor(self._executor, self._predict, live)
            except Exception as exc:  # the model failed: every request of the batch gets the error
                for r in live:
                    if not r.future.done():
                        r.future.set_exception(exc)
            else:
                if live:
                    self.stats.batches += 1
                    start = 0
                    for r in live:
                        rows = probs[start : start + len(r.pixels)]
                        start += len(r.pixels)
                        if not r.future.done():
                            r.future.set_result(rows)
                            self.stats.requests += 1
                            self.stats.images += len(rows)
            finally:
                self._queued_images -= sum(len(r.pixels) for r in batch)

    def _take(self) -> list[_Request]:
        """The oldest request and those after it for the same model, up to `max_batch` images."""
        first = self._queue.popleft()
        batch, images, keep = [first], len(first.pixels), deque()
        while self._queue:
            r = self._queue.popleft()
            if r.key == first.key and images + len(r.pixels) <= self.max_batch:
                batch.append(r)
                images += len(r.pixels)
            else:
                keep.append(r)
        self._queue.extendleft(reversed(keep))
        return batch

    def _predict(self, batch: list[_Request]) -> np.ndarray:
        pixels = batch[0].pixels if len(batch) == 1 else np.concatenate([r.pixels for r in batch])
        probs, _ = batch[0].model.predict(torch.from_numpy(pixels), self._runtime, self.max_batch)
        return probs

    async def aclose(self) -> None:
        """Stop the inference loop; requests still queued get Overloaded."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._task
        while self._queue:
            r = self._queue.popleft()
            if not r.future.done():
                r.future.set_exception(Overloaded("the gateway is shutting down; retry shortly"))
        self._queued_images = 0
        self._executor.shutdown(wait=False)
