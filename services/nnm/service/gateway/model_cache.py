"""Trained models for assignment, fetched from the artifact store once and kept in memory (LRU)."""

from __future__ import annotations

import gc
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path

from nnm.engine.model_io import TrainedModel

from ..context import ServiceContext
from ..store.db import ModelRow
from ..store.storage import download_prefix

#: Seconds a model's record is trusted without asking the database again (assign requests of one model
#: arrive hundreds a second). A model deleted through another gateway replica may answer here for this
#: long; this replica's own deletes take effect at once.
ROW_TTL_S = 2.0


class ModelCache:
    def __init__(self, ctx: ServiceContext, capacity: int = 4):
        self.ctx, self.capacity = ctx, capacity
        self._models: OrderedDict[str, TrainedModel] = OrderedDict()
        self._rows: dict[str, tuple[ModelRow, float]] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def fresh_row(self, model_id: str, owner: str) -> ModelRow | None:
        """The record of `model_id` if `owner` owns it and it was read in the last `ROW_TTL_S` seconds."""
        hit = self._rows.get(model_id)
        if hit is None or hit[1] < time.monotonic() or hit[0].owner != owner:
            return None
        return hit[0]

    def remember_row(self, row: ModelRow) -> None:
        """Keep a record just read from the database for `ROW_TTL_S` seconds."""
        if len(self._rows) > 1000:  # owners x models touched in the last seconds: drop the expired
            now = time.monotonic()
            self._rows = {k: v for k, v in self._rows.items() if v[1] >= now}
        self._rows[row.id] = (row, time.monotonic() + ROW_TTL_S)

    def cached(self, model_id: str) -> TrainedModel | None:
        """The model if it is in memory (never blocks: for the event loop), else None."""
        with self._lock:
            model = self._models.get(model_id)
            if model is not None:
                self._models.move_to_end(model_id)
            return model

    def get(self, row: ModelRow) -> TrainedModel:
        """The model of `row`, downloaded and loaded on first use (blocks: call it on a worker thread)."""
        with self._lock:
            if row.id in self._models:
                self._models.move_to_end(row.id)
                return self._models[row.id]
            loading = self._loading.setdefault(row.id, threading.Lock())
        with loading:  # one download per model even under concurrent requests
            with self._lock:
                if row.id in self._models:
                    return self._models[row.id]
            directory = self.ctx.settings.cache_dir / "models" / row.id
            if not (directory / "model.json").exists():
                tmp = directory.with_name(f".{row.id}.partial")
                shutil.rmtree(tmp, ignore_errors=True)
                download_prefix(self.ctx.store, row.key_prefix, tmp)
                shutil.rmtree(directory, ignore_errors=True)
                Path(tmp).rename(directory)
            model = TrainedModel.load(directory)
            gc.freeze()  # its many tensors and modules stay as long as it is cached: out of full GC passes
            with self._lock:
                self._models[row.id] = model
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
            return model

    def evict(self, model_id: str) -> None:
        """Forget a deleted model: from memory and from the local cache directory."""
        self._rows.pop(model_id, None)
        with self._lock:
            self._models.pop(model_id, None)
        shutil.rmtree(self.ctx.settings.cache_dir / "models" / model_id, ignore_errors=True)
