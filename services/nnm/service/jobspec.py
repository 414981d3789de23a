"""What a job of each type needs and does, checked before it is queued.

Validation happens in the gateway (so bad parameters get a 422 at once) and again in the worker
(which resolves the same configuration from the same inputs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from api_schemas import JobStatus, JobType
from nnm.engine.config import PipelineConfig, parse_config
from nnm.engine.errors import ConfigError
from nnm.engine.pipeline import config_for_traits
from nnm.engine.presets import DatasetTraits

from .store.db import DatasetRow, JobRow
from .store.repository import JobStore

#: Stages each job type runs, in order (`estimate` only with clusters "auto", `selflabel` only when enabled).
STAGES: dict[str, list[str]] = {
    "pretext": ["pretext"],
    "mine": ["mine"],
    "cluster": ["cluster", "evaluate"],
    "selflabel": ["selflabel", "evaluate"],
    "evaluate": ["evaluate"],
    "pipeline": ["pretext", "mine", "estimate", "cluster", "selflabel", "evaluate"],
}
#: Inputs each job type requires.
REQUIRED_INPUTS: dict[str, list[str]] = {
    "mine": ["pretext_job_id"],
    "cluster": ["pretext_job_id", "mine_job_id"],
    "selflabel": ["cluster_job_id"],
    "evaluate": ["model_id"],
}
#: Stage directory an input job provides.
INPUT_STAGE = {"pretext_job_id": "pretext", "mine_job_id": "mine", "cluster_job_id": "cluster"}


def stages_of(job_type: str, cfg: PipelineConfig) -> list[str]:
    """The stages a job of `job_type` with settings `cfg` runs, in order."""
    skip = set()
    if cfg.cluster.clusters != "auto":
        skip.add("estimate")
    if not cfg.selflabel.enabled:
        skip.add("selflabel")
    return [s for s in STAGES[job_type] if s not in skip]


def queue_for(job_type: str) -> str:
    """Training stages go to the GPU queue; evaluation (inference only) to the CPU queue."""
    return "cpu" if job_type == JobType.evaluate.value else "gpu"


@dataclass
class SpecError(Exception):
    """A job request that cannot run; `errors` name the offending fields."""

    status: int
    detail: str
    errors: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        return self.detail


def dataset_spec(row: DatasetRow, local_path: str | None = None) -> str:
    """The engine's dataset string: `name:split` for built-ins, the local file for uploads."""
    if row.kind == "builtin":
        return f"{row.builtin}:{row.split}" if row.split else str(row.builtin)
    if local_path is None:
        raise ValueError("uploaded datasets need their local path")
    return local_path


def traits_of(row: DatasetRow) -> DatasetTraits:
    return DatasetTraits(
        builtin=row.builtin if row.kind == "builtin" else None,
        image_size=row.image_size or 32,
        channels=row.channels or 3,
        num_images=row.image_count or 0,
    )


#: Settings that name places on the worker (or bound its disk); the service decides them, never the caller.
WORKER_PATHS = {"data": ("root", "dataset", "cache_dir", "cache_max_bytes")}
#: Ids the service issues: a prefix, an underscore and 32 hex digits (nothing that could be a path).
ID_PATTERN = re.compile(r"^[a-z]{2,4}_[0-9a-f]{32}$")


def _refuse_worker_paths(params: dict[str, Any]) -> None:
    for section, keys in WORKER_PATHS.items():
        given = params.get(section)
        for key in keys:
            if isinstance(given, dict) and key in given:
                raise SpecError(422, f"params.{section}.{key} cannot be set through the API (the service chooses it)",
                                [{"loc": ["params", section, key], "msg": "not allowed"}])


def submitted_params(params: dict[str, Any], device: str) -> dict[str, Any]:
    """`params` with the preset and the device fixed at submission, so that whichever worker claims the
    job trains exactly what the API showed (`auto` is resolved here, by the gateway, not by a worker).

    `device` is the training workers' device (NNM_DEVICE of the gateway; `auto` detects this machine's).
    """
    if not isinstance(params, dict):
        raise SpecError(422, "params must be a JSON object", [{"loc": ["params"], "msg": "not an object"}])
    runtime = params.get("runtime", {})
    if not isinstance(runtime, dict):
        raise SpecError(422, "params.runtime must be an object",
                        [{"loc": ["params", "runtime"], "msg": "not an object"}])
    chosen = runtime.get("device", device)
    if chosen == "auto":
        from nnm.engine.runtime import resolve_device

        chosen = resolve_device("auto").type
    preset = params.get("preset", "auto")
    if preset == "auto":
        preset = "fast" if chosen == "cuda" else "cpu"
    return {**params, "preset": preset, "runtime": {**runtime, "device": chosen}}


def resolve(row: DatasetRow, params: dict[str, Any], device: str, spec: str | None = None) -> PipelineConfig:
    """The engine configuration of a job: preset for the dataset, `params` on top."""
    if not isinstance(params, dict):
        raise SpecError(422, "params must be a JSON object", [{"loc": ["params"], "msg": "not an object"}])
    _refuse_worker_paths(params)
    overrides = {k: v for k, v in params.items() if k != "preset"}
    preset = params.get("preset", "auto")
    if not isinstance(preset, str):
        raise SpecError(422, "params.preset must be a string", [{"loc": ["params", "preset"], "msg": "not a string"}])
    overrides.setdefault("runtime", {})
    if isinstance(overrides["runtime"], dict):
        overrides["runtime"].setdefault("device", device)
    try:
        cfg = config_for_traits(spec or dataset_spec(row, "uploaded"), preset, overrides, traits_of(row))
    except ConfigError as exc:
        raise SpecError(422, str(exc), [{"loc": ["params"], "msg": str(exc)}]) from None
    return cfg


def check_sizes(cfg: PipelineConfig, row: DatasetRow) -> None:
    """Refuse settings the dataset cannot satisfy (more clusters or neighbours than images)."""
    n = row.image_count
    if not n:
        return
    k = cfg.cluster.clusters or (len(row.classes) if row.classes else None)
    if k == "auto":  # the estimate considers at most n // 2 clusters
        k = cfg.estimate.min_clusters * 2
        if k > n:
            raise SpecError(
                422,
                f"the dataset has {n} images, too few to look for at least {cfg.estimate.min_clusters} clusters",
                [{"loc": ["params", "estimate", "min_clusters"], "msg": f"must be at most {n // 2}"}],
            )
    if k is None:
        raise SpecError(
            422,
            "the dataset has no labels, so params.cluster.clusters must be given (a number, or auto to estimate it)",
            [{"loc": ["params", "cluster", "clusters"], "msg": "required for unlabelled data"}],
        )
    if k > n:
        raise SpecError(
            422,
            f"the dataset has {n} images, fewer than the {k} clusters asked for",
            [{"loc": ["params", "cluster", "clusters"], "msg": f"must be at most {n}"}],
        )
    if cfg.mine.topk >= n:
        raise SpecError(
            422,
            f"the dataset has {n} images, too few for {cfg.mine.topk} neighbours each",
            [{"loc": ["params", "mine", "topk"], "msg": f"must be below {n}"}],
        )


def check_inputs(job_type: str, inputs: dict[str, Any], dataset: DatasetRow, owner: str, store: JobStore) -> None:
    """Every required input exists, belongs to the caller, has finished and fits the dataset."""
    for name in REQUIRED_INPUTS.get(job_type, []):
        if not inputs.get(name):
            raise SpecError(
                422, f"a {job_type} job needs inputs.{name}", [{"loc": ["inputs", name], "msg": "required"}]
            )
    for name, value in inputs.items():
        if value is None:
            continue
        if name == "model_id":
            if store.get_model(value, owner) is None:
                raise SpecError(
                    422, f"inputs.model_id: no model '{value}'", [{"loc": ["inputs", name], "msg": "unknown"}]
                )
            continue
        job = store.get_job(value, owner)
        if job is None:
            raise SpecError(422, f"inputs.{name}: no job '{value}'", [{"loc": ["inputs", name], "msg": "unknown job"}])
        stage = INPUT_STAGE[name]
        if stage not in STAGES[job.type]:
            raise SpecError(
                422,
                f"inputs.{name}: job '{value}' is a {job.type} job, which has no {stage} stage",
                [{"loc": ["inputs", name], "msg": "wrong job type"}],
            )
        if job.status != JobStatus.succeeded.value:
            raise SpecError(
                409,
                f"inputs.{name}: job '{value}' is {job.status}, not succeeded",
                [{"loc": ["inputs", name], "msg": "not finished"}],
            )
        if not _same_data(job, dataset, store, stage):
            raise SpecError(
                422,
                f"inputs.{name}: job '{value}' was trained on another dataset",
                [{"loc": ["inputs", name], "msg": "other dataset"}],
            )


def _same_data(job: JobRow, dataset: DatasetRow, store: JobStore, stage: str) -> bool:
    if job.dataset_id == dataset.id:
        return True
    other = store.get_dataset(job.dataset_id)
    # A pretext stage may come from another split of the same built-in set (STL-10 train+unlabeled).
    return (
        stage == "pretext"
        and other is not None
        and other.kind == "builtin"
        and dataset.kind == "builtin"
        and other.builtin == dataset.builtin
    )


BACKBONE_PREFIX = "backbone:"


def uploaded_backbone(init: str | None) -> str | None:
    """The id of an uploaded backbone named by `pretext.init = "backbone:<id>"`; None for no init.

    Raises SpecError for anything else, ids that are not ids included (`backbone:../../jobs/...`).
    """
    if not init:
        return None
    backbone = init[len(BACKBONE_PREFIX) :] if init.startswith(BACKBONE_PREFIX) else None
    if backbone is None or not ID_PATTERN.match(backbone) or not backbone.startswith("bb_"):
        raise SpecError(422, "params.pretext.init must name an uploaded backbone ('backbone:<id>' with the id "
                        "POST /v1/backbones returned)",
                        [{"loc": ["params", "pretext", "init"], "msg": "not an uploaded backbone"}])
    return backbone


def backbone_key(owner: str, backbone: str) -> str:
    """Where an owner's uploaded backbone is stored: under the owner's prefix, so no one else's is reachable."""
    return f"backbones/{owner}/{backbone}.pt"


def validate_job(
    job_type: str,
    dataset: DatasetRow,
    inputs: dict[str, Any],
    params: dict[str, Any],
    owner: str,
    store: JobStore,
    device: str,
    artifacts: Any = None,
) -> PipelineConfig:
    """All checks of a new job; returns the resolved engine configuration."""
    for name, value in inputs.items():
        if value is not None and not ID_PATTERN.match(str(value)):
            raise SpecError(422, f"inputs.{name}: '{str(value)[:80]}' is not an id this service issued",
                            [{"loc": ["inputs", name], "msg": "not an id"}])
    cluster = params.get("cluster")
    if job_type == "cluster" and isinstance(cluster, dict) and cluster.get("clusters") == "auto":
        raise SpecError(422, "params.cluster.clusters: 'auto' is estimated by a pipeline job, not a cluster job",
                        [{"loc": ["params", "cluster", "clusters"], "msg": "'auto' needs a pipeline job"}])
    check_inputs(job_type, inputs, dataset, owner, store)
    cfg = resolve(dataset, params, device)
    backbone = uploaded_backbone(cfg.pretext.init)
    if backbone is not None:
        if job_type not in {"pipeline", "pretext"}:
            raise SpecError(422, f"params.pretext.init: a {job_type} job trains no backbone",
                            [{"loc": ["params", "pretext", "init"], "msg": "not used by this job type"}])
        if artifacts is not None and not artifacts.exists(backbone_key(owner, backbone)):
            raise SpecError(422, f"params.pretext.init: no uploaded backbone '{backbone}'",
                            [{"loc": ["params", "pretext", "init"], "msg": "unknown backbone"}])
    if job_type in {"pipeline", "cluster", "mine"}:
        check_sizes(cfg, dataset)
    return parse_config(PipelineConfig, cfg.model_dump(mode="json"))
