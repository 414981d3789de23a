"""/v1/admin/keys: create, list and revoke API keys over HTTP (the `admin` scope), so that managing
keys needs no shell on a gateway pod and no database access."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response
from fastapi.concurrency import run_in_threadpool

from api_schemas import IdText, KeyCreate, KeyCreated, KeyList, KeyOut

from ..store.db import ApiKeyRow
from .deps import Gateway, administrator, gateway
from .problems import ApiProblem

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(administrator)])


def key_out(row: ApiKeyRow) -> KeyOut:
    return KeyOut(id=row.id, name=row.name, scopes=list(row.scopes or ()), max_running_jobs=row.max_running_jobs,
                  max_queued_jobs=row.max_queued_jobs, uploads_per_minute=row.uploads_per_minute,
                  created_at=row.created_at, revoked_at=row.revoked_at)


@router.post("/keys", status_code=201, response_model=KeyCreated,
             summary="Create an API key; the answer holds the key, which is never shown again")
async def create_key(body: KeyCreate, gw: Annotated[Gateway, Depends(gateway)]) -> KeyCreated:
    key, row = await run_in_threadpool(gw.keys.create, body.name, list(body.scopes), body.max_running_jobs,
                                       body.max_queued_jobs, body.uploads_per_minute)
    gw.key_created()
    return KeyCreated(**key_out(row).model_dump(), key=key)


@router.get("/keys", response_model=KeyList, summary="List API keys, revoked ones included (never the keys)")
async def list_keys(gw: Annotated[Gateway, Depends(gateway)]) -> KeyList:
    rows = await run_in_threadpool(gw.keys.list)
    return KeyList(items=[key_out(row) for row in rows])


@router.delete("/keys/{key_id}", status_code=204, response_class=Response,
               summary="Revoke an API key (its record stays; what it created stays with it)")
async def revoke_key(key_id: Annotated[IdText, Path()], gw: Annotated[Gateway, Depends(gateway)]) -> Response:
    if not await run_in_threadpool(gw.keys.revoke, key_id):
        raise ApiProblem(404, f"no active key '{key_id}'")
    return Response(status_code=204)
