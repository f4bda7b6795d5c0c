"""HTTP errors with a stable code; domain errors are turned into them here, in one place."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def _body(code: str, detail: str) -> dict[str, str]:
    return {"code": code, "detail": detail}


ERROR_BODY_SCHEMA = {
    "title": "ErrorResponse",
    "type": "object",
    "required": ["code", "detail"],
    "properties": {
        "code": {"type": "string", "title": "Code", "description": "Stable machine-readable error code"},
        "detail": {"type": "string", "title": "Detail", "description": "Human-readable message"},
    },
}


def _document_validation_errors(app: FastAPI) -> None:
    """The OpenAPI schema must describe the 422 body the handler below sends, {code, detail}, not
    FastAPI's default list of errors, which every route with parameters documents on its own."""
    default_openapi = app.openapi

    def openapi() -> dict:
        schema = default_openapi()  # generated once and cached by FastAPI; patched in place
        components = schema.get("components", {}).get("schemas", {})
        if "HTTPValidationError" in components:
            components["HTTPValidationError"] = ERROR_BODY_SCHEMA
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_handlers(app: FastAPI) -> None:
    _document_validation_errors(app)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_body(exc.code, exc.detail), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            if err.get("type") == "missing" and err.get("loc", ())[:1] == ("body",):
                # Say what to send, not only that something is missing (every body here is a form).
                parts.append(f"{where}: required multipart/form-data field {where!r} is missing")
            else:
                parts.append(f"{where}: {err.get('msg')}")
        return JSONResponse(_body("invalid_request", "; ".join(parts) or "invalid request"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)
