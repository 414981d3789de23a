"""Checkpoints: atomic writes, safe loading, per-epoch resume, and imports of foreign state dicts.

Every file is written to a temporary name and renamed into place, so a killed run leaves either the
previous complete file or the new complete file, never half of one. Everything is read back with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError
from .progress import ProgressSink

CHECKPOINT_FORMAT = "nnm-checkpoint/1"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_digest(path: Path) -> str:
    """sha256 of a file, read in blocks (stage markers list their files' digests; stages chain them)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _numpy_safe_globals() -> list[Any]:
    """numpy types a reference checkpoint may hold (its 'head' index is a numpy integer)."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    kinds = [type(np.dtype(t)) for t in (np.int64, np.int32, np.float64, np.float32)]
    return [scalar, np.dtype, *kinds]


def safe_load(path: Path | str) -> Any:
    """torch.load(weights_only=True) with a clear error for missing, foreign or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign / corrupt / unsafe files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(
            f"cannot read checkpoint '{path.name}': it is not a readable PyTorch weights file ({reason[:200]})"
        ) from None


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor state dict inside a loaded file: raw, or under 'model' / 'state_dict' / 'backbone'.

    A `module.` prefix (DataParallel / DDP resume files) is removed.
    """
    if not _is_state_dict(obj) and isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict", "backbone"):
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        raise CheckpointError(f"{source} does not hold a plain state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def backbone_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone weights from a full model (`backbone.*`) or a bare backbone state dict."""
    if any(k.startswith("backbone.") for k in state):
        return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    # A bare network (e.g. torchvision's): drop its classifier.
    return {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}


def load_backbone_weights(backbone: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load backbone weights strictly, adapting an RGB stem to single-channel input by summing."""
    state = dict(state)
    own = backbone.state_dict()
    for key in ("conv1.weight",):
        if key in state and key in own and state[key].shape != own[key].shape:
            w = state[key]
            if w.dim() == 4 and own[key].shape[1] == 1 and w.shape[1] == 3:
                state[key] = w.sum(dim=1, keepdim=True)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            detail.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        raise CheckpointError(f"{source} does not fit the backbone ({'; '.join(detail)})")
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        raise CheckpointError(
            f"{source} does not fit the backbone: '{bad[0]}' has shape {tuple(state[bad[0]].shape)}, "
            f"expected {tuple(own[bad[0]].shape)} (check the architecture and width)"
        )
    backbone.load_state_dict(state)


def import_backbone(backbone: nn.Module, source: str) -> None:
    """Initialise a backbone from a state-dict file or `torchvision:WEIGHTS` (e.g.
    `torchvision:ResNet50_Weights.IMAGENET1K_V2`, downloaded by torchvision)."""
    if source.startswith("torchvision:"):
        name = source.split(":", 1)[1]
        import torchvision

        try:
            weights = torchvision.models.get_weight(name)
        except (ValueError, KeyError, AttributeError):
            raise CheckpointError(f"torchvision has no weights named '{name}'") from None
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as exc:
            raise CheckpointError(f"could not download torchvision weights '{name}' ({exc})") from None
    else:
        state = extract_state_dict(safe_load(source), f"'{Path(source).name}'")
    load_backbone_weights(backbone, backbone_state(state), f"'{source}'")


def config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like trees."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += config_differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


class StageDir:
    """A stage's output directory: its per-epoch checkpoint, its completion marker, its outputs.

    `fingerprint` identifies the stage's inputs and configuration; a checkpoint or completion marker
    with another fingerprint is refused rather than silently mixed with this run.
    """

    def __init__(self, path: Path, stage: str, fingerprint: dict[str, Any], writer: bool = True):
        self.path = Path(path)
        self.stage = stage
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        #: Whether this process writes (rank 0 of a distributed run; the others only read).
        self.writer = writer
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def done_path(self) -> Path:
        return self.path / "done.json"

    def _check_fingerprint(self, found: dict[str, Any], what: str) -> None:
        if found != self.fingerprint:
            diff = config_differences(found, self.fingerprint)
            raise CheckpointError(
                f"{self.path} holds a {what} of the {self.stage} stage made with other settings "
                f"(differs in {', '.join(diff[:5]) or 'its inputs'}); use another output directory or remove it"
            )

    def completed(self) -> dict[str, Any] | None:
        """The completion summary when this stage already finished with the same fingerprint.

        The marker lists the stage's files with their sizes and digests; when one is missing or
        differs (an upload or download that stopped part-way), the stage is not complete and runs
        again, resuming from its checkpoint if there is one.
        """
        if not self.done_path.exists():
            return None
        try:
            done = json.loads(self.done_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # an unreadable marker is not trusted: the stage runs again
        self._check_fingerprint(done.get("fingerprint"), "finished run")
        if not self.files_match(done.get("files")):
            return None
        return done.get("summary", {})

    def _output_files(self) -> list[Path]:
        """The stage's outputs: every file but the marker, the checkpoint and temporary files."""
        return sorted(
            p for p in self.path.rglob("*")
            if p.is_file() and p.name not in {"done.json", "checkpoint.pt"} and not p.name.endswith(".tmp")
        )

    def files_match(self, files: dict[str, Any] | None) -> bool:
        """Whether the listed outputs are all present with their recorded size and sha256.

        Markers written before files were listed (None) are trusted as they were.
        """
        if files is None:
            return True
        for rel, want in files.items():
            path = self.path / rel
            if not path.is_file() or path.stat().st_size != want.get("size") or file_digest(path) != want.get("sha256"):
                return False
        return True

    def mark_done(self, summary: dict[str, Any]) -> None:
        """Write the completion marker, listing the outputs it vouches for, and drop the checkpoint."""
        if not self.writer:
            return
        files = {
            p.relative_to(self.path).as_posix(): {"size": p.stat().st_size, "sha256": file_digest(p)}
            for p in self._output_files()
        }
        atomic_write_json(
            self.done_path,
            {"stage": self.stage, "fingerprint": self.fingerprint, "summary": summary, "files": files},
        )
        self.checkpoint_path.unlink(missing_ok=True)

    def resume(self, components: Mapping[str, Any], sink: ProgressSink | None = None) -> tuple[int, dict]:
        """Load the last per-epoch checkpoint into `components`; return (epochs done, saved state)."""
        if not self.checkpoint_path.exists():
            return 0, {}
        ckpt = safe_load(self.checkpoint_path)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{self.checkpoint_path} is not a checkpoint of this program")
        self._check_fingerprint(json.loads(ckpt["fingerprint"]), "checkpoint")
        for name, obj in components.items():
            obj.load_state_dict(ckpt["components"][name])
        if sink is not None:
            sink.message(f"{self.stage}: resuming after epoch {ckpt['epoch']}")
        return int(ckpt["epoch"]), ckpt.get("state", {})

    def save(self, epoch: int, components: Mapping[str, Any], state: dict[str, Any]) -> None:
        """Write the checkpoint after `epoch` completed epochs."""
        if not self.writer:
            return
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "stage": self.stage,
                "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
                "epoch": epoch,
                "components": {name: obj.state_dict() for name, obj in components.items()},
                "state": state,
            },
            self.checkpoint_path,
        )
