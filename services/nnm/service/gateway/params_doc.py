"""Typed `params` in the OpenAPI document: the engine's configuration models, as the API takes them.

A job's `params` is a preset name and overrides of any engine setting, merged over the preset by the
gateway (`jobspec.resolve`, which also gives the precise 422s). The request model keeps it a JSON
object for that; the document describes it with the engine's own models, so that client generators
get real types: every section and field the engine knows, none required (the preset fills what is
left out), unknown keys refused, and the places the service chooses (`data.root`, `data.dataset`,
the decoded-image cache's directory and bound) left out. `JobOut.config`, the whole resolved
configuration, is the engine's `PipelineConfig`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from ..jobspec import WORKER_PATHS

REF = "#/components/schemas/"
#: Settings a caller cannot give: the service picks where the data lies.
HIDDEN = {"DataConfig": WORKER_PATHS["data"]}

EXAMPLE = {"preset": "cpu", "pretext": {"epochs": 100}, "cluster": {"clusters": "auto"}, "runtime": {"seed": 1}}


def _params_name(config_name: str) -> str:
    return config_name.removesuffix("Config") + "Params"


def _partial(schema: dict[str, Any], name: str) -> dict[str, Any]:
    """An engine model's schema as overrides: nothing required, no defaults (the preset's win), refs to
    the partial versions of nested models."""
    out = copy.deepcopy(schema)
    out.pop("required", None)
    out["title"] = _params_name(name)
    for field in HIDDEN.get(name, ()):
        out.get("properties", {}).pop(field, None)

    for node in _objects(out.get("properties", {})):
        node.pop("default", None)
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(REF):
            node["$ref"] = REF + _params_name(ref[len(REF):])
    out["description"] = (schema.get("description") or "").strip() + (
        " Overrides of the preset: leave a field out to keep the preset's value.")
    return out


def _objects(node: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object in a schema tree, each before its children (which it may change)."""
    if isinstance(node, dict):
        yield node
        children = list(node.values())
    elif isinstance(node, list):
        children = node
    else:
        return
    for child in children:
        yield from _objects(child)


def _const_as_enum(tree: Any) -> None:
    """`{"const": "auto"}` -> `{"enum": ["auto"]}`: the same values, and client generators (e.g.
    openapi-python-client) parse a one-value enum inside `anyOf` where they mishandle a const."""
    for node in _objects(tree):
        if "const" in node:
            node["enum"] = [node.pop("const")]


def document_params(spec: dict[str, Any]) -> dict[str, Any]:
    """Describe `JobCreate.params` and `JobOut.params` as `JobParams`, `JobOut.config` as `PipelineConfig`."""
    from nnm.engine.config import PipelineConfig
    from nnm.engine.presets import PRESETS

    full = PipelineConfig.model_json_schema(ref_template=REF + "{model}")
    _const_as_enum(full)
    defs = full.pop("$defs", {})
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["PipelineConfig"] = full
    for name, schema in defs.items():
        schemas[name] = schema
        schemas[_params_name(name)] = _partial(schema, name)
    sections = {key: {"$ref": REF + _params_name(prop["$ref"][len(REF):])}
                for key, prop in full["properties"].items() if "$ref" in prop}
    schemas["JobParams"] = {
        "title": "JobParams",
        "type": "object",
        "description": "A preset and overrides of any engine setting, merged over the preset for the job's "
                       "dataset. `runtime.device` is fixed by the service when the job is submitted.",
        "properties": {"preset": {"type": "string", "enum": list(PRESETS), "default": "auto",
                                  "description": "auto: `fast` on a GPU worker, `cpu` otherwise"}, **sections},
        "additionalProperties": False,
        "examples": [EXAMPLE],
    }
    params = {"$ref": REF + "JobParams"}
    schemas["JobCreate"]["properties"]["params"] = params
    schemas["JobCreate"]["examples"] = [{"type": "pipeline", "dataset_id": "ds_0123456789abcdef0123456789abcdef",
                                         "params": EXAMPLE}]
    schemas["JobOut"]["properties"]["params"] = params
    schemas["JobOut"]["properties"]["config"] = {"anyOf": [{"$ref": REF + "PipelineConfig"}, {"type": "null"}],
                                                 "description": "The whole engine configuration the job trains "
                                                                "with, resolved when it was submitted."}
    return spec
