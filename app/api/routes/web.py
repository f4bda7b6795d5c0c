"""The browser page (static files, no build step) and the map images' thumbnails it shows."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response
from PIL import Image, ImageOps

from app.api.deps import NOT_READY_ERRORS, SearcherDep, StateDep, image_not_found
from app.errors import ApiError
from app.schemas import error_response
from features.decode import MAX_PIXELS

router = APIRouter(tags=["web"])

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
# Served by name from a fixed table: a request can never name any other file.
_ASSETS = {"app.js": "text/javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml"}
THUMB_SIDE = 256
# Only the page's own files: no inline script, no third-party origin.
_CSP = "default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; object-src 'none'"


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(
        WEB_DIR / "index.html",
        media_type="text/html",
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": _CSP},
    )


@router.get("/web/{name}", include_in_schema=False)
def asset(name: str) -> FileResponse:
    if name not in _ASSETS:
        raise ApiError(404, "not_found", f"no such file: {name}")
    return FileResponse(WEB_DIR / name, media_type=_ASSETS[name], headers={"Cache-Control": "no-cache"})


def make_thumbnail(path: Path, side: int = THUMB_SIDE) -> bytes:
    """JPEG bytes of the image at `path`, shrunk so its longer side <= side; raises OSError/ValueError."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ValueError(f"{img.width}x{img.height} pixels")
            img.draft("RGB", (side, side))  # JPEG: decode at a reduced scale, much faster
            small = ImageOps.exif_transpose(img).convert("RGB")
    small.thumbnail((side, side))
    out = io.BytesIO()
    small.save(out, "JPEG", quality=80)
    return out.getvalue()


@router.get(
    "/images/{image_id}/thumbnail",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}}, "description": f"JPEG, longer side at most {THUMB_SIDE} px"},
        404: error_response(
            "No map image with this id, or its file is unavailable",
            ("not_found", "no map image with id 7"),
            ("image_unavailable", "the file of map image 7 is not available"),
        ),
        422: error_response(
            "The id is not an integer", ("invalid_request", "path.image_id: Input should be a valid integer")
        ),
        **NOT_READY_ERRORS,
    },
)
def thumbnail(
    image_id: Annotated[int, PathParam(description="The map image's id, as in /search results")],
    searcher: SearcherDep,
    state: StateDep,
) -> Response:
    """A small JPEG of a map image of the served index."""
    if image_id not in searcher.images:
        raise image_not_found(image_id)
    # The path comes from the index's id map, yet is still confined to its folder (Searcher.image_file).
    path = searcher.image_file(image_id, state.settings.data_root)
    if path is None:
        raise ApiError(404, "image_unavailable", f"the file of map image {image_id} is not available")
    try:
        data = make_thumbnail(path)
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(404, "image_unavailable", f"the file of map image {image_id} cannot be read") from e
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})
