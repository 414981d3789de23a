"""/v1/datasets: upload a .zip of images or name a built-in dataset."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from api_schemas import BuiltinDatasetCreate, DatasetList, DatasetOut, DatasetPreview
from nnm.engine.data import BUILTIN_INFO, FolderSummary, LoadLimits, inspect_image_folder, missing_package
from nnm.engine.errors import DatasetError

from ..store.db import new_id
from ..store.retention import remove_files
from .convert import dataset_out
from .deps import Gateway, gateway, owner, paged
from .gallery_cache import png_data_uri
from .problems import ApiProblem, check_deleted

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": ".zip of images (ImageFolder or flat)",
                        },
                        "name": {"type": "string"},
                    },
                }
            },
            "application/json": {"schema": BuiltinDatasetCreate.model_json_schema()},
        },
    }
}


#: Sample images kept from an upload for the dashboard's list (the first of each class folder first).
PREVIEW_IMAGES = 8


def _preview_json(data: FolderSummary) -> bytes:
    images = [{"name": name, "thumbnail": png_data_uri(pixels.transpose(1, 2, 0))} for name, pixels in data.preview]
    return json.dumps({"images": images}).encode()


def _builtin(body: bytes, user: str, gw: Gateway) -> DatasetOut:
    try:
        req = BuiltinDatasetCreate.model_validate_json(body)
    except ValidationError as err:
        e = err.errors()[0]
        if e["type"] == "json_invalid":
            raise ApiProblem(
                400, "the request body is not valid JSON", type_="urn:nnm:problem:malformed-json"
            ) from None
        loc = ".".join(str(p) for p in e["loc"]) or "body"
        raise ApiProblem(
            422,
            f"{loc}: {e['msg']}",
            type_="urn:nnm:problem:validation",
            errors=[{"loc": [str(p) for p in e["loc"]], "msg": e["msg"]}],
        ) from None
    package = missing_package(req.builtin)
    if package:  # refused now rather than failing every job on it later
        raise ApiProblem(422, f"builtin: dataset '{req.builtin}' needs the {package} package, which this server "
                         "was installed without (the small-data extra)", type_="urn:nnm:problem:validation")
    info = BUILTIN_INFO[req.builtin]
    split = req.split or "train"
    if split not in info.counts:
        raise ApiProblem(
            422,
            f"split: dataset '{req.builtin}' has no split '{split}'; choose one of {', '.join(info.counts)}",
            type_="urn:nnm:problem:validation",
        )
    labelled = split not in info.unlabelled_splits
    row = gw.ctx.jobs.add_dataset(
        owner=user,
        name=req.name or f"{req.builtin}:{split}",
        kind="builtin",
        builtin=req.builtin,
        split=None if split == "train" else split,
        key=None,
        image_count=info.counts[split],
        image_size=info.image_size,
        channels=info.channels,
        classes=list(info.classes) if labelled else None,
        size_bytes=None,
    )
    return dataset_out(row)


async def _upload(request: Request, user: str, gw: Gateway) -> DatasetOut:
    s = gw.ctx.settings
    form = await request.form(max_files=2, max_fields=10)
    file = form.get("file")
    if not isinstance(file, UploadFile):
        raise ApiProblem(
            422,
            "file: a multipart field 'file' holding a .zip of images is required",
            type_="urn:nnm:problem:validation",
        )
    name = check_name(form.get("name") if isinstance(form.get("name"), str) else None)
    limits = LoadLimits(
        max_files=s.max_images,
        max_total_bytes=s.max_uncompressed_bytes,
        max_image_pixels=s.max_image_pixels,
        max_member_bytes=s.max_member_bytes,
        max_total_pixels=s.max_upload_pixels,
    )
    with tempfile.TemporaryDirectory(dir=_tmp_root(gw)) as tmp:
        path = Path(tmp) / "upload.zip"
        size = 0
        with open(path, "wb") as f:
            while chunk := await file.read(1 << 20):
                size += len(chunk)
                f.write(chunk)
        if size == 0:
            raise ApiProblem(422, "file: the uploaded file is empty", type_="urn:nnm:problem:invalid-dataset")
        try:
            # Every image is decoded to check it, one at a time per decode slot, and no pixels are kept:
            # the gateway's memory does not grow with the archive (the worker loads it at the job's size).
            data = await run_in_threadpool(inspect_image_folder, path, limits, PREVIEW_IMAGES)
        except DatasetError as exc:
            raise ApiProblem(
                422, str(exc).replace("upload.zip", file.filename or "upload"), type_="urn:nnm:problem:invalid-dataset"
            ) from None
        dataset_id = new_id("ds")
        key = f"datasets/{dataset_id}/data.zip"
        await run_in_threadpool(gw.ctx.store.put_file, key, path)
        await run_in_threadpool(gw.ctx.store.put_bytes, f"datasets/{dataset_id}/preview.json", _preview_json(data))
    try:
        # The event loop never waits on the database itself (a stalled Postgres would freeze every request).
        row = await run_in_threadpool(
            gw.ctx.jobs.add_dataset,
            id=dataset_id,
            owner=user,
            name=name or printable_name(file.filename or "upload"),
            kind="upload",
            builtin=None,
            split=None,
            key=key,
            image_count=len(data),
            image_size=data.image_size,
            channels=data.channels,
            classes=data.class_names,
            size_bytes=size,
        )
    except Exception:
        # Nothing half-written stays behind.
        await run_in_threadpool(gw.ctx.store.delete_prefix, f"datasets/{dataset_id}/")
        raise
    return dataset_out(row)


MAX_NAME = 200


def check_name(name: str | None) -> str | None:
    """A dataset name as given, or a 422 when it cannot be stored (too long, control characters)."""
    if name is None:
        return None
    if len(name) > MAX_NAME:
        raise ApiProblem(422, f"name: at most {MAX_NAME} characters, got {len(name)}",
                         type_="urn:nnm:problem:validation")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ApiProblem(422, "name: control characters are not allowed", type_="urn:nnm:problem:validation")
    return name


def printable_name(filename: str) -> str:
    """A file name made fit to be a dataset name: control characters dropped, cut to the length limit."""
    return "".join(c for c in filename if ord(c) >= 32 and ord(c) != 127)[:MAX_NAME] or "upload"


def _tmp_root(gw: Gateway) -> str:
    root = gw.ctx.settings.data_dir / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return str(root)


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    openapi_extra=UPLOAD_DOC,
    summary="Upload a .zip of images, or register a built-in dataset",
    responses={429: {"description": "The API key's upload rate limit is reached (Retry-After says when)"}},
)
async def create_dataset(
    request: Request, gw: Annotated[Gateway, Depends(gateway)], user: Annotated[str, Depends(owner)]
) -> DatasetOut:
    principal = request.state.principal
    per_minute = principal.uploads_per_minute or gw.ctx.settings.default_uploads_per_minute
    wait = await run_in_threadpool(gw.uploads.take, principal.owner, per_minute)
    if wait > 0:
        raise ApiProblem(429, f"upload rate limit of {per_minute} per minute reached",
                         type_="urn:nnm:problem:rate-limited", headers={"Retry-After": str(int(wait) + 1)})
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        return await run_in_threadpool(_builtin, await request.body(), user, gw)
    if ctype == "multipart/form-data":
        return await _upload(request, user, gw)
    raise ApiProblem(
        415,
        f"content type '{ctype or 'none'}' is not accepted; send multipart/form-data with a "
        "'file' field or application/json naming a built-in dataset",
        type_="urn:nnm:problem:unsupported-media-type",
    )


@router.get("", response_model=DatasetList, summary="List datasets (newest first)")
def list_datasets(
    gw: Annotated[Gateway, Depends(gateway)],
    user: Annotated[str, Depends(owner)],
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> DatasetList:
    rows, nxt = paged(lambda c, n: gw.ctx.jobs.list_datasets(user, c, n), cursor, limit)
    return DatasetList(items=[dataset_out(r) for r in rows], next_cursor=nxt)


def owned_dataset(gw: Gateway, dataset_id: str, user: str):
    """The dataset if `user` owns it (and it is not deleted); 404 otherwise."""
    row = gw.ctx.jobs.get_dataset(dataset_id, user)
    if row is None:
        raise ApiProblem(404, f"no dataset '{dataset_id}'")
    return row


@router.get("/{dataset_id}", response_model=DatasetOut, summary="One dataset")
def get_dataset(
    dataset_id: str, gw: Annotated[Gateway, Depends(gateway)], user: Annotated[str, Depends(owner)]
) -> DatasetOut:
    return dataset_out(owned_dataset(gw, dataset_id, user))


@router.get("/{dataset_id}/preview", response_model=DatasetPreview,
            summary="A few of an uploaded dataset's images, as PNG data URIs",
            responses={404: {"description": "No such dataset, or a built-in (no preview is kept)"}})
def dataset_preview(
    dataset_id: str, gw: Annotated[Gateway, Depends(gateway)], user: Annotated[str, Depends(owner)]
) -> DatasetPreview:
    row = owned_dataset(gw, dataset_id, user)
    key = f"datasets/{dataset_id}/preview.json"
    if row.kind != "upload" or row.deleted_at is not None or not gw.ctx.store.exists(key):
        raise ApiProblem(404, f"dataset '{dataset_id}' has no preview", type_="urn:nnm:problem:no-preview")
    return DatasetPreview(dataset_id=dataset_id, **json.loads(gw.ctx.store.get_bytes(key)))


@router.delete("/{dataset_id}", status_code=204, response_class=Response, summary="Delete a dataset's images",
               responses={409: {"description": "A queued or running job still needs it"}})
def delete_dataset(
    dataset_id: str, gw: Annotated[Gateway, Depends(gateway)], user: Annotated[str, Depends(owner)]
) -> Response:
    """The images go; the record stays (hidden) for the jobs and models made from it."""
    outcome, row, users = gw.ctx.jobs.delete_dataset(dataset_id, user)
    check_deleted(outcome, "dataset", dataset_id, users)
    if row is not None and row.key:
        remove_files(gw.ctx, f"datasets/{dataset_id}/")
    return Response(status_code=204)
