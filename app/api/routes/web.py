"""The browser page (static files, no build step), the map images' thumbnails it shows and their
positions for its map."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response
from PIL import Image, ImageOps

from app.api.deps import SearcherDep, StateDep
from app.core.cache import ByteLRU
from app.errors import ApiError, documented
from app.schemas import MapPoints
from features.decode import ImageDecodeError, probe_image
from indexer.store import image_file
from retrieval.live import UnknownImageError
from retrieval.locate import wgs84_transformer
from retrieval.searcher import Searcher

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
        raise ApiError("not_found", f"no such file: {name}")
    return FileResponse(WEB_DIR / name, media_type=_ASSETS[name], headers={"Cache-Control": "no-cache"})


def make_thumbnail(data: bytes, side: int = THUMB_SIDE) -> bytes:
    """JPEG bytes of an image, shrunk so its longer side <= side. Only the format its leading bytes
    name is parsed, within the upload limits (features/decode.py); raises ImageDecodeError, OSError."""
    fmt, _, _ = probe_image(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
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
        **documented(
            "not_found",
            "image_unavailable",
            "invalid_request",
            "rate_limited",
            "not_ready",
            example={"invalid_request": "path.image_id: Input should be a valid integer"},
        ),
    },
)
def thumbnail(
    image_id: Annotated[int, PathParam(description="The map image's id, as in /search results")],
    searcher: SearcherDep,
    state: StateDep,
) -> Response:
    """A small JPEG of a map image of the served index. Made once per worker and kept (a few MB of
    them); the images a worker may decode for thumbnails in a second are limited (429 past that)."""
    rec = searcher.images.get(image_id)
    if rec is None:
        raise UnknownImageError(image_id)
    # The path comes from the index's id map, yet is still confined to its folder.
    path = image_file(rec, searcher.loaded.family, state.settings.data_root)
    if path is None:
        raise ApiError("image_unavailable", f"the file of map image {image_id} is not available")
    try:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        data = state.thumbnails.get(key)
        if data is None:
            if not state.thumbnail_rate.take():
                wait = max(1, math.ceil(state.thumbnail_rate.wait_s()))
                raise ApiError("rate_limited", f"too many thumbnails; retry in {wait} s", {"Retry-After": str(wait)})
            data = make_thumbnail(path.read_bytes())
            state.thumbnails.put(key, data)
    except (OSError, ImageDecodeError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError("image_unavailable", f"the file of map image {image_id} cannot be read") from e
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})


MAP_POINTS_MAX = 200_000


def map_points_json(searcher: Searcher, utm_epsg: int, limit: int, cache: ByteLRU) -> bytes:
    """The body of /map/points: the map images sorted by id, every ceil(n/limit)-th of them when
    there are more than `limit` (the same ones each time), in WGS84."""
    images = searcher.images
    key = (searcher.version, searcher.applied.seq, len(images), limit, utm_epsg)
    cached = cache.get(key)
    if cached is not None:
        return cached
    ids = sorted(images)
    total = len(ids)
    ids = ids[:: max(1, math.ceil(total / limit))]
    locs = np.array([images[i].loc.as_list() for i in ids], dtype=np.float64).reshape(-1, 3)
    lat: list[float] = []
    lon: list[float] = []
    if ids:
        lons, lats = wgs84_transformer(utm_epsg).transform(locs[:, 0], locs[:, 1])
        lat, lon = np.round(lats, 6).tolist(), np.round(lons, 6).tolist()
    body = MapPoints(
        total=total,
        shown=len(ids),
        ids=ids,
        latitude=lat,
        longitude=lon,
        heading=np.round(locs[:, 2], 1).tolist(),
    ).model_dump_json()
    data = body.encode()
    cache.put(key, data)
    return data


@router.get(
    "/map/points",
    response_model=MapPoints,
    responses=documented(
        "invalid_request",
        "not_ready",
        example={"invalid_request": "query.limit: Input should be greater than or equal to 1"},
    ),
)
def map_points(
    searcher: SearcherDep,
    state: StateDep,
    limit: Annotated[
        int,
        Query(ge=1, le=MAP_POINTS_MAX, description="At most this many points; more images are thinned evenly"),
    ] = 20_000,
) -> Response:
    """Every map image's position (WGS84) and heading, for the page's map. Beyond `limit` images, an
    evenly thinned subset: every ceil(total/limit)-th image by id, the same ones on every call."""
    data = map_points_json(searcher, state.settings.utm_epsg, limit, state.map_points)
    # Built and validated above; returned as bytes, so not validated a second time.
    return Response(data, media_type="application/json", headers={"Cache-Control": "no-cache"})
