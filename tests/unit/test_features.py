"""Decoding, ORB and the published fixed-length vector."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from common.pipeline import Pipeline, get_pipeline
from features.decode import ImageDecodeError, decode_image
from features.extract import image_to_features
from features.orb import NoKeypointsError, OrbFeatures, extract_orb
from model.vectorize import Vectorizer, concat_bits
from tests.conftest import ROOT


def image_to_vector(data: bytes, conf: Pipeline) -> np.ndarray:
    return Vectorizer(conf.vector)(image_to_features(data, conf.features))


def textured(h: int = 256, w: int = 341, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 128, np.uint8)
    for _ in range(60):
        x, y = rng.integers(0, w - 20), rng.integers(0, h - 20)
        cv2.rectangle(img, (int(x), int(y)), (int(x) + 15, int(y) + 12), rng.integers(0, 255, 3).tolist(), -1)
    return img


def jpeg(img: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", img)[1].tobytes()


def test_blank_image_has_no_keypoints() -> None:
    conf = get_pipeline("paper")
    blank = np.full((256, 341, 3), 200, np.uint8)
    with pytest.raises(NoKeypointsError, match="no ORB keypoints"):
        image_to_vector(jpeg(blank), conf)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\xff\xd8\xff" + b"\x00" * 20])
def test_undecodable_bytes(data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        decode_image(data, 341)


def test_large_images_are_shrunk_to_max_side() -> None:
    gray = decode_image(jpeg(textured(1024, 1364)), 341)
    assert max(gray.shape) == 341 and gray.dtype == np.uint8


def test_paper_vector_is_ten_descriptors_as_bits() -> None:
    conf = get_pipeline("paper")
    img = textured()
    vec = image_to_vector(jpeg(img), conf)
    assert vec.shape == (Vectorizer(conf.vector).dim,) == (2560,)
    assert set(np.unique(vec)) <= {0.0, 1.0}
    feats = extract_orb(decode_image(jpeg(img), conf.features.max_side), conf.features)
    # First descriptor's bits, in detection order.
    assert np.array_equal(vec[:256], np.unpackbits(feats.descriptors[0]).astype(np.float32))


def test_concat_pads_with_zeros() -> None:
    desc = np.full((3, 32), 255, np.uint8)
    vec = concat_bits(OrbFeatures(xy=np.zeros((3, 2), np.float32), descriptors=desc), 10)
    assert vec.shape == (2560,)
    assert vec[: 3 * 256].all() and not vec[3 * 256 :].any()


def test_probe_reads_format_from_content() -> None:
    from features.decode import ImageTooLargeError, UnsupportedFormatError, probe_image

    assert probe_image(jpeg(textured())) == ("JPEG", 341, 256)
    png = cv2.imencode(".png", textured())[1].tobytes()
    assert probe_image(png)[0] == "PNG"
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
    with pytest.raises(ImageDecodeError):
        probe_image(svg)
    with pytest.raises(ImageTooLargeError, match="341x256"):
        probe_image(png, max_pixels=1000)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    with pytest.raises(UnsupportedFormatError, match="GIF"):
        probe_image(buf.getvalue())


_PARALLEL_AFTER_OPENCV = """
import sys
from pathlib import Path

import cv2
import numpy as np

# Run OpenCV's own thread pool in this process first, as generating the demo data does.
img = np.random.default_rng(0).integers(0, 256, (1500, 1500), dtype=np.uint8)
for _ in range(5):
    cv2.GaussianBlur(cv2.resize(img, (3000, 3000)), (31, 31), 0)

from common.parallel import map_files
from common.pipeline import get_pipeline
from model.vectors import _vector_of_file

files = sorted(Path(sys.argv[1]).glob("database/images/*.jpg"))[:8]
out = list(map_files(_vector_of_file, files, get_pipeline("paper"), jobs=2))
print(len(out), sum(v is not None for v in out))
"""


def test_parallel_extraction_after_opencv_threads_ran(tiny_data: Path) -> None:
    """Worker processes must not inherit OpenCV's thread pool: forked after it ran, they hung in
    cv2.setNumThreads (make run on a fresh clone, right after generating the demo data)."""
    out = subprocess.run(
        [sys.executable, "-c", _PARALLEL_AFTER_OPENCV, str(tiny_data)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard, not a speed test
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["8", "8"]


@pytest.mark.parametrize("preset", ["paper", "dense-rvlad-verify", "default"])
@pytest.mark.parametrize("shape", [(1, 341), (341, 1), (3, 500)])
def test_thin_images_have_no_keypoints_not_an_opencv_error(preset: str, shape: tuple[int, int]) -> None:
    gray = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    with pytest.raises(NoKeypointsError):
        extract_orb(gray, get_pipeline(preset).features)


# Only the allowed formats' parsers ever run, within a decoding budget.

REFUSED_HEADERS = {
    "GIF": b"GIF89a\x08\x00\x08\x00",
    "PSD": b"8BPS\x00\x01" + b"\x00" * 20,
    "EPS": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n",
    "PDF": b"%PDF-1.7\n",
    "ICO": b"\x00\x00\x01\x00\x01\x00\x08\x08",
    "FITS": b"SIMPLE  =                    T",
    "HEIF/AVIF": b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00",
    "SVG": b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>',
}


@pytest.mark.parametrize("fmt", list(REFUSED_HEADERS))
def test_other_formats_are_refused_before_any_parser_runs(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from features import decode

    def no_parser(*args: object, **kw: object) -> None:
        raise AssertionError("a parser ran")

    monkeypatch.setattr(decode.Image, "open", no_parser)
    monkeypatch.setattr(decode.cv2, "imdecode", no_parser)
    with pytest.raises(decode.UnsupportedFormatError, match=fmt.split("/")[0]):
        decode.decode_image(REFUSED_HEADERS[fmt], None)


def test_an_allowed_signature_runs_that_format_s_parser_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from features import decode

    asked: list[object] = []
    real = decode.Image.open

    def recording(fp: object, *args: object, formats: list[str] | None = None) -> object:
        asked.append(formats)
        return real(fp, formats=formats)

    monkeypatch.setattr(decode.Image, "open", recording)
    png = cv2.imencode(".png", textured())[1].tobytes()
    decode.decode_image(png, None)
    decode.decode_image(jpeg(textured()), None)
    assert asked == [["PNG"], ["JPEG"]]
    # A PNG signature on a JPEG body: the PNG parser alone is asked, and refuses it.
    with pytest.raises(ImageDecodeError):
        decode.decode_image(b"\x89PNG\r\n\x1a\n" + jpeg(textured()), None)
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        decode.sniff_format(b"no image at all")


def test_progressive_scans_are_counted_and_bounded(tiny_data: Path) -> None:
    from PIL import Image

    from features.decode import ImageTooComplexError, jpeg_scans, probe_image
    from features.limits import MAX_JPEG_SCANS
    from tests.imagegen import encode, many_scans, upright

    img = upright(tiny_data)
    assert jpeg_scans(encode(img, "JPEG")) == 1
    progressive = encode(img, "JPEG", progressive=True)
    scans = jpeg_scans(progressive)
    assert 6 <= scans <= 12
    assert jpeg_scans(many_scans(img, 40)) == scans + 40
    assert probe_image(many_scans(img, MAX_JPEG_SCANS - scans))[0] == "JPEG"  # at the limit: decoded
    with pytest.raises(ImageTooComplexError, match=f"{MAX_JPEG_SCANS + 1} scans"):
        probe_image(many_scans(img, MAX_JPEG_SCANS - scans + 1))
    # A large picture may take fewer scans: scans x pixels is bounded too.
    big = img.resize((img.width * 16, img.height * 16), Image.Resampling.NEAREST)
    with pytest.raises(ImageTooComplexError, match="pixel-scans"):
        probe_image(many_scans(big, 40))
