"""Every error answer of the API, in one table: its code, HTTP status, what it means and an example.

Domain code raises its own exceptions (features/decode.py, features/orb.py, retrieval/live.py,
indexer/store.py); `DOMAIN_ERRORS` says which code each becomes, and the handlers installed here
answer them, so routes neither catch nor translate them. Conditions only the HTTP layer knows (a bad
key, a missing id, an oversized body) raise `ApiError` with a code from the same table. Routes
document their answers with `documented(...)`, from the same table, so docs and answers cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.schemas import ErrorResponse
from common.files import StorageError, StorageFullError
from features.decode import ImageDecodeError, ImageTooComplexError, ImageTooLargeError, UnsupportedFormatError
from features.orb import NoKeypointsError
from indexer.store import RollbackError
from retrieval.live import IdempotencyConflictError, NotReadyError, UnknownImageError


@dataclass(frozen=True)
class ErrorSpec:
    status: int
    meaning: str  # the description in the API docs
    example: str  # an example detail


ERRORS: dict[str, ErrorSpec] = {
    "invalid_image": ErrorSpec(
        400, "The upload is not a decodable image", "not a decodable image (supported: JPEG, PNG, WebP, BMP, TIFF)"
    ),
    "invalid_host": ErrorSpec(
        400,
        "The Host header names no allowed host",
        "Host 'rebound.example:8000' is not served here; allowed: localhost, 127.0.0.1, ::1 (IMGSEARCH_ALLOWED_HOSTS)",
    ),
    "unauthorized": ErrorSpec(401, "No X-API-Key header", "this endpoint needs the X-API-Key header"),
    "forbidden": ErrorSpec(403, "Wrong X-API-Key", "wrong X-API-Key"),
    "admin_locked": ErrorSpec(
        403,
        "No admin key is set and the service is reachable beyond loopback: admin endpoints are closed",
        "admin endpoints are closed: ... set IMGSEARCH_ADMIN_KEY (16+ characters) and send it as X-API-Key",
    ),
    "cross_origin": ErrorSpec(
        403,
        "A browser sent the request on behalf of another site",
        "admin endpoints refuse a request from the origin 'https://elsewhere.example'",
    ),
    "not_found": ErrorSpec(404, "No map image with this id", "no map image with id 7"),
    "image_unavailable": ErrorSpec(
        404, "The map image's file is unavailable", "the file of map image 7 is not available"
    ),
    "no_metrics": ErrorSpec(
        404, "The data folder has no ground truth", "this index was built from data without ground truth"
    ),
    "method_not_allowed": ErrorSpec(405, "Method not allowed", "Method Not Allowed"),
    "rollback_failed": ErrorSpec(
        409,
        "No loadable previous version",
        "the version served before v000012-20261127-190959 is no longer kept; nothing to roll back to",
    ),
    "idempotency_conflict": ErrorSpec(
        409,
        "The Idempotency-Key was used to add other bytes",
        "Idempotency-Key 'batch-7/12' was used to add another image (id 3305)",
    ),
    "too_large": ErrorSpec(413, "The upload is too large", "upload exceeds 10485760 bytes"),
    "image_too_large": ErrorSpec(
        413, "The image has too many pixels", "image of 12000x8000 pixels exceeds the limit of 40000000 pixels"
    ),
    "unsupported_format": ErrorSpec(
        415,
        "An image format outside JPEG, PNG, WebP, BMP, TIFF",
        "GIF images are not supported; send JPEG, PNG, WebP, BMP or TIFF",
    ),
    "invalid_request": ErrorSpec(422, "Invalid parameters", "query.k: Input should be less than or equal to 100"),
    "image_too_complex": ErrorSpec(
        422,
        "A JPEG whose progressive scans cost more decoding than an upload may take",
        "JPEG of 341x256 pixels in 2001 scans exceeds the decoding budget (64 scans, 480 million pixel-scans)",
    ),
    "no_keypoints": ErrorSpec(
        422, "No keypoints in the image", "no ORB keypoints found in the image (blank or featureless?)"
    ),
    "rate_limited": ErrorSpec(
        429, "Too many thumbnails made at once; retry after Retry-After seconds", "too many thumbnails; retry in 1 s"
    ),
    "internal_error": ErrorSpec(500, "Unexpected error (logged with the request id)", "internal server error"),
    "not_ready": ErrorSpec(503, "No index loaded", "index not loaded: starting"),
    "storage_unavailable": ErrorSpec(
        503,
        "The change could not be written durably (read-only or failing disk); nothing was changed, retry later",
        "adding an image: Read-only file system",
    ),
    "storage_full": ErrorSpec(507, "The disk is full; nothing was changed", "adding an image: No space left on device"),
}

# Most specific first: a subclass must come before its base (UnsupportedFormatError is an ImageDecodeError).
DOMAIN_ERRORS: dict[type[Exception], str] = {
    UnsupportedFormatError: "unsupported_format",
    ImageTooLargeError: "image_too_large",
    ImageTooComplexError: "image_too_complex",
    ImageDecodeError: "invalid_image",
    NoKeypointsError: "no_keypoints",
    NotReadyError: "not_ready",
    UnknownImageError: "not_found",
    RollbackError: "rollback_failed",
    IdempotencyConflictError: "idempotency_conflict",
    StorageFullError: "storage_full",
    StorageError: "storage_unavailable",
}

# What every route that decodes an uploaded image may answer.
IMAGE_ERRORS = (
    "invalid_image",
    "too_large",
    "image_too_large",
    "unsupported_format",
    "image_too_complex",
    "no_keypoints",
)
ADMIN_ERRORS = ("unauthorized", "forbidden", "admin_locked", "cross_origin")
# What every route that changes the index may answer when the disk refuses the change.
STORAGE_ERRORS = ("storage_unavailable", "storage_full")


class ApiError(Exception):
    def __init__(self, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.code, self.detail, self.status = code, detail, ERRORS[code].status
        self.headers = headers


def error_body(code: str, detail: str) -> dict[str, str]:
    return ErrorResponse(code=code, detail=detail).model_dump()


def error_json(code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, detail), status_code=ERRORS[code].status, headers=headers)


def documented(*codes: str, example: dict[str, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that may answer `codes`: one entry per status, its description
    naming each code's meaning, with one example per code. `example` overrides example details."""
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(ERRORS[code].status, []).append(code)
    out: dict[int | str, dict[str, Any]] = {}
    for status, group in sorted(by_status.items()):
        examples = {c: {"value": error_body(c, (example or {}).get(c, ERRORS[c].example))} for c in group}
        out[status] = {
            "model": ErrorResponse,
            "description": "; ".join(f"{ERRORS[c].meaning} (`{c}`)" for c in group),
            "content": {"application/json": {"examples": examples}},
        }
    return out


def _domain_code(exc: Exception) -> str:
    return next(code for cls, code in DOMAIN_ERRORS.items() if isinstance(exc, cls))


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_json(exc.code, exc.detail, exc.headers)

    async def _domain_error(_: Request, exc: Exception) -> JSONResponse:
        return error_json(_domain_code(exc), str(exc))

    for cls in DOMAIN_ERRORS:
        app.add_exception_handler(cls, _domain_error)

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
        return error_json("invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)
