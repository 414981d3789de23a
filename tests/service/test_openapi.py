"""The checked-in OpenAPI document matches the app, and the app's contract holds basic rules."""

from __future__ import annotations

import json
from pathlib import Path

from nnm.service.gateway.openapi import build_openapi

SPEC = Path(__file__).resolve().parents[2] / "api_schemas" / "openapi.json"


def test_checked_in_openapi_matches_the_app(tmp_path):
    current = build_openapi(tmp_path)
    assert SPEC.exists(), "run: python -m nnm.service.gateway.openapi"
    assert json.loads(SPEC.read_text()) == current, "api_schemas/openapi.json is stale: regenerate it"


def test_openapi_covers_the_api(tmp_path):
    spec = build_openapi(tmp_path)
    paths = spec["paths"]
    for path in (
        "/v1/datasets",
        "/v1/datasets/{dataset_id}",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/artifacts/{name}",
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/models/{model_id}/assign",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path
    text = json.dumps(spec).lower()
    assert "secret" not in text and "password" not in text
