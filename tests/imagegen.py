"""Image variants for the upload tests: one real photo of the synthetic street, encoded every way
the service must read (formats, bit depths, colour modes, EXIF orientations, animation), and images
it must refuse (tiny, single-colour)."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
from PIL import Image

from features.decode import decode_image


def upright(tiny_data: Path) -> Image.Image:
    """A real query photo of the synthetic street (textured facades), as RGB."""
    q = json.loads((tiny_data / "query" / "query.json").read_text())
    return Image.open(tiny_data / q["im_paths"][0]).convert("RGB")


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


LOSSY = {"palette.png", "cmyk.jpg", "rgb.jpg", "gray.jpg"}


def variants(img: Image.Image) -> dict[str, bytes]:
    gray = img.convert("L")
    sixteen = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)  # I;16, same picture
    assert sixteen.mode in ("I;16", "I")
    return {
        "rgb.png": encode(img, "PNG"),
        "16bit.png": encode(sixteen, "PNG"),
        "rgba.png": encode(img.convert("RGBA"), "PNG"),
        "gray.png": encode(gray, "PNG"),
        "palette.png": encode(img.convert("P", palette=Image.Palette.ADAPTIVE, colors=256), "PNG"),
        "cmyk.jpg": encode(img.convert("CMYK"), "JPEG", quality=95),
        "rgb.jpg": encode(img, "JPEG", quality=95),
        "gray.jpg": encode(gray, "JPEG", quality=95),
        "lossless.webp": encode(img, "WEBP", lossless=True),
        "tiff": encode(img, "TIFF"),
        "bmp": encode(img, "BMP"),
    }


def as_decoded_png(data: bytes) -> bytes:
    """The pixels decode_image (the indexer's decode) makes of `data`, as a plain gray PNG."""
    return encode(Image.fromarray(decode_image(data, None)), "PNG")


def animated(img: Image.Image, fmt: str) -> bytes:
    frames = [img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), img.convert("L").convert("RGB")]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)


# The transpose that stores an upright picture so that EXIF orientation `o` turns it upright again.
STORE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # shown after a 90° clockwise turn, so stored 90° counter-clockwise
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def with_orientation(img: Image.Image, o: int, fmt: str) -> bytes:
    stored = img if STORE[o] is None else img.transpose(STORE[o])
    exif = Image.Exif()
    exif[0x0112] = o
    kw = {"quality": 95} if fmt == "JPEG" else {}
    return encode(stored, fmt, exif=exif, **kw)


def tiny_and_blank() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {
        "1x1.png": encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
        "8x8-noise.png": encode(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)), "PNG"),
        "8x8-noise.jpg": encode(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)), "JPEG"),
        # A corrupt JPEG header decoded to this once; ORB's pyramid asserted inside OpenCV (a 500).
        "1x341-noise.png": encode(Image.fromarray(rng.integers(0, 256, (1, 341, 3), dtype=np.uint8)), "PNG"),
        "white-1024.jpg": encode(Image.new("RGB", (1024, 768), "white"), "JPEG"),
        "red-341.png": encode(Image.new("RGB", (341, 256), (200, 0, 0)), "PNG"),
        "black-16bit.png": encode(Image.new("I;16", (341, 256), 0), "PNG"),
    }


def many_scans(img: Image.Image, repeats: int) -> bytes:
    """A progressive JPEG of `img` whose smallest scan is repeated `repeats` times before its end: a
    valid stream (libjpeg warns of the odd progression, and decodes it) whose decoding cost grows with
    every scan while its size hardly does (libjpeg-turbo's LJT-01-003)."""
    data = encode(img, "JPEG", progressive=True, quality=90)
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]
    end = data.rindex(b"\xff\xd9")
    bounds = [*starts, end]
    scans = [data[a:b] for a, b in itertools.pairwise(bounds)]
    smallest = min(scans, key=len)
    return data[:end] + smallest * repeats + data[end:]
