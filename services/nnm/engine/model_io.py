"""Reading and writing the models the stages hand to each other and to users.

- A pretext directory holds `model.pt` (a raw state dict with `backbone.*` and
  `contrastive_head.*`, the reference pretext layout) and `meta.json`.
- A trained clustering model directory holds `model.pt` (`backbone.*`, `cluster_head.0.*`) and
  `model.json`: architecture, input size and normalisation, class names and cluster-to-class map.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError

from .augment import Normalize
from .checkpoint import atomic_torch_save, atomic_write_json, extract_state_dict, safe_load
from .config import BackboneConfig
from .data import fit_square, pil_to_uint8
from .errors import CheckpointError
from .models import ClusteringModel, ContrastiveModel, build_backbone
from .runtime import Runtime, ordered_batches

MODEL_FORMAT = "nnm-model/1"


class InputSpec(BaseModel):
    """What a network expects as input."""

    model_config = ConfigDict(extra="ignore")

    backbone: BackboneConfig
    in_channels: int
    image_size: int
    mean: list[float]
    std: list[float]


class PretextInfo(InputSpec):
    feature_dim: int | None = None  # None: imported backbone without a contrastive head


class ModelInfo(InputSpec):
    format: str = MODEL_FORMAT
    clusters: int
    class_names: list[str] | None = None
    #: cluster -> index into class_names, learnt by matching on the training set's labels.
    cluster_to_class: list[int] | None = None
    dataset: str | None = None
    method: str | None = None
    head: int = 0


def _read_json(path: Path, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"'{path}' is missing") from None
    except (json.JSONDecodeError, ValidationError) as exc:
        raise CheckpointError(f"'{path}' is not a valid model description ({exc.__class__.__name__})") from None


def save_pretext(model: ContrastiveModel | None, backbone: torch.nn.Module, info: PretextInfo, out: Path) -> None:
    state = model.state_dict() if model is not None else {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    atomic_torch_save({k: v.detach().cpu() for k, v in state.items()}, out / "model.pt")
    atomic_write_json(out / "meta.json", info.model_dump(mode="json"))


def load_pretext(path: Path) -> tuple[torch.nn.Module, ContrastiveModel | None, PretextInfo]:
    """Return (backbone, contrastive model or None, info) of a pretext directory."""
    info: PretextInfo = _read_json(path / "meta.json", PretextInfo)
    state = extract_state_dict(safe_load(path / "model.pt"), f"'{path / 'model.pt'}'")
    backbone = build_backbone(info.backbone, info.in_channels)
    if info.feature_dim is None:
        backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()})
        return backbone, None, info
    model = ContrastiveModel(backbone, info.feature_dim)
    model.load_state_dict(state)
    return model.backbone, model, info


class TrainedModel:
    """A clustering model with one head, ready to assign images to clusters."""

    def __init__(self, model: ClusteringModel, info: ModelInfo):
        self.model = model
        self.info = info
        self.normalize = Normalize(info.mean, info.std)

    @staticmethod
    def locate(path: Path | str) -> Path:
        """Accept a model directory or a pipeline output directory holding `model/`."""
        path = Path(path)
        for candidate in (path, path / "model"):
            if (candidate / "model.json").is_file():
                return candidate
        raise CheckpointError(f"'{path}' holds no trained model (no model.json there or in model/)")

    @classmethod
    def load(cls, path: Path | str) -> TrainedModel:
        directory = cls.locate(path)
        info: ModelInfo = _read_json(directory / "model.json", ModelInfo)
        state = extract_state_dict(safe_load(directory / "model.pt"), f"'{directory / 'model.pt'}'")
        model = ClusteringModel(build_backbone(info.backbone, info.in_channels), info.clusters, heads=1)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(
                f"'{directory / 'model.pt'}' does not fit its model.json ({str(exc)[:200]})"
            ) from None
        model.eval()
        return cls(model, info)

    def save(self, directory: Path) -> None:
        atomic_torch_save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, directory / "model.pt")
        atomic_write_json(directory / "model.json", self.info.model_dump(mode="json"))

    def class_of(self, cluster: int) -> str | None:
        if self.info.class_names is None or self.info.cluster_to_class is None:
            return None
        c = self.info.cluster_to_class[cluster]
        return self.info.class_names[c] if 0 <= c < len(self.info.class_names) else None

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> uint8 batch in the model's channels and size."""
        mode = "L" if self.info.in_channels == 1 else "RGB"
        return torch.from_numpy(
            np.stack([pil_to_uint8(fit_square(im.convert(mode), self.info.image_size)) for im in images])
        )

    @torch.no_grad()
    def predict(self, images: torch.Tensor, runtime: Runtime, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Return (probabilities (N, K), backbone features (N, D)) for a uint8 batch."""
        if len(images) == 0:
            k, d = self.info.clusters, self.model.backbone.out_dim
            return np.zeros((0, k), np.float32), np.zeros((0, d), np.float32)
        model = runtime.prepare(self.model).eval()
        feats, logits = compute_outputs(lambda x: _first_head(model(x)), images, self.normalize, runtime, batch_size)
        return torch.softmax(logits, dim=1).numpy(), feats.numpy()


@torch.no_grad()
def compute_outputs(
    fn: Callable[[torch.Tensor], torch.Tensor | tuple],
    images: torch.Tensor,
    normalize: Normalize,
    runtime: Runtime,
    batch_size: int,
) -> Any:
    """Run `fn` over a uint8 set in order (evaluation transform); the outputs as float32 CPU tensors,
    except those `fn` returns as float16, which stay float16 (a caller halving a large set's outputs).

    `fn` may return a tensor or a tuple/list of tensors (e.g. features and per-head logits). Each
    output is written into a tensor of all rows allocated after the first batch: the set's outputs are
    held once, not once as batches and again as their concatenation (2 GB each for a million 512-d
    features).
    """
    n = len(images)
    out: Any = None
    for sl in ordered_batches(n, batch_size):
        x = runtime.to_model(normalize(runtime.to_device(images[sl])))
        with runtime.autocast():
            batch = fn(x)
        if out is None:
            out = _allocate(batch, n)
        _fill(out, batch, sl)
    if out is None:
        raise ValueError("compute_outputs needs at least one image")
    return out


def _first_head(outputs: tuple[torch.Tensor, list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    features, logits = outputs
    return features, logits[0]


def _allocate(obj: Any, n: int) -> Any:
    if isinstance(obj, torch.Tensor):
        # Autocast's outputs (bfloat16: Runtime.autocast) are widened; float16 comes only from a caller's .half().
        dtype = torch.float16 if obj.dtype == torch.float16 else torch.float32
        return torch.empty((n, *obj.shape[1:]), dtype=dtype)
    return [_allocate(o, n) for o in obj]


def _fill(out: Any, obj: Any, sl: slice) -> None:
    if isinstance(obj, torch.Tensor):
        out[sl].copy_(obj.detach())  # cast to the output's dtype on the way to the CPU
        return
    for o, b in zip(out, obj, strict=True):
        _fill(o, b, sl)
