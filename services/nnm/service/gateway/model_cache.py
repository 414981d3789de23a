"""Trained models for assignment, fetched from the artifact store once and kept in memory (LRU)."""

from __future__ import annotations

import shutil
import threading
from collections import OrderedDict
from pathlib import Path

from nnm.engine.model_io import TrainedModel

from ..context import ServiceContext
from ..store.db import ModelRow
from ..store.storage import download_prefix


class ModelCache:
    def __init__(self, ctx: ServiceContext, capacity: int = 4):
        self.ctx, self.capacity = ctx, capacity
        self._models: OrderedDict[str, TrainedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

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
            with self._lock:
                self._models[row.id] = model
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
            return model

    def evict(self, model_id: str) -> None:
        """Forget a deleted model: from memory and from the local cache directory."""
        with self._lock:
            self._models.pop(model_id, None)
        shutil.rmtree(self.ctx.settings.cache_dir / "models" / model_id, ignore_errors=True)
