"""The OpenAPI document: every JSON response of every endpoint carries an example, and the examples
are valid bodies of the response models (so they cannot drift from the API contract)."""

from __future__ import annotations

import httpx
from pydantic import BaseModel

from app import schemas
from tests.conftest import Server


def _has_example(content: dict, components: dict) -> bool:
    if "example" in content or "examples" in content:
        return True
    ref = content.get("schema", {}).get("$ref", "")
    return bool(ref) and "examples" in components[ref.rsplit("/", 1)[-1]]


def test_every_json_response_has_an_example(server: Server) -> None:
    spec = httpx.get(server.url + "/openapi.json").json()
    components = spec["components"]["schemas"]
    missing, seen = [], 0
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for status, resp in op["responses"].items():
                content = resp.get("content", {}).get("application/json")
                if content is not None:
                    seen += 1
                    if not _has_example(content, components):
                        missing.append(f"{method.upper()} {path} {status}")
    assert seen >= 10 and missing == []
    # The thumbnail answers a JPEG, and its errors are documented.
    thumb = spec["paths"]["/images/{image_id}/thumbnail"]["get"]["responses"]
    assert "image/jpeg" in thumb["200"]["content"] and {"404", "503"} <= thumb.keys()


def test_examples_are_valid_bodies() -> None:
    models = [
        m for m in vars(schemas).values() if isinstance(m, type) and issubclass(m, BaseModel) and m is not BaseModel
    ]
    for model in models:
        examples = model.model_json_schema().get("examples", [])
        assert examples, f"{model.__name__} has no example"
        for example in examples:
            assert set(example) <= set(model.model_fields), f"{model.__name__}: unknown field in {example}"
            model.model_validate(example)  # raises on a missing or mistyped field


def test_error_examples_have_the_error_shape(server: Server) -> None:
    spec = httpx.get(server.url + "/openapi.json").json()
    for ops in spec["paths"].values():
        for op in ops.values():
            for status, resp in op["responses"].items():
                examples = resp.get("content", {}).get("application/json", {}).get("examples", {})
                for name, ex in examples.items():
                    if int(status) >= 400:
                        body = schemas.ErrorResponse.model_validate(ex["value"])
                        assert body.code == name
