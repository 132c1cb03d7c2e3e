"""The mloc/v1 task specification: typed models per task type, loading and JSON Schema."""

from __future__ import annotations

from typing import Any, cast

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

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
        schema = document_model(task_type).model_json_schema(
            by_alias=True, ref_template="#/$defs/{model}", schema_generator=_AliasesToo
        )
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


class _AliasesToo(GenerateJsonSchema):
    """The schema generator that also lists the other names a field accepts (its ``AliasChoices``:
    ``batch_size`` for ``per_device_train_batch_size``). Without them an editor flags the shipped
    templates, which use the short names, while ``additionalProperties: false`` stays right about
    typos. A field given under two of its names is refused, as the validator refuses it."""

    def model_fields_schema(self, schema: core_schema.ModelFieldsSchema) -> JsonSchemaValue:
        json_schema = super().model_fields_schema(schema)
        properties: dict[str, Any] = json_schema.get("properties", {})
        both: dict[str, Any] = {}
        for name, field in schema["fields"].items():
            canonical = self._get_alias_name(field, name)
            if canonical not in properties:
                continue
            for other in _alias_choices(field):
                if other != canonical and other not in properties:
                    shape = {key: value for key, value in properties[canonical].items() if key != "default"}
                    properties[other] = {**shape, "description": f"Another name for {canonical}."}
                    both[other] = {"not": {"required": [canonical]}}
        if both:
            json_schema["dependentSchemas"] = both
        return json_schema


def _alias_choices(field: core_schema.ModelField) -> list[str]:
    """The names an ``AliasChoices`` validation alias accepts (paths into nested data left out)."""
    alias = field.get("validation_alias")
    if not isinstance(alias, list):
        return []
    return [path[0] for path in cast(list[list[Any]], alias) if len(path) == 1 and isinstance(path[0], str)]
