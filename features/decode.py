"""Stage 1: image bytes -> grayscale pixels, the same way for map images and uploads."""

from __future__ import annotations

import cv2
import numpy as np


class ImageDecodeError(ValueError):
    """The bytes are not an image this service can read."""


def decode_image(data: bytes, max_side: int | None) -> np.ndarray:
    """Decode JPEG/PNG/... bytes to a uint8 grayscale array, shrunk so its longer side <= max_side.

    OpenCV applies the EXIF orientation while decoding, for the indexer and the service alike.
    """
    if not data:
        raise ImageDecodeError("empty image")
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    if img is None or img.size == 0:
        raise ImageDecodeError("not a decodable image (supported: JPEG, PNG, WebP, BMP, TIFF)")
    if max_side and max(img.shape) > max_side:
        scale = max_side / max(img.shape)
        size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return img
