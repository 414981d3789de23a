"""The clustering engine: a plain library (torch, torchvision, faiss; no web, queue or database).

One function per stage (see `nnm.engine.stages`), `run_pipeline` for all of them, typed configs
in `nnm.engine.config` and presets in `nnm.engine.presets`.
"""

from .config import PipelineConfig
from .errors import Cancelled, CheckpointError, ConfigError, DatasetError, NNMError
from .pipeline import resolve_config, run_pipeline

__all__ = [
    "Cancelled",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "NNMError",
    "PipelineConfig",
    "resolve_config",
    "run_pipeline",
]
