"""Stage 1: image bytes -> grayscale pixels, the same way for map images and uploads.

Nothing parses an upload before its leading bytes name an allowed format: the signature is matched
here, then only that format's Pillow plugin reads the header (Pillow reads only the header until
asked for pixels), and OpenCV, which picks its decoder by the same leading bytes, decodes. So a file
whose format is not allowed, whose pixel count would take gigabytes, or whose progressive scans
would take minutes (a valid JPEG may repeat scans without end: libjpeg-turbo's LJT-01-003) is
refused before any pixel is decoded; OPENCV_IO_MAX_IMAGE_PIXELS (set by the service) is a backstop
inside OpenCV.
"""

from __future__ import annotations

import io
import re
import warnings

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from features.limits import MAX_JPEG_SCANS, MAX_PIXELS, MAX_SCAN_PIXELS

# Formats told by their content (magic bytes), never by the declared type or file name.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF"})
# Leading bytes of each allowed format, as both Pillow and OpenCV recognise them: OpenCV chooses
# its decoder by these same bytes, so it decodes the format that was checked, never another.
_SIGNATURES: tuple[tuple[str, re.Pattern[bytes]], ...] = (
    ("JPEG", re.compile(rb"\xff\xd8\xff")),
    ("PNG", re.compile(rb"\x89PNG\r\n\x1a\n")),
    ("WEBP", re.compile(rb"RIFF.{4}WEBP", re.DOTALL)),
    ("BMP", re.compile(rb"BM")),
    ("TIFF", re.compile(rb"II\*\x00|MM\x00\*")),
)
# Other formats, named in the refusal (415) rather than called undecodable (400); never parsed.
_REFUSED: tuple[tuple[str, re.Pattern[bytes]], ...] = (
    ("GIF", re.compile(rb"GIF8[79]a")),
    ("PSD", re.compile(rb"8BPS")),
    ("ICO", re.compile(rb"\x00\x00[\x01\x02]\x00")),
    ("EPS", re.compile(rb"%!PS|\xc5\xd0\xd3\xc6")),
    ("PDF", re.compile(rb"%PDF-")),
    ("JPEG 2000", re.compile(rb"\x00\x00\x00\x0cjP  |\xff\x4f\xff\x51")),
    ("HEIF/AVIF", re.compile(rb".{4}ftyp(?:heic|heix|mif1|msf1|avif|avis)", re.DOTALL)),
    ("FITS", re.compile(rb"SIMPLE  =")),
    ("QOI", re.compile(rb"qoif")),
    ("DDS", re.compile(rb"DDS ")),
    ("PNM", re.compile(rb"P[1-7]\s")),
    ("SVG", re.compile(rb"\s*(?:<\?xml[^>]*>\s*)?<svg", re.IGNORECASE)),
)
# JPEG markers: SOS starts a scan; entropy-coded data runs to the next 0xFF that is neither a
# stuffed 0x00 nor a restart marker (RST0-7, 0xD0-0xD7).
_SOS, _EOI = 0xDA, 0xD9
_ENTROPY_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")


class ImageDecodeError(ValueError):
    """The bytes are not an image this service can read."""


class UnsupportedFormatError(ImageDecodeError):
    """An image, but of a format outside the allow-list."""


class ImageTooLargeError(ImageDecodeError):
    """More pixels than the service decodes."""


class ImageTooComplexError(ImageDecodeError):
    """A JPEG whose progressive scans would cost more decoding than one upload may take."""


def sniff_format(data: bytes) -> str:
    """The allowed format `data` starts with; raises UnsupportedFormatError for another known image
    format, ImageDecodeError for anything else. Reads only the leading bytes."""
    head = data[:64]
    for fmt, sig in _SIGNATURES:
        if sig.match(head):
            return fmt
    for name, sig in _REFUSED:
        if sig.match(head):
            raise UnsupportedFormatError(f"{name} images are not supported; send JPEG, PNG, WebP, BMP or TIFF")
    raise ImageDecodeError("not a decodable image (supported: JPEG, PNG, WebP, BMP, TIFF)")


def jpeg_scans(data: bytes) -> int:
    """How many scans (SOS markers) the first picture of a JPEG holds, by walking its markers without
    decoding anything; a baseline JPEG has one, a usual progressive one 6-12. Stops at the first EOI
    (a multi-picture file's first picture is the one decoded) or where the stream is malformed."""
    scans, i, n = 0, 2, len(data)
    while i + 1 < n:
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == _EOI:
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
            continue
        if i + 4 > n:
            break
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == _SOS:
            scans += 1
            end = _ENTROPY_END.search(data, i)
            if end is None:
                break
            i = end.start()
    return scans


def png_chunks_fit(data: bytes) -> bool:
    """Whether every chunk of a PNG, up to the IEND after its image data, holds the bytes its length
    field declares. OpenCV allocates (and zeroes) a chunk's declared length before reading it, up to
    4 GB for a few bytes of upload, and only then finds the data missing; a chunk cut short is a
    truncated file either way. OpenCV reads on past an IEND that comes before any IDAT, so that one
    does not end the walk."""
    i, n, image_data = 8, len(data), False
    while i + 8 <= n:
        length = int.from_bytes(data[i : i + 4], "big")
        if i + 8 + length > n:
            return False
        kind = data[i + 4 : i + 8]
        if kind == b"IEND" and image_data:
            break
        image_data = image_data or kind == b"IDAT"
        i += 12 + length  # length, type, data, CRC
    return True


def probe_image(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[str, int, int]:
    """(format, width, height) from the header; raises the errors above."""
    fmt, w, h, _ = _probe(data, max_pixels)
    return fmt, w, h


def oriented_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the picture as decode_image turns it upright (before any shrinking);
    raises the errors of probe_image."""
    _, w, h, orientation = _probe(data, MAX_PIXELS)
    return (h, w) if orientation >= 5 else (w, h)


def decoded_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """The (width, height) decode_image shrinks an upright picture of this size to."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


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
    sniffed = sniff_format(data)
    # Only the sniffed format's parser runs (Pillow's JPEG parser itself tells an MPO, a JPEG with
    # appended pictures, from a plain one).
    formats = [sniffed]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=formats) as img:
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
    if fmt == "PNG" and not png_chunks_fit(data):
        raise ImageDecodeError("not a decodable image (truncated or corrupt)")
    if fmt == "JPEG":
        scans = jpeg_scans(data)
        # Each scan of a progressive JPEG may walk every block of the picture again.
        if scans > MAX_JPEG_SCANS or scans * w * h > MAX_SCAN_PIXELS:
            raise ImageTooComplexError(
                f"JPEG of {w}x{h} pixels in {scans} scans exceeds the decoding budget "
                f"({MAX_JPEG_SCANS} scans, {MAX_SCAN_PIXELS // 1_000_000} million pixel-scans)"
            )
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
    orients. TIFF is the exception: OpenCV's TIFF reader turns the picture by its Orientation tag
    whatever the flags say, so it is not turned a second time (tests/unit/test_uploads.py checks all
    eight, and would fail on an OpenCV that stops doing so).
    """
    fmt, _, _, orientation = _probe(data, MAX_PIXELS)
    if fmt == "TIFF":
        orientation = 1
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as e:  # e.g. OPENCV_IO_MAX_IMAGE_PIXELS, or a decoder rejecting the stream
        raise ImageDecodeError(f"not a decodable image ({e.err or 'corrupt'})") from e
    if img is None or img.size == 0:
        raise ImageDecodeError("not a decodable image (truncated or corrupt)")
    img = apply_orientation(img, orientation)
    size = decoded_size(img.shape[1], img.shape[0], max_side)
    if size != (img.shape[1], img.shape[0]):
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return img
