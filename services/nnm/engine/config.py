"""Typed configuration of every stage (pydantic v2).

Unknown keys are rejected (`extra="forbid"`), so a typo such as `pretext.epoch` fails loudly with
the key named instead of being silently ignored.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

if TYPE_CHECKING:
    from .cache import CachePolicy

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16"]

#: The strong (RandAugment-style) operations SCAN's augmentation draws from.
STRONG_OPS: tuple[str, ...] = (
    "identity",
    "autocontrast",
    "equalize",
    "rotate",
    "solarize",
    "color",
    "posterize",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)


class Strict(BaseModel):
    """Base for all configs: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneConfig(Strict):
    """Which backbone network to build."""

    arch: Literal["resnet18-cifar", "resnet18-stl", "resnet50"] = "resnet18-cifar"
    #: Channels of the first ResNet-18 stage (64 is the standard network; 16 or 32 for CPU budgets).
    width: int = Field(64, ge=4, le=512)

    @model_validator(mode="after")
    def _resnet50_is_fixed_width(self) -> BackboneConfig:
        if self.arch == "resnet50" and self.width != 64:
            raise ValueError("width applies to the ResNet-18 variants only; resnet50 has width 64")
        return self


class SimCLRAugmentConfig(Strict):
    """SimCLR's view generator, drawn independently for every image of a batch."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    #: Side of the views (None: the image size). Smaller views make each SimCLR step cheaper;
    #: features are still extracted from full-size images, which suits CNNs trained on random crops.
    crop_size: int | None = Field(None, ge=8, le=1024)
    flip: bool = True
    rotate_degrees: float = Field(0.0, ge=0, le=180)
    #: brightness, contrast, saturation, hue strengths of ColorJitter.
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = Field(0.8, ge=0, le=1)
    grayscale_p: float = Field(0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _ranges(self) -> SimCLRAugmentConfig:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError("crop_scale must satisfy 0 < low <= high <= 1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError("crop_ratio must satisfy 0 < low <= high")
        return self


class StrongAugmentConfig(Strict):
    """SCAN's strong augmentation: flip, `n_ops` random operations at random strength, Cutout."""

    flip: bool = True
    n_ops: int = Field(4, ge=0, le=8)
    ops: list[str] = Field(default_factory=lambda: list(STRONG_OPS))
    #: Scales every operation's distance from its identity: 1.0 gives SCAN's ranges exactly (rotate
    #: +-30 degrees, shear and translate +-0.1 with the defaults below, colour/contrast/brightness/
    #: sharpness factors in [0.05, 0.95], solarize threshold in [0, 256], posterize to 4..7 bits),
    #: 0.0 turns every parameterised op into an identity. See `StrongAugment` for the formulas.
    magnitude: float = Field(1.0, ge=0, le=1)
    #: Largest shear factor and largest shift (fraction of the image side) at magnitude 1. SCAN's 0.1
    #: by default; the digit presets widen them (measured in docs/fidelity.md).
    shear: float = Field(0.1, ge=0, le=0.5)
    translate: float = Field(0.1, ge=0, le=0.5)
    #: Largest Cutout hole side as a fraction of the image side (0 disables Cutout).
    cutout: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _known_ops(self) -> StrongAugmentConfig:
        unknown = sorted(set(self.ops) - set(STRONG_OPS))
        if unknown:
            raise ValueError(f"unknown operation(s) {unknown}; choose from {list(STRONG_OPS)}")
        if self.n_ops and not self.ops:
            raise ValueError("ops is empty but n_ops > 0")
        return self


class DataConfig(Strict):
    """Which images to use."""

    #: Built-in name (cifar10, cifar20, stl10, mnist5k, digits) or a folder / .zip path.
    dataset: str
    #: Split to cluster (None: the dataset's training split).
    split: str | None = None
    #: Split for the pretext stage (None: same as `split`; STL-10 uses train+unlabeled).
    pretext_split: str | None = None
    #: Split the headline metrics come from. "auto": `test` when the data set has a test split that was
    #: not trained on (built-ins, folders with train/ and test/), else the clustered images; None: always
    #: the clustered images.
    eval_split: str | None = "auto"
    #: Square side images are resized to once, on load (None: native size when uniform).
    image_size: int | None = Field(None, ge=8, le=1024)
    #: Where built-in datasets are downloaded (None: $NNM_DATASETS_DIR or ~/.cache/nnm/datasets).
    root: str | None = None
    #: Decode the set once into a memory-mapped file and train from it: "auto" for sets of 512 MiB and
    #: more decoded, "on" for every set, "off" to decode into memory each time.
    cache: Literal["auto", "on", "off"] = "auto"
    #: Where decoded sets are cached (None: $NNM_CACHE_DIR or ~/.cache/nnm/decoded).
    cache_dir: str | None = None
    #: Bytes the cache directory may hold; least recently used sets are removed past it (None: no bound).
    cache_max_bytes: int | None = Field(None, ge=0)

    def cache_policy(self) -> CachePolicy | None:
        """The decoded-image cache these settings ask for (None: off)."""
        from .cache import cache_policy  # imported here: reading configs needs no torch

        return cache_policy(self.cache, self.cache_dir, self.cache_max_bytes)


class RuntimeConfig(Strict):
    """Where and how numerically to run."""

    seed: int = 0
    device: Device = "auto"
    #: bf16 autocast where the hardware has fast bf16 (AMX / avx512_bf16 CPUs, Ampere+ GPUs).
    precision: Precision = "auto"
    #: CPU threads for torch (None: torch's default).
    threads: int | None = Field(None, ge=1)
    #: Largest chunk of images per forward pass during training (None: 256 on CPU, whole batch on GPU).
    #: Smaller chunks keep a CPU's caches warm; the loss still sees the whole batch.
    micro_batch: int | None = Field(None, ge=1)
    #: Steps between reads of the running loss from the device for progress reports (None: every step on
    #: a CPU, where a read costs nothing; every 50 on a GPU, where each read waits for the GPU to drain).
    #: Epoch means are accumulated on the device and read once per epoch either way.
    sync_every: int | None = Field(None, ge=1)
    #: Keep the whole uint8 data set on the device and gather batches there (None: on a GPU when it takes
    #: under a quarter of the free memory: CIFAR-10 is 150 MB; on a CPU it is where it already is).
    resident_data: bool | None = None


class PretextConfig(Strict):
    """SimCLR training of the backbone."""

    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    #: Import a backbone instead of training one: a state-dict file or `torchvision:WEIGHTS_NAME`.
    init: str | None = None
    epochs: int = Field(500, ge=0)
    batch_size: int = Field(512, ge=2)
    #: At most this many steps per epoch, each epoch a fresh random share of the set (None: the whole set).
    #: Bounds a short preset's time on a large set; a small set is not affected.
    max_steps: int | None = Field(None, ge=1)
    lr: float = Field(0.4, gt=0)
    lr_min: float = Field(4e-4, ge=0)
    warmup_epochs: int = Field(0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    temperature: float = Field(0.1, gt=0)
    feature_dim: int = Field(128, ge=2)
    augment: SimCLRAugmentConfig = Field(default_factory=SimCLRAugmentConfig)


class MineConfig(Strict):
    """Nearest-neighbour mining in the pretext feature space."""

    topk: int = Field(20, ge=1)
    #: Mine on the contrastive head's output (as SCAN does) or on the pooled backbone feature.
    feature: Literal["head", "backbone"] = "head"
    batch_size: int = Field(512, ge=1)
    #: Queries per search call, so memory stays bounded on very large sets.
    chunk_size: int = Field(16384, ge=1)
    #: exact, or an approximate faiss index for large sets: ivf (fast to build) or hnsw. The stage
    #: reports the approximate index's recall against exact search on a sample of rows.
    index: Literal["exact", "ivf", "hnsw"] = "exact"
    #: IVF: inverted lists (None: about 4 sqrt(N)) and lists searched per query.
    ivf_lists: int | None = Field(None, ge=1)
    ivf_probe: int = Field(32, ge=1)
    #: HNSW: links per node and the search beam.
    hnsw_m: int = Field(32, ge=4, le=256)
    ef_search: int = Field(128, ge=1)


class ClusterConfig(Strict):
    """SCAN / NNM training of the clustering heads."""

    method: Literal["scan", "nnm"] = "nnm"
    #: Number of clusters (None: the number of classes of a labelled dataset; "auto": estimated from the
    #: mined neighbours by the pipeline's estimate stage, see `EstimateConfig`).
    clusters: int | Literal["auto"] | None = None
    heads: int = Field(3, ge=1)
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(200, ge=2)
    #: At most this many steps per epoch, each epoch a fresh random share of the set (None: the whole set).
    #: Bounds a short preset's time on a large set; a small set is not affected.
    max_steps: int | None = Field(None, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    entropy_weight: float = Field(5.0, ge=0)
    #: Neighbours to sample from (None: all mined ones).
    neighbors: int | None = Field(None, ge=1)
    #: Train the backbone too (SCAN's default); False trains only the heads.
    update_backbone: bool = True
    #: Backbone learning rate as a multiple of `lr` when the backbone is trained.
    backbone_lr_scale: float = Field(1.0, gt=0)
    #: NNM terms (ignored by method=scan).
    local_matching: bool = True
    global_matching: bool = True
    #: How NNM's global memory finds each image's nearest other image after every epoch: exact (a
    #: blocked search, time growing with N squared), ivf (a faiss IVF index with 8-bit codes: near
    #: linear time, a quarter of the features' memory), or auto (exact below 200,000 images).
    global_index: Literal["auto", "exact", "ivf"] = "auto"
    cluster_temperature: float = Field(1.0, gt=0)
    augment: StrongAugmentConfig = Field(default_factory=StrongAugmentConfig)

    @field_validator("clusters", mode="before")
    @classmethod
    def _clusters(cls, value: Any) -> Any:
        # One message per mistake (a bare union would report one error per member of the union).
        if value is None or value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a number of clusters (at least 2) or 'auto', got {value!r}")
        if value < 2:
            raise ValueError("Input should be greater than or equal to 2")
        return value


class EstimateConfig(Strict):
    """Estimating the number of clusters when `cluster.clusters` is "auto" (see `nnm.engine.estimate`)."""

    #: modularity: k-means partitions of the mined features scored on the mined neighbour graph;
    #: silhouette: the same partitions scored by their silhouette; eigengap: the graph's spectrum alone.
    criterion: Literal["modularity", "silhouette", "eigengap"] = "modularity"
    min_clusters: int = Field(2, ge=2, le=1000)
    max_clusters: int = Field(50, ge=2, le=1000)
    #: Neighbours per image in the graph (None: all mined ones).
    graph_neighbors: int | None = Field(None, ge=1)
    #: Images whose silhouette is averaged (the silhouette criterion only; k-means itself fits on at
    #: most 20,000 images and then assigns every image).
    sample: int = Field(4000, ge=100, le=50000)
    #: modularity and silhouette: take the smallest K whose score is within `standard_errors` standard
    #: errors (under resampling of the images) of the highest. Their curves are flat near the top, where
    #: the highest point is noise, and how flat depends on the set's size: a fixed 0.01 fitted 8 digits
    #: and MNIST-5k runs but took 6 on CIFAR-10 (docs/benchmarks.md, "Estimating the number of clusters").
    standard_errors: float = Field(2.0, ge=0.0, le=10.0)
    #: A fixed tolerance instead (0: the highest-scoring K); None: the standard-error rule above.
    tolerance: float | None = Field(None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _range(self) -> EstimateConfig:
        if self.min_clusters > self.max_clusters:
            raise ValueError(f"min_clusters ({self.min_clusters}) exceeds max_clusters ({self.max_clusters})")
        return self


class SelfLabelConfig(Strict):
    """Fine-tuning on confident pseudo-labels."""

    enabled: bool = True
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(1000, ge=2)
    #: At most this many steps per epoch, each epoch a fresh random share of the set (None: the whole set).
    #: Bounds a short preset's time on a large set; a small set is not affected.
    max_steps: int | None = Field(None, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    threshold: float = Field(0.99, gt=0, lt=1)
    class_balance: bool = True
    #: Exponential moving average of the weights used for pseudo-labels and the result (None: off).
    ema_decay: float | None = Field(None, gt=0, lt=1)
    #: Keep the clustering model when self-labelling raised its label-free SCAN loss (it amplified
    #: early mistakes, e.g. emptied clusters). Needs the mined neighbours.
    guard: bool = True
    augment: StrongAugmentConfig = Field(default_factory=StrongAugmentConfig)


class EvaluateConfig(Strict):
    """Metrics and pictures."""

    batch_size: int = Field(512, ge=1)
    #: Most confident members per cluster whose mean feature defines the cluster's prototype.
    prototype_members: int = Field(10, ge=1)
    #: Images shown per cluster in prototypes.png (the members closest to that mean).
    prototype_images: int = Field(5, ge=1, le=20)
    #: Write `gallery/` (thumbnails, per-image cluster and neighbours) for browsing the clusters.
    gallery: bool = True
    #: Largest thumbnail side in the gallery, in pixels.
    gallery_thumbnail: int = Field(48, ge=8, le=128)


class PipelineConfig(Strict):
    """Everything `nnm pipeline` needs."""

    data: DataConfig
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    pretext: PretextConfig = Field(default_factory=PretextConfig)
    mine: MineConfig = Field(default_factory=MineConfig)
    estimate: EstimateConfig = Field(default_factory=EstimateConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    selflabel: SelfLabelConfig = Field(default_factory=SelfLabelConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _neighbours_fit(self) -> PipelineConfig:
        if self.cluster.neighbors is not None and self.cluster.neighbors > self.mine.topk:
            raise ValueError(f"cluster.neighbors ({self.cluster.neighbors}) exceeds mine.topk ({self.mine.topk})")
        if self.estimate.graph_neighbors is not None and self.estimate.graph_neighbors > self.mine.topk:
            raise ValueError(
                f"estimate.graph_neighbors ({self.estimate.graph_neighbors}) exceeds mine.topk ({self.mine.topk})"
            )
        return self


M = TypeVar("M", bound=BaseModel)


def describe_validation_error(err: ValidationError) -> str:
    """One sentence naming every offending key, e.g. "unknown key 'pretext.epoch'"."""
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        elif e["type"] == "missing":
            parts.append(f"missing key '{key}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"'{key}': {msg}")
    return "invalid configuration: " + "; ".join(parts)


def parse_config(model: type[M], data: dict[str, Any]) -> M:
    """Validate `data` as `model`, raising ConfigError with every bad key named."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err)) from None


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as JSON when it can be."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{assignment}' is not of the form key=value")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{assignment}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Return `base` updated recursively with `extra` (neither is modified)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
