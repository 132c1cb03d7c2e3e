"""The mloc/v1 task specification: typed models per task type, loading and JSON Schema."""

from __future__ import annotations

from typing import Any

from mloc.spec.base import API_VERSION, Document, SpecBase
from mloc.spec.loader import load, parse_body, validate
from mloc.spec.registry import document_model, spec_types

__all__ = [
    "API_VERSION",
    "Document",
    "SpecBase",
    "document_model",
    "json_schema",
    "load",
    "parse_body",
    "spec_types",
    "validate",
]


def json_schema() -> dict[str, Any]:
    """A JSON Schema covering every task type, for editors and ``mloc schema``."""
    defs: dict[str, Any] = {}
    variants = []
    for task_type in spec_types():
        schema = document_model(task_type).model_json_schema(by_alias=True, ref_template="#/$defs/{model}")
        defs.update(schema.pop("$defs", {}))
        title = schema["title"]
        defs[title] = schema
        variants.append({"$ref": f"#/$defs/{title}"})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://mloc.dev/schema/mloc-v1.json",
        "title": "MLOC task (mloc/v1)",
        "oneOf": variants,
        "$defs": defs,
    }
