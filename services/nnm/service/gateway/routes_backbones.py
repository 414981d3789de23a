"""/v1/backbones: upload pretrained backbone weights to start a pretext stage from.

The file must be a plain PyTorch state dict (loaded with `weights_only=True`, never unpickled
objects) that fits the named architecture; a job then uses it with
`params.pretext.init = "backbone:<id>"` (and `pretext.epochs = 0` to skip SimCLR training).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Literal

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from nnm.engine.checkpoint import backbone_state, extract_state_dict, load_backbone_weights, safe_load
from nnm.engine.config import BackboneConfig
from nnm.engine.errors import CheckpointError
from nnm.engine.models import build_backbone

from ..jobspec import backbone_key
from ..store.db import new_id
from .deps import Gateway, gateway, owner
from .problems import ApiProblem

router = APIRouter(prefix="/v1/backbones", tags=["backbones"])
#: A ResNet-50 state dict is about 100 MB; nothing we can load is bigger than this.
MAX_BACKBONE_BYTES = 256 * 1024**2

UPLOAD_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "a PyTorch state dict (.pt / .pth)"},
        "arch": {"type": "string", "enum": ["resnet18-cifar", "resnet18-stl", "resnet50"]},
        "width": {"type": "integer", "minimum": 4, "maximum": 512},
        "in_channels": {"type": "integer", "enum": [1, 3]}}}}}}}


class BackboneOut(BaseModel):
    id: str
    arch: Literal["resnet18-cifar", "resnet18-stl", "resnet50"]
    width: int
    in_channels: int
    init: str


def _check(path: Path, cfg: BackboneConfig, in_channels: int) -> None:
    state = extract_state_dict(safe_load(path), "the uploaded file")
    net = build_backbone(cfg, in_channels)
    load_backbone_weights(net, backbone_state(state), "the uploaded file")
    with torch.no_grad():  # the weights must also run
        net.eval()(torch.zeros(1, in_channels, 32, 32))


@router.post("", status_code=201, response_model=BackboneOut, openapi_extra=UPLOAD_DOC,
             summary="Upload backbone weights (a plain state dict) for `pretext.init`",
             responses={415: {"description": "Not multipart/form-data"}})
async def upload_backbone(request: Request, gw: Annotated[Gateway, Depends(gateway)],
                          user: Annotated[str, Depends(owner)]) -> BackboneOut:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise ApiProblem(415, "send the weights as multipart/form-data in the field 'file'",
                         type_="urn:nnm:problem:unsupported-media-type")
    form = await request.form(max_files=1, max_fields=10)
    file = form.get("file")
    if not isinstance(file, UploadFile):
        raise ApiProblem(422, "file: a multipart field 'file' with a state dict is required",
                         type_="urn:nnm:problem:validation")
    try:
        cfg = BackboneConfig(arch=str(form.get("arch") or "resnet18-cifar"), width=int(form.get("width") or 64))
        in_channels = int(form.get("in_channels") or 3)
        if in_channels not in (1, 3):
            raise ValueError("in_channels must be 1 or 3")
    except (ValidationError, ValueError) as exc:
        raise ApiProblem(422, f"invalid backbone description: {str(exc).splitlines()[0]}",
                         type_="urn:nnm:problem:validation") from None
    backbone_id = new_id("bb")
    with tempfile.TemporaryDirectory(dir=gw.ctx.settings.data_dir) as tmp:
        path = Path(tmp) / "weights.pt"
        size = 0
        with open(path, "wb") as f:  # streamed: never the whole file in memory
            while chunk := await file.read(1 << 20):
                size += len(chunk)
                if size > MAX_BACKBONE_BYTES:
                    raise ApiProblem(413, f"file: a backbone state dict is at most {MAX_BACKBONE_BYTES} bytes",
                                     type_="urn:nnm:problem:too-large")
                f.write(chunk)
        try:
            await run_in_threadpool(_check, path, cfg, in_channels)
        except CheckpointError as exc:
            raise ApiProblem(422, str(exc), type_="urn:nnm:problem:invalid-checkpoint") from None
        await run_in_threadpool(gw.ctx.store.put_file, backbone_key(user, backbone_id), path)
    return BackboneOut(id=backbone_id, arch=cfg.arch, width=cfg.width, in_channels=in_channels,
                       init=f"backbone:{backbone_id}")
