"""The generated OpenAPI document, made to tell the truth about validation errors.

FastAPI documents its own 422 body (HTTPValidationError) on every endpoint with parameters, but this
service answers them as {code, detail} (app/errors.py); the document says so, with an example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app.errors import documented

_FASTAPI_422 = "#/components/schemas/HTTPValidationError"


def _invalid(op: dict[str, Any]) -> dict[str, Any]:
    """The 422 entry of an operation, its example naming the operation's first parameter."""
    params = op.get("parameters") or [{"in": "body", "name": "file", "schema": {}}]
    p = params[0]
    detail = f"{p['in']}.{p['name']}: Input should be a valid {p.get('schema', {}).get('type', 'value')}"
    out = documented("invalid_request", example={"invalid_request": detail})[422]
    del out["model"]  # a plain OpenAPI entry here, not FastAPI's shorthand
    out["content"]["application/json"]["schema"] = {"$ref": "#/components/schemas/ErrorResponse"}
    return out


def _fix_validation_errors(spec: dict[str, Any]) -> None:
    for ops in spec.get("paths", {}).values():
        for op in ops.values():
            resp = op.get("responses", {}).get("422")
            schema = (resp or {}).get("content", {}).get("application/json", {}).get("schema", {})
            if schema.get("$ref") == _FASTAPI_422:
                op["responses"]["422"] = _invalid(op)
    components = spec.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)


def install_openapi(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = app.openapi_schema
        if schema is None:
            schema = generate()  # cached by FastAPI: the very dict app.openapi_schema now holds
            _fix_validation_errors(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_docs(app: FastAPI) -> None:
    """/docs from files shipped in a Python package (fastapi-offline's copy of Swagger UI 5): FastAPI's
    own page loads them from a CDN, and the machines that run this have no internet. (No /redoc: its
    page fetches a logo from its vendor's CDN.)"""
    import fastapi_offline  # only for the location of its static files

    static = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/docs-static", StaticFiles(directory=static), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} — API docs",
            swagger_js_url="/docs-static/swagger-ui-bundle.js",
            swagger_css_url="/docs-static/swagger-ui.css",
            swagger_favicon_url="/docs-static/favicon.png",
        )
