"""/v1/jobs/{id}/clusters and /images: browse what a clustering found, page by page."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from api_schemas import ClusterList, ClusterOut, GalleryImage, GalleryImageDetail, GalleryPage

from .deps import Gateway, gateway, owner
from .gallery_cache import Gallery
from .problems import ApiProblem
from .routes_jobs import owned_job

router = APIRouter(prefix="/v1/jobs", tags=["clusters"])


def _gallery(gw: Gateway, job_id: str, user: str) -> Gallery:
    owned_job(gw, job_id, user)
    gallery = gw.galleries.get(job_id)
    if gallery is None:
        raise ApiProblem(404, f"job '{job_id}' has no cluster gallery (it has not finished evaluating, or it was "
                              "run before galleries existed)", type_="urn:nnm:problem:no-gallery")
    return gallery


def _image(gw: Gateway, job_id: str, g: Gallery, i: int, thumbnails: bool) -> GalleryImage:
    return GalleryImage(
        index=int(i),
        name=str(g.name[i]),
        cluster=int(g.cluster[i]),
        confidence=round(float(g.confidence[i]), 4),
        label=g.label_name(int(i)),
        thumbnail=gw.galleries.thumbnail(job_id, g, int(i)) if thumbnails else None,
    )


Thumbnails = Annotated[bool, Query(description="Include each image's thumbnail as a PNG data URI")]


@router.get("/{job_id}/clusters", response_model=ClusterList, summary="The clusters a job found, with prototypes")
def list_clusters(
    job_id: str, gw: Annotated[Gateway, Depends(gateway)], user: Annotated[str, Depends(owner)],
    thumbnails: Thumbnails = True,
) -> ClusterList:
    g = _gallery(gw, job_id, user)
    s = g.summary
    clusters = [
        ClusterOut(
            cluster=row["cluster"], size=row["size"], mean_confidence=row["mean_confidence"],
            majority_class=row.get("majority_class"), purity=row.get("purity"),
            prototypes=[_image(gw, job_id, g, i, thumbnails) for i in row.get("prototypes", [])],
        )
        for row in s["clusters"]
    ]
    return ClusterList(job_id=job_id, num_images=len(g), class_names=s.get("class_names"),
                       neighbors=s.get("neighbors", 0), clusters=clusters)


@router.get("/{job_id}/clusters/{cluster}/images", response_model=GalleryPage,
            summary="A cluster's images, most confident first, paged")
def cluster_images(
    job_id: str,
    cluster: Annotated[int, Path(ge=0)],
    gw: Annotated[Gateway, Depends(gateway)],
    user: Annotated[str, Depends(owner)],
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 48,
    thumbnails: Thumbnails = True,
) -> GalleryPage:
    g = _gallery(gw, job_id, user)
    if cluster >= g.summary["num_clusters"]:
        raise ApiProblem(404, f"job '{job_id}' has {g.summary['num_clusters']} clusters, numbered from 0")
    idx, total = g.members(cluster, offset, limit)
    nxt = offset + len(idx)
    return GalleryPage(cluster=cluster, total=total, offset=offset,
                       items=[_image(gw, job_id, g, i, thumbnails) for i in idx],
                       next_offset=nxt if nxt < total else None)


@router.get("/{job_id}/images/{index}", response_model=GalleryImageDetail,
            summary="One clustered image and its mined neighbours")
def image_detail(
    job_id: str,
    index: Annotated[int, Path(ge=0)],
    gw: Annotated[Gateway, Depends(gateway)],
    user: Annotated[str, Depends(owner)],
    thumbnails: Thumbnails = True,
) -> GalleryImageDetail:
    g = _gallery(gw, job_id, user)
    if index >= len(g):
        raise ApiProblem(404, f"job '{job_id}' clustered {len(g)} images, numbered from 0")
    near = g.neighbors[index] if g.neighbors is not None else []
    return GalleryImageDetail(image=_image(gw, job_id, g, index, thumbnails),
                              neighbors=[_image(gw, job_id, g, int(j), thumbnails) for j in near if 0 <= j < len(g)])
