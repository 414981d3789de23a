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


def test_operation_ids_are_stable_names(tmp_path):
    """Client generators name methods after operationIds: the route functions' names, unique, never
    derived from the path (FastAPI's default changes whenever a path does)."""
    import re

    spec = build_openapi(tmp_path)
    ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)), sorted(ids)
    assert all(re.fullmatch(r"[a-z][a-z_]*[a-z]", i) for i in ids), ids
    assert spec["paths"]["/v1/jobs"]["post"]["operationId"] == "create_job"
    assert spec["paths"]["/v1/models/{model_id}/assign"]["post"]["operationId"] == "assign"


def test_every_problem_is_declared_with_the_schema_the_server_sends(tmp_path):
    spec = build_openapi(tmp_path)
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "HTTPValidationError" not in json.dumps(spec)
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            codes = {int(c) for c in op["responses"] if 400 <= int(c) < 600}
            if path.startswith("/v1/"):
                wanted = {401, 403, 422, 503} | ({404} if "{" in path else set())
                wanted |= {400, 413} if "requestBody" in op else set()
                assert wanted <= codes, f"{method} {path}: {sorted(wanted - codes)} undeclared"
            for code in codes:
                content = op["responses"][str(code)]["content"]
                assert set(content) == {"application/problem+json"}, (method, path, code)
                body = content["application/problem+json"]
                assert body["schema"] == {"$ref": "#/components/schemas/Problem"}
                assert body["example"]["status"] == code
    assert spec["paths"]["/v1/jobs"]["post"]["responses"].keys() >= {"409", "429"}
    assert "429" in spec["paths"]["/v1/datasets"]["post"]["responses"]


def test_real_problems_match_the_declared_schema(tmp_path):
    """Answers of the running app (no key, bad JSON, unknown job, validation) validate against the
    document's Problem schema and carry the status they were declared with."""
    import jsonschema
    from fastapi.testclient import TestClient
    from nnm.service.context import ServiceContext
    from nnm.service.gateway.app import create_app
    from nnm.service.settings import load_settings

    spec = build_openapi(tmp_path / "doc")
    problem = spec["components"]["schemas"]["Problem"]
    ctx = ServiceContext.from_settings(load_settings(env={}, data_dir=tmp_path / "svc", auth="required"),
                                       migrate=True)
    from nnm.service.auth import KeyStore

    key, _ = KeyStore(ctx.jobs).create("reader", ["read"])
    try:
        with TestClient(create_app(ctx, reconcile_interval_s=0)) as client:
            auth = {"Authorization": f"Bearer {key}"}
            answers = {
                ("get", "/v1/jobs"): client.get("/v1/jobs"),
                ("get", "/v1/jobs/{job_id}"): client.get("/v1/jobs/job_nope", headers=auth),
                ("post", "/v1/jobs"): client.post("/v1/jobs", content=b"{nope", headers=auth),
                ("get", "/v1/datasets"): client.get("/v1/datasets?limit=0", headers=auth),
            }
            for (method, path), r in answers.items():
                assert r.headers["content-type"].startswith("application/problem+json"), r.text
                body = r.json()
                jsonschema.validate(body, problem)
                assert body["status"] == r.status_code
                assert str(r.status_code) in spec["paths"][path][method]["responses"], (method, path, r.status_code)
            assert [r.status_code for r in answers.values()] == [401, 404, 403, 422]
    finally:
        ctx.close()


def test_the_python_client_calls_only_documented_operations(tmp_path):
    """services/nnm/service/client.py is hand-written: every request it makes is an operation of the
    document (method and path template)."""
    import re

    spec = build_openapi(tmp_path)
    source = (Path(__file__).resolve().parents[2] / "services" / "nnm" / "service" / "client.py").read_text()
    calls = re.findall(r"self\.http\.(get|post|delete|put|patch)\(\s*f?\"([^\"]+)\"", source)
    assert len(calls) >= 7, calls
    templates = {(m, re.sub(r"\{[^}]+\}", "{}", p)) for p, ops in spec["paths"].items() for m in ops}
    for method, path in calls:
        assert (method, re.sub(r"\{[^}]+\}", "{}", path)) in templates, f"{method.upper()} {path} is not documented"


def test_params_are_typed_from_the_engine_config(tmp_path):
    """`params` is documented with the engine's models (overrides: nothing required, unknown keys refused,
    the worker's paths left out), and `config` as the engine's PipelineConfig; real settings validate."""
    import jsonschema
    from nnm.engine.config import PipelineConfig
    from nnm.engine.pipeline import resolve_config
    from nnm.engine.presets import PRESETS

    from .conftest import FAST_PIPELINE

    spec = build_openapi(tmp_path)
    schemas = spec["components"]["schemas"]
    assert schemas["JobCreate"]["properties"]["params"] == {"$ref": "#/components/schemas/JobParams"}
    assert schemas["JobOut"]["properties"]["params"] == {"$ref": "#/components/schemas/JobParams"}
    params = schemas["JobParams"]
    assert set(params["properties"]) == {"preset", *PipelineConfig.model_fields}
    assert params["properties"]["preset"]["enum"] == list(PRESETS)
    for name, schema in schemas.items():
        if name.endswith("Params") and name != "JobParams":
            assert "required" not in schema and schema["additionalProperties"] is False, name
    assert not {"root", "dataset", "cache_dir", "cache_max_bytes"} & set(schemas["DataParams"]["properties"])
    assert "cache" in schemas["DataParams"]["properties"]

    def validator(name):
        return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", **spec})

    ok = validator("JobParams")
    for good in (FAST_PIPELINE, params["examples"][0], {"cluster": {"clusters": 7}}, {}):
        ok.validate(good)
    for bad in ({"pretext": {"epoch": 3}}, {"preset": "turbo"}, {"data": {"root": "/etc"}},
                {"pretext": {"epochs": -1}}, {"cluster": {"clusters": "many"}}, {"color": "blue"}):
        assert not ok.is_valid(bad), bad
    full = validator("PipelineConfig")
    for preset in PRESETS:
        config = resolve_config("digits", preset, {}).model_dump(mode="json")
        full.validate(config)
        ok.validate({k: v for k, v in config.items() if k != "data"})
    ok.validate(schemas["JobCreate"]["examples"][0]["params"])
