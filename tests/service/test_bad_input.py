"""Bad input gets a 4xx problem+json naming what is wrong, and nothing is stored."""

from __future__ import annotations

import io
import stat
import zipfile

import httpx
import numpy as np
import pytest
import torch
from nnm.engine.config import BackboneConfig
from nnm.engine.models import ContrastiveModel, build_backbone
from PIL import Image
from test_data import bomb_png

from .conftest import digits_zip

pytestmark = pytest.mark.slow


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def zipped(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def snapshot(infra, client) -> tuple[set, set]:
    keys = {o.object_name for o in infra["s3"]["client"].list_objects("nnm", prefix="datasets/", recursive=True)}
    ids = {d["id"] for d in client.http.get("/v1/datasets", params={"limit": 200}).json()["items"]}
    return keys, ids


def expect_problem(r: httpx.Response, status: int, *fragments: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    for f in fragments:
        assert f in body["detail"], body["detail"]


SMALL = png(np.zeros((8, 8), np.uint8))
CASES = {
    "corrupt image": (zipped({"a/ok.png": SMALL, "a/broken.png": SMALL[:40]}), 422, ["broken.png"]),
    "non-image with an image extension": (zipped({"a/ok.png": SMALL, "a/notes.jpg": b"plain text"}), 422,
                                          ["notes.jpg", "not a readable image"]),
    "decompression bomb": (zipped({"a/ok.png": SMALL, "a/bomb.png": bomb_png(20000, 20000)}), 422,
                           ["bomb.png", "pixels"]),
    "image far too large": (zipped({"a/big.png": png(np.zeros((2100, 2100), np.uint8))}), 422,
                            ["big.png", "2100x2100"]),
    "empty zip": (zipped({}), 422, ["no images found"]),
    "zip slip": (zipped({"../evil.png": SMALL}), 422, ["'../evil.png'", "parent"]),
    "absolute path": (zipped({"/etc/evil.png": SMALL}), 422, ["absolute"]),
    "zip bomb": (zipped({"a/bomb.png": b"\0" * 60_000_000}), 422, ["uncompressed"]),
    "too many files": (zipped({f"a/{i}.png": SMALL for i in range(1001)}, zipfile.ZIP_STORED), 422, ["1001", "limit"]),
    "not a zip": (b"this is not an archive", 422, ["not a readable .zip"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_uploads_are_refused_and_nothing_is_stored(case, client, infra):
    body, status, fragments = CASES[case]
    before = snapshot(infra, client)
    r = client.http.post("/v1/datasets", files={"file": ("upload.zip", body, "application/zip")})
    expect_problem(r, status, *fragments)
    assert snapshot(infra, client) == before


def test_zip_with_a_symlink_is_refused(client, infra):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("a/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
    expect_problem(client.http.post("/v1/datasets", files={"file": ("l.zip", buf.getvalue(), "application/zip")}),
                   422, "symbolic link")


def test_upload_over_the_size_limit_gets_413(client, infra):
    before = snapshot(infra, client)
    r = client.http.post("/v1/datasets", files={"file": ("big.zip", b"\0" * 21_000_000, "application/zip")})
    expect_problem(r, 413, "larger than the limit")
    assert snapshot(infra, client) == before


def test_malformed_json_and_wrong_content_types(client):
    expect_problem(client.http.post("/v1/jobs", content=b'{"type": "pipeline",', headers={
        "content-type": "application/json"}), 400, "not valid JSON")
    expect_problem(client.http.post("/v1/datasets", content=b"<xml/>", headers={"content-type": "application/xml"}),
                   415, "application/xml")
    expect_problem(client.http.post("/v1/jobs", content=b"type=pipeline", headers={
        "content-type": "application/x-www-form-urlencoded"}), 422)


def test_invalid_job_parameters(client, uploaded_digits, worker):
    ds = uploaded_digits["id"]

    def post(body):
        return client.http.post("/v1/jobs", json=body)

    expect_problem(post({"type": "pipeline", "dataset_id": ds, "params": {"pretext": {"epochs": -3}}}), 422,
                   "pretext.epochs")
    expect_problem(post({"type": "pipeline", "dataset_id": ds, "params": {"cluster": {"clusters": 1}}}), 422,
                   "cluster.clusters")
    expect_problem(post({"type": "pipeline", "dataset_id": ds, "params": {"cluster": {"clusters": 5000}}}), 422,
                   "5000 clusters")
    expect_problem(post({"type": "pipeline", "dataset_id": ds, "params": {"cluster": {"clusters": "many"}}}), 422,
                   "cluster.clusters")
    expect_problem(post({"type": "cluster", "dataset_id": ds, "params": {"cluster": {"clusters": "auto"}}}), 422,
                   "'auto' is estimated by a pipeline job")
    backwards = {"cluster": {"clusters": "auto"}, "estimate": {"min_clusters": 9, "max_clusters": 4}}
    expect_problem(post({"type": "pipeline", "dataset_id": ds, "params": backwards}), 422,
                   "min_clusters (9) exceeds max_clusters (4)")
    expect_problem(post({"type": "pipeline", "dataset_id": ds, "params": {"preset": "nope"}}), 422, "unknown preset")
    expect_problem(post({"type": "pipeline", "dataset_id": "ds_unknown"}), 422, "no dataset")
    expect_problem(post({"type": "mine", "dataset_id": ds, "inputs": {"pretext_job_id": "job_unknown"}}), 422,
                   "not an id")
    expect_problem(post({"type": "mine", "dataset_id": ds, "inputs": {"pretext_job_id": "job_" + "0" * 32}}), 422,
                   "no job")
    expect_problem(post({"type": "pipeline", "dataset_id": ds, "params": {"pretext": {"init": "/etc/passwd"}}}), 422,
                   "uploaded backbone")
    # A pretext job of another dataset cannot feed this one.
    other = client.builtin_dataset("digits")
    pre = client.wait(client.submit("pretext", other["id"], {"preset": "quick", "pretext": {"epochs": 1}})["id"],
                      timeout=300)
    assert pre["status"] == "succeeded"
    expect_problem(post({"type": "mine", "dataset_id": ds, "inputs": {"pretext_job_id": pre["id"]}}), 422,
                   "another dataset")


class Payload:
    """Unpickling this would import and build an arbitrary object: weights_only loading refuses it."""


def test_uploaded_checkpoint_must_be_a_plain_state_dict(client, tmp_path):
    evil = io.BytesIO()
    torch.save({"model": Payload()}, evil)
    r = client.http.post("/v1/backbones", files={"file": ("evil.pt", evil.getvalue())}, data={"width": "16"})
    expect_problem(r, 422, "not a readable PyTorch weights file")
    wrong = io.BytesIO()
    torch.save(build_backbone(BackboneConfig(width=8), 3).state_dict(), wrong)
    expect_problem(client.http.post("/v1/backbones", files={"file": ("w.pt", wrong.getvalue())},
                                    data={"width": "16"}), 422, "does not fit")
    garbage = client.http.post("/v1/backbones", files={"file": ("g.pt", b"garbage")})
    expect_problem(garbage, 422, "not a readable PyTorch weights file")
    good = io.BytesIO()
    torch.save(ContrastiveModel(build_backbone(BackboneConfig(width=16), 1)).state_dict(), good)
    r = client.http.post("/v1/backbones", files={"file": ("simclr.pt", good.getvalue())},
                         data={"width": "16", "in_channels": "1"})
    assert r.status_code == 201, r.text
    assert r.json()["init"].startswith("backbone:")


def test_uploaded_backbone_starts_a_pipeline(client, worker, tmp_path):
    weights = io.BytesIO()
    torch.save(ContrastiveModel(build_backbone(BackboneConfig(width=16), 1)).state_dict(), weights)
    bb = client.http.post("/v1/backbones", files={"file": ("simclr.pt", weights.getvalue())},
                          data={"width": "16", "in_channels": "1"}).json()
    path = tmp_path / "d.zip"
    path.write_bytes(digits_zip(200))
    ds = client.upload_dataset(path)
    params = {"preset": "quick", "pretext": {"init": bb["init"], "epochs": 0, "backbone": {"width": 16}},
              "cluster": {"epochs": 1}, "selflabel": {"epochs": 1}}
    final = client.wait(client.submit("pipeline", ds["id"], params)["id"], timeout=600)
    assert final["status"] == "succeeded", final["error"]
    assert final["stages"][0] == {**final["stages"][0], "name": "pretext", "status": "succeeded"}
