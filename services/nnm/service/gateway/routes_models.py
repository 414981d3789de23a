"""/v1/models: trained models, and assignment of uploaded images to their clusters."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from api_schemas import Assignment, ModelList, ModelOut
from nnm.engine.data import LoadLimits, PixelBudgetError
from nnm.engine.errors import NNMError
from nnm.engine.stages.assign import decode_for_model, describe_assignments

from ..store.retention import remove_files
from .assign_batcher import AssignBatcher, Overloaded
from .convert import model_out
from .deps import Gateway, caller, gateway, owner, paged
from .model_cache import ModelCache
from .problems import ApiProblem, check_deleted

router = APIRouter(prefix="/v1/models", tags=["models"])
#: Assignment is the gateway's hot route (hundreds of small requests a second): it authenticates inline
#: (`caller`) rather than through the router's dependencies, and the app includes it without them.
assign_router = APIRouter(prefix="/v1/models", tags=["models"])

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


class _SmallSpoolParser(MultiPartParser):
    """Starlette's multipart parser, keeping at most 64 KiB of each uploaded file in memory (not 1 MiB):
    up to `max_assign_files` files are open at once, and the rest of each goes to a temporary file."""

    spool_max_size = 64 * 1024


async def _parse_files(request: Request, max_files: int) -> FormData:
    """The multipart form of an assign request (400 problem when it is malformed or has too many parts)."""
    try:
        return await _SmallSpoolParser(
            request.headers, request.stream(), max_files=max_files, max_fields=max_files + 10
        ).parse()
    except MultiPartException as exc:
        raise ApiProblem(400, exc.message) from None  # what `request.form()` answers


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


@assign_router.post(
    "/{model_id}/assign",
    response_model=list[Assignment],
    openapi_extra=ASSIGN_DOC | {"security": [{"HTTPBearer": []}]},
    summary="Cluster and confidence of each uploaded image",
    responses={503: {"description": "Too many images waiting for the model (Retry-After: 1), or a store is down"}},
)
async def assign(model_id: str, request: Request) -> JSONResponse:
    user = (await caller(request)).owner
    gw: Gateway = request.app.state.gateway
    cache: ModelCache = gw.models  # type: ignore[assignment]
    row = cache.fresh_row(model_id, user)
    if row is None:  # only a record read from the database now starts a new trust period
        row = await run_in_threadpool(gw.ctx.jobs.get_model, model_id, user)
        if row is None:
            raise ApiProblem(404, f"no model '{model_id}'")
        cache.remember_row(row)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise ApiProblem(
            415,
            "send the images as multipart/form-data in the field 'files'",
            type_="urn:nnm:problem:unsupported-media-type",
        )
    limit = gw.ctx.settings.max_assign_files
    form = await _parse_files(request, limit)
    try:
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not files:
            raise ApiProblem(
                422,
                "files: upload at least one image in the multipart field 'files'",
                type_="urn:nnm:problem:validation",
            )
        # The spooled upload files themselves go to the decoder: no file is read whole into memory.
        images = [(f.filename or f"file{i}", f.file) for i, f in enumerate(files)]
        model = cache.cached(row.id) or await run_in_threadpool(cache.get, row)
        s = gw.ctx.settings
        limits = LoadLimits(max_image_pixels=s.max_image_pixels, max_total_pixels=s.max_assign_pixels)
        try:
            pixels = await run_in_threadpool(decode_for_model, model, images, limits)
        except PixelBudgetError as exc:
            raise ApiProblem(413, str(exc), type_="urn:nnm:problem:too-large") from None
        except NNMError as exc:
            raise ApiProblem(422, str(exc), type_="urn:nnm:problem:invalid-image") from None
        assigner: AssignBatcher = gw.assigner
        try:  # with the other requests' images of this model, in one forward pass
            probs = await assigner.classify(row.id, model, pixels)
        except Overloaded as exc:
            raise ApiProblem(503, str(exc), type_="urn:nnm:problem:overloaded", headers={"Retry-After": "1"}) from None
        results = describe_assignments(model, [name for name, _ in images], probs)
    finally:
        await form.close()
    # Built directly (the fields are Assignment's): validating hundreds of answers a second through the
    # response model costs the event loop more than the forward pass.
    return JSONResponse([{"filename": r["image"], "cluster": r["cluster"], "confidence": r["confidence"],
                          "class_name": r.get("class_name")} for r in results])


@router.delete("/{model_id}", status_code=204, response_class=Response, summary="Delete a model (its job stays)",
               responses={409: {"description": "A queued or running job uses it"}})
def delete_model(
    model_id: str, gw: Annotated[Gateway, Depends(gateway)], user: Annotated[str, Depends(owner)]
) -> Response:
    outcome, row, users = gw.ctx.jobs.delete_model(model_id, user)
    check_deleted(outcome, "model", model_id, users)
    gw.models.evict(model_id)
    remove_files(gw.ctx, f"{row.key_prefix.rstrip('/')}/")
    return Response(status_code=204)
