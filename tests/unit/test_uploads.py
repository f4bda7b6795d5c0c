"""Upload hardening without a server: the body-size middleware alone, image variants
decoded to the same pixels by the indexer and the service, EXIF orientation, blank images with dense
features. tests/service/test_hardening.py sends the same inputs over real HTTP."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from app.core.body_limit import BodySizeLimitMiddleware
from common.pipeline import DEFAULT_PRESET, get_pipeline
from features.decode import apply_orientation, decode_image
from features.extract import image_to_features
from features.orb import NoKeypointsError, extract_orb
from indexer import store
from retrieval.searcher import Searcher
from tests.imagegen import LOSSY, encode, tiny_and_blank, upright, variants, with_orientation


def _run_middleware(chunks: list[bytes], headers: list[tuple[bytes, bytes]], limit: int) -> tuple[int, dict, int]:
    """Drive the middleware directly with a body that does not match its header; returns
    (status, JSON body, bytes the app managed to read)."""
    read = 0

    async def app(scope: dict, receive, send) -> None:  # reads the whole body, then answers 200
        nonlocal read
        while True:
            msg = await receive()
            read += len(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0)

    async def send(msg: dict) -> None:
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/search", "headers": headers}
    asyncio.run(BodySizeLimitMiddleware(app, max_bytes=limit)(scope, receive, send))
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(body), read


def test_middleware_counts_bytes_whatever_the_header_says() -> None:
    # An ASGI server that forwarded more bytes than announced must not get past the cap either.
    status, body, read = _run_middleware([b"x" * 600] * 5, [(b"content-length", b"10")], limit=1000)
    assert status == 413 and body["code"] == "too_large"
    assert read <= 1000  # the app never saw the bytes past the cap
    status, body, read = _run_middleware([b"x" * 300] * 3, [], limit=1000)
    assert status == 200 and read == 900


def test_variants_decode_to_the_same_gray_picture(tiny_data: Path) -> None:
    img = upright(tiny_data)
    ref = decode_image(encode(img, "PNG"), None)
    for name, data in variants(img).items():
        gray = decode_image(data, None)
        assert gray.dtype == np.uint8 and gray.ndim == 2, name
        assert gray.shape == ref.shape, name
        # Lossless variants give the same picture up to rounding; JPEG (CMYK too) and the 256-colour
        # palette up to compression / quantisation.
        tol = 6 if name in LOSSY else 1.0
        assert np.abs(gray.astype(float) - ref).mean() <= tol, f"{name} decodes to a different picture"
    # 16-bit: scaled to 8 bits, not clipped (a clipped 16-bit image would be almost all white).
    assert np.array_equal(decode_image(variants(img)["16bit.png"], None), decode_image(variants(img)["gray.png"], None))


def test_indexer_and_service_extract_the_same_features(tiny_data: Path, tiny_artifacts: Path) -> None:
    # The indexer's path (features.extract.image_to_features, used for map images) and the service's
    # (Searcher.analyze, used for uploads) give identical features for every variant.
    family = store.index_family(tiny_artifacts, tiny_data, "paper")
    searcher = Searcher(store.load(store.current_version(family)))
    img = upright(tiny_data)
    samples = variants(img) | {f"exif{o}.jpg": with_orientation(img, o, "JPEG") for o in range(1, 9)}
    for name, data in samples.items():
        indexed = image_to_features(data, searcher.pipeline.features)
        served = searcher.analyze(data).features
        assert np.array_equal(indexed.descriptors, served.descriptors), name
        assert np.array_equal(indexed.xy, served.xy), name


@pytest.mark.parametrize("o", range(1, 9))
def test_exif_orientation_gives_the_upright_pixels(tiny_data: Path, o: int) -> None:
    img = upright(tiny_data)
    data = with_orientation(img, o, "PNG")
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == o
    ours = decode_image(data, None)
    # Exactly the upright picture, and exactly what PIL's exif_transpose makes of the file.
    assert np.array_equal(ours, decode_image(encode(img, "PNG"), None))
    pil = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("L"))
    assert ours.shape == pil.shape and np.abs(ours.astype(int) - pil).max() <= 1
    # JPEG (the usual carrier of EXIF): upright shape and picture, up to compression.
    jpg = decode_image(with_orientation(img, o, "JPEG"), None)
    assert jpg.shape == ours.shape and np.abs(jpg.astype(float) - ours).mean() < 3
    # TIFF and WebP carry it too (TIFF as a tag that OpenCV's reader applies by itself): turned once,
    # upright up to lossy WebP's compression (a picture turned wrong differs by tens of grey levels).
    for fmt in ("TIFF", "WEBP"):
        got = decode_image(with_orientation(img, o, fmt), None)
        assert got.shape == ours.shape and np.abs(got.astype(float) - ours).mean() < 8, fmt


def test_indexer_features_do_not_depend_on_orientation(tiny_data: Path) -> None:
    # The indexer's path (features.extract.image_to_features) decodes with the same function.
    img = upright(tiny_data)
    for preset in ("paper", DEFAULT_PRESET):
        conf = get_pipeline(preset).features
        ref = image_to_features(encode(img, "PNG"), conf)
        for o in range(2, 9):
            f = image_to_features(with_orientation(img, o, "PNG"), conf)
            assert np.array_equal(f.descriptors, ref.descriptors) and np.allclose(f.xy, ref.xy), (preset, o)


@pytest.mark.parametrize("o", range(1, 9))
def test_apply_orientation_matches_pil(o: int) -> None:
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    stored = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = o
    pil = ImageOps.exif_transpose(Image.open(io.BytesIO(encode(stored, "PNG", exif=exif))))
    assert np.array_equal(apply_orientation(a, o), np.asarray(pil))


def test_single_colour_has_no_keypoints_with_dense_features_too() -> None:
    # Dense ORB describes a grid whatever the content: a flat image would give all-zero descriptors
    # that match anything. The default preset must refuse it like the FAST-based ones.
    conf = get_pipeline(DEFAULT_PRESET).features
    assert conf.detector == "dense"
    for data in tiny_and_blank().values():
        with pytest.raises(NoKeypointsError):
            extract_orb(decode_image(data, conf.max_side), conf)


def test_oriented_and_decoded_sizes_are_what_decoding_makes() -> None:
    import io

    from PIL import Image

    from features.decode import decode_image, decoded_size, oriented_size

    img = Image.new("L", (600, 200), 80)
    img.paste(200, (0, 0, 300, 100))
    for orientation, want in ((1, (600, 200)), (6, (200, 600)), (3, (600, 200)), (8, (200, 600))):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        img.save(buf, "JPEG", exif=exif)
        assert oriented_size(buf.getvalue()) == want
        gray = decode_image(buf.getvalue(), 341)
        assert (gray.shape[1], gray.shape[0]) == decoded_size(*want, 341)
    assert decoded_size(300, 100, 341) == (300, 100) and decoded_size(682, 100, 341) == (341, 50)
