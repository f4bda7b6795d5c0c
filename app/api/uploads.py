"""What every route that takes an image upload shares: the capped read, the mapping of the decode
pipeline's errors to HTTP, and their documentation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import UploadFile

from app.errors import ApiError
from app.schemas import error_response
from features.decode import ImageDecodeError, ImageTooLargeError, UnsupportedFormatError
from features.orb import NoKeypointsError

IMAGE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: error_response(
        "The upload is not a decodable image",
        ("invalid_image", "not a decodable image (supported: JPEG, PNG, WebP, BMP, TIFF)"),
    ),
    413: error_response(
        "The upload or its pixel count is too large",
        ("too_large", "upload exceeds 10485760 bytes"),
        ("image_too_large", "image of 12000x8000 pixels exceeds the limit of 40000000 pixels"),
    ),
    415: error_response(
        "An image format outside JPEG, PNG, WebP, BMP, TIFF",
        ("unsupported_format", "GIF images are not supported; send JPEG, PNG, WebP, BMP or TIFF"),
    ),
}


async def read_capped(file: UploadFile, limit: int) -> bytes:
    """The upload's bytes; 413 past `limit` (the body middleware caps the stream before this)."""
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "too_large", f"upload exceeds {limit} bytes")
    return data


@contextmanager
def image_errors() -> Iterator[None]:
    """The decode pipeline's own errors (features/) as the HTTP answers documented in IMAGE_ERRORS."""
    try:
        yield
    except UnsupportedFormatError as e:
        raise ApiError(415, "unsupported_format", str(e)) from e
    except ImageTooLargeError as e:
        raise ApiError(413, "image_too_large", str(e)) from e
    except ImageDecodeError as e:
        raise ApiError(400, "invalid_image", str(e)) from e
    except NoKeypointsError as e:
        raise ApiError(422, "no_keypoints", str(e)) from e
