"""/v1/models: trained models, and assignment of uploaded images to their clusters."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api_schemas import Assignment, ModelList, ModelOut
from nnm.engine.config import RuntimeConfig
from nnm.engine.data import LoadLimits
from nnm.engine.errors import NNMError
from nnm.engine.stages.assign import assign_images

from .convert import model_out
from .deps import Gateway, gateway, owner, paged
from .model_cache import ModelCache
from .problems import ApiProblem

router = APIRouter(prefix="/v1/models", tags=["models"])

ASSIGN_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            }
        },
    }
}


@router.get("", response_model=ModelList, summary="List trained models (newest first)")
def list_models(
    gw: Annotated[Gateway, Depends(gateway)],
    user: Annotated[str, Depends(owner)],
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> ModelList:
    rows, nxt = paged(lambda c, n: gw.ctx.jobs.list_models(user, c, n), cursor, limit)
    return ModelList(items=[model_out(r) for r in rows], next_cursor=nxt)


@router.get("/{model_id}", response_model=ModelOut, summary="One model")
def get_model(
    model_id: str, gw: Annotated[Gateway, Depends(gateway)], user: Annotated[str, Depends(owner)]
) -> ModelOut:
    row = gw.ctx.jobs.get_model(model_id, user)
    if row is None:
        raise ApiProblem(404, f"no model '{model_id}'")
    return model_out(row)


@router.post(
    "/{model_id}/assign",
    response_model=list[Assignment],
    openapi_extra=ASSIGN_DOC,
    summary="Cluster and confidence of each uploaded image",
)
async def assign(
    model_id: str, request: Request, gw: Annotated[Gateway, Depends(gateway)], user: Annotated[str, Depends(owner)]
) -> list[Assignment]:
    row = gw.ctx.jobs.get_model(model_id, user)
    if row is None:
        raise ApiProblem(404, f"no model '{model_id}'")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise ApiProblem(
            415,
            "send the images as multipart/form-data in the field 'files'",
            type_="urn:nnm:problem:unsupported-media-type",
        )
    limit = gw.ctx.settings.max_assign_files
    form = await request.form(max_files=limit, max_fields=limit + 10)
    files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    if not files:
        raise ApiProblem(
            422, "files: upload at least one image in the multipart field 'files'", type_="urn:nnm:problem:validation"
        )
    images = [(f.filename or f"file{i}", await f.read()) for i, f in enumerate(files)]
    cache: ModelCache = gw.models  # type: ignore[assignment]
    model = await run_in_threadpool(cache.get, row)
    limits = LoadLimits(max_image_pixels=gw.ctx.settings.max_image_pixels)
    try:
        results = await run_in_threadpool(assign_images, model, images, RuntimeConfig(device="cpu"), 256, limits)
    except NNMError as exc:
        raise ApiProblem(422, str(exc), type_="urn:nnm:problem:invalid-image") from None
    return [
        Assignment(
            filename=r["image"], cluster=r["cluster"], confidence=r["confidence"], class_name=r.get("class_name")
        )
        for r in results
    ]
