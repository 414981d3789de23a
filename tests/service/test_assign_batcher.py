"""The assign batcher: concurrent requests share forward passes, each gets its own rows, a full queue
refuses at once, and a failure or a client that went away does not stop it (tiny real models)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch
from nnm.engine.config import BackboneConfig, RuntimeConfig
from nnm.engine.model_io import ModelInfo, TrainedModel
from nnm.engine.models import ClusteringModel, build_backbone
from nnm.engine.runtime import Runtime
from nnm.service.gateway.assign_batcher import AssignBatcher, Overloaded


class Recording(TrainedModel):
    """A real tiny model that records the size of every forward pass, and can be made slow or broken."""

    def __init__(self, seed: int, delay_s: float = 0.0):
        torch.manual_seed(seed)
        backbone = BackboneConfig(width=4)
        info = ModelInfo(backbone=backbone, in_channels=1, image_size=16, mean=[0.5], std=[0.25], clusters=3)
        super().__init__(ClusteringModel(build_backbone(backbone, 1), 3, heads=1).eval(), info)
        self.passes: list[int] = []
        self.delay_s, self.broken = delay_s, False
        self.entered = threading.Event()

    def predict(self, images, runtime, batch_size=256):
        self.entered.set()
        time.sleep(self.delay_s)
        if self.broken:
            raise RuntimeError("the model broke")
        self.passes.append(len(images))
        return super().predict(images, runtime, batch_size)


@pytest.fixture(scope="module")
def pixels(digits) -> np.ndarray:
    from nnm.engine.data import resize_batch

    return resize_batch(digits.images[:64], 16).numpy()


def alone(model: TrainedModel, pixels: np.ndarray) -> np.ndarray:
    """Each image classified in a pass of its own, as before batching."""
    rt = Runtime(RuntimeConfig(device="cpu"))
    return np.concatenate(
        [TrainedModel.predict(model, torch.from_numpy(pixels[i : i + 1]), rt)[0] for i in range(len(pixels))]
    )


def test_concurrent_single_image_requests_share_passes_and_each_gets_its_own_rows(pixels, one_thread):
    model = Recording(0)
    expected = alone(model, pixels)

    async def main(max_batch: int) -> list[np.ndarray]:
        batcher = AssignBatcher(window_s=0.01, max_batch=max_batch)
        try:
            return await asyncio.gather(*(batcher.classify("m", model, pixels[i : i + 1]) for i in range(64)))
        finally:
            assert batcher.stats.requests == 64 and batcher.stats.images == 64
            await batcher.aclose()

    for max_batch, passes in ((256, [64]), (16, [16, 16, 16, 16])):
        model.passes.clear()
        rows = asyncio.run(main(max_batch))
        assert model.passes == passes
        assert all(r.shape == (1, 3) for r in rows)
        np.testing.assert_allclose(np.concatenate(rows), expected, atol=1e-5)


def test_requests_for_different_models_are_never_mixed(pixels, one_thread):
    a, b = Recording(1), Recording(2)
    assert not np.allclose(alone(a, pixels[:4]), alone(b, pixels[:4]), atol=1e-3)

    async def main() -> list[np.ndarray]:
        batcher = AssignBatcher(window_s=0.01)
        try:  # a, b, a, b, ...: each model's requests form one pass, in order
            return await asyncio.gather(*(batcher.classify(k, m, pixels[i : i + 1]) for i in range(16)
                                          for k, m in [("a", a) if i % 2 == 0 else ("b", b)]))
        finally:
            await batcher.aclose()

    rows = asyncio.run(main())
    assert a.passes == [8] and b.passes == [8]
    np.testing.assert_allclose(np.concatenate(rows[0::2]), alone(a, pixels[0:16:2]), atol=1e-5)
    np.testing.assert_allclose(np.concatenate(rows[1::2]), alone(b, pixels[1:16:2]), atol=1e-5)


def test_a_full_queue_refuses_at_once_and_what_it_holds_finishes(pixels, one_thread):
    model = Recording(3, delay_s=0.3)

    async def main() -> None:
        batcher = AssignBatcher(window_s=0.0, max_queued_images=8)
        try:
            held = [asyncio.ensure_future(batcher.classify("m", model, pixels[i : i + 2])) for i in range(4)]
            await asyncio.sleep(0)  # all four are queued: 8 images
            started = time.monotonic()
            with pytest.raises(Overloaded, match="8 images are already waiting"):
                await batcher.classify("m", model, pixels[:1])
            assert time.monotonic() - started < 0.1  # refused without waiting for the slow pass
            assert batcher.stats.refused == 1
            rows = await asyncio.gather(*held)
            assert [r.shape for r in rows] == [(2, 3)] * 4
            # Once the queue drained, a request larger than the whole queue is still taken alone.
            assert (await batcher.classify("m", model, pixels[:20])).shape == (20, 3)
        finally:
            await batcher.aclose()

    asyncio.run(main())
    assert model.passes == [8, 20]


def test_a_failing_pass_fails_its_requests_and_the_batcher_serves_the_next(pixels, one_thread):
    model = Recording(4)

    async def main() -> None:
        batcher = AssignBatcher(window_s=0.01)
        try:
            model.broken = True
            outcomes = await asyncio.gather(*(batcher.classify("m", model, pixels[i : i + 1]) for i in range(3)),
                                            return_exceptions=True)
            assert [str(o) for o in outcomes] == ["the model broke"] * 3
            model.broken = False
            assert (await batcher.classify("m", model, pixels[:5])).shape == (5, 3)
        finally:
            await batcher.aclose()

    asyncio.run(main())
    assert model.passes == [5]


def test_a_request_whose_client_went_away_is_skipped(pixels, one_thread):
    model = Recording(5, delay_s=0.2)

    async def main() -> None:
        batcher = AssignBatcher(window_s=0.0, max_queued_images=4)
        try:
            first = asyncio.ensure_future(batcher.classify("m", model, pixels[:1]))
            await asyncio.sleep(0.05)  # the first pass runs
            gone = asyncio.ensure_future(batcher.classify("m", model, pixels[1:4]))
            await asyncio.sleep(0)
            gone.cancel()  # its client disconnected while it waited
            assert (await first).shape == (1, 3)
            await asyncio.sleep(0.05)
            # Its images no longer count against the queue, and no pass was spent on them.
            assert (await batcher.classify("m", model, pixels[4:8])).shape == (4, 3)
        finally:
            await batcher.aclose()

    asyncio.run(main())
    assert model.passes == [1, 4]
