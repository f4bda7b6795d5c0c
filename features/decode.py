"""Stage 1: image bytes -> grayscale pixels, the same way for map images and uploads.

The header is read first (Pillow reads only the header until asked for pixels), so a file whose
format is not allowed, or whose pixel count would take gigabytes to decode, is refused before any
decoding; OPENCV_IO_MAX_IMAGE_PIXELS (set by the service) is a backstop inside OpenCV.
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# Formats told by their content (magic bytes), never by the declared type or file name.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF"})
MAX_PIXELS = 40_000_000  # a 40-megapixel photo; larger uploads are refused before decoding


class ImageDecodeError(ValueError):
    """The bytes are not an image this service can read."""


class UnsupportedFormatError(ImageDecodeError):
    """An image, but of a format outside the allow-list."""


class ImageTooLargeError(ImageDecodeError):
    """More pixels than the service decodes."""


def probe_image(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[str, int, int]:
    """(format, width, height) from the header; raises the errors above."""
    if not data:
        raise ImageDecodeError("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, (w, h) = img.format or "", img.size
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image exceeds the limit of {max_pixels} pixels") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageDecodeError("not a decodable image (supported: JPEG, PNG, WebP, BMP, TIFF)") from e
    if fmt not in ALLOWED_FORMATS:
        raise UnsupportedFormatError(f"{fmt or 'this'} images are not supported; send JPEG, PNG, WebP, BMP or TIFF")
    if w * h > max_pixels:
        raise ImageTooLargeError(f"image of {w}x{h} pixels exceeds the limit of {max_pixels} pixels")
    return fmt, w, h


def decode_image(data: bytes, max_side: int | None) -> np.ndarray:
    """Decode image bytes to a uint8 grayscale array, shrunk so its longer side <= max_side.

    OpenCV applies the EXIF orientation while decoding, for the indexer and the service alike.
    """
    probe_image(data)
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    if img is None or img.size == 0:
        raise ImageDecodeError("not a decodable image (truncated or corrupt)")
    if max_side and max(img.shape) > max_side:
        scale = max_side / max(img.shape)
        size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return img
