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

from features.limits import MAX_PIXELS

# Formats told by their content (magic bytes), never by the declared type or file name.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF"})


class ImageDecodeError(ValueError):
    """The bytes are not an image this service can read."""


class UnsupportedFormatError(ImageDecodeError):
    """An image, but of a format outside the allow-list."""


class ImageTooLargeError(ImageDecodeError):
    """More pixels than the service decodes."""


def probe_image(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[str, int, int]:
    """(format, width, height) from the header; raises the errors above."""
    fmt, w, h, _ = _probe(data, max_pixels)
    return fmt, w, h


def _exif_orientation(img: Image.Image) -> int:
    """EXIF orientation 1-8 (1: upright) without decoding pixels."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1  # Pillow's PNG getexif() would decode the whole image to look for a late eXIf chunk
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # a corrupt EXIF block is metadata, not the image: read it as upright
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _probe(data: bytes, max_pixels: int) -> tuple[str, int, int, int]:
    if not data:
        raise ImageDecodeError("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, (w, h) = img.format or "", img.size
                orientation = _exif_orientation(img)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image exceeds the limit of {max_pixels} pixels") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageDecodeError("not a decodable image (supported: JPEG, PNG, WebP, BMP, TIFF)") from e
    if fmt == "MPO":
        fmt = "JPEG"  # a JPEG with extra images appended (many cameras and phones): its first is the photo
    if fmt not in ALLOWED_FORMATS:
        raise UnsupportedFormatError(f"{fmt or 'this'} images are not supported; send JPEG, PNG, WebP, BMP or TIFF")
    if w * h > max_pixels:
        raise ImageTooLargeError(f"image of {w}x{h} pixels exceeds the limit of {max_pixels} pixels")
    return fmt, w, h, orientation


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn pixels stored with EXIF `orientation` upright, as PIL's ImageOps.exif_transpose does."""
    ops = {
        2: lambda a: a[:, ::-1],  # mirrored left-right
        3: lambda a: a[::-1, ::-1],  # rotated 180
        4: lambda a: a[::-1],  # mirrored top-bottom
        5: lambda a: a.T,  # transposed
        6: lambda a: np.rot90(a, -1),  # stored rotated 90 counter-clockwise: turn clockwise
        7: lambda a: a[::-1, ::-1].T,  # transversed
        8: lambda a: np.rot90(a, 1),
    }
    op = ops.get(orientation)
    return img if op is None else np.ascontiguousarray(op(img))


def decode_image(data: bytes, max_side: int | None) -> np.ndarray:
    """Decode image bytes to a uint8 grayscale array, shrunk so its longer side <= max_side.

    The indexer and the service both come here, so they see the same pixels for every variant:
    16-bit, alpha, CMYK, grayscale and palette images become 8-bit gray; an animated WebP or PNG
    gives its first frame; the EXIF orientation read by Pillow is applied here rather than left to
    OpenCV, so that a rotated photo equals the upright one whatever formats a given OpenCV version
    orients.
    """
    _, _, _, orientation = _probe(data, MAX_PIXELS)
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as e:  # e.g. OPENCV_IO_MAX_IMAGE_PIXELS, or a decoder rejecting the stream
        raise ImageDecodeError(f"not a decodable image ({e.err or 'corrupt'})") from e
    if img is None or img.size == 0:
        raise ImageDecodeError("not a decodable image (truncated or corrupt)")
    img = apply_orientation(img, orientation)
    if max_side and max(img.shape) > max_side:
        scale = max_side / max(img.shape)
        size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return img
