"""Upload hardening (issue 5): body size without a trustworthy Content-Length, image variants decoded
the same way by the indexer and the service, EXIF orientation, tiny and blank images, and the `file`
field. Everything that goes through HTTP goes over real HTTP on loopback; tests/test_api.py has the
other bad inputs (empty, random bytes, HTML, GIF, pixel bomb, truncated JPEG, k out of range).
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from app.core.limits import MULTIPART_OVERHEAD, BodySizeLimitMiddleware
from features.decode import UnsupportedFormatError, apply_orientation, decode_image, probe_image
from features.extract import image_to_features
from features.orb import NoKeypointsError, extract_orb
from pipeline.presets import DEFAULT_PRESET, get_conf
from tests.conftest import Server

CAP = 10 * 1024 * 1024 + MULTIPART_OVERHEAD  # the server fixture runs with the default 10 MB upload limit


# --- helpers -----------------------------------------------------------------------------------------


def upright(tiny_data: Path) -> Image.Image:
    """A real query photo of the synthetic street (textured facades), as RGB."""
    q = json.loads((tiny_data / "query" / "query.json").read_text())
    return Image.open(tiny_data / q["im_paths"][0]).convert("RGB")


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def search(server: Server, data: bytes, name: str = "q", k: int = 10) -> httpx.Response:
    return httpx.post(server.url + "/search", params={"k": k}, files={"file": (name, data)}, timeout=60)


def ids(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return [h["id"] for h in r.json()["results"]]


def multipart_prefix(boundary: str, name: str = "file") -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="x.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()


def post_chunked(server: Server, chunks: Iterator[bytes]) -> httpx.Response:
    """POST /search with a multipart body from a generator: httpx sends it chunked, without Content-Length."""
    return httpx.post(
        server.url + "/search",
        content=chunks,
        headers={"Content-Type": "multipart/form-data; boundary=bnd"},
        timeout=60,
    )


def raw_http(server: Server, head: str, body_chunks: Iterator[bytes] | None = None) -> bytes:
    """Send a hand-written request on a socket (for headers httpx would not send) and read the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head.encode())
        try:
            for chunk in body_chunks or ():
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed without reading the rest: that is the point
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
    return out


# --- 1. body size without (or with a lying) Content-Length ---------------------------------------------


def test_declared_content_length_over_cap_is_413_before_the_body(server: Server) -> None:
    # Headers only: if the server waited for the 50 MB body it announced, this would time out.
    head = (
        "POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        "Content-Length: 50000000\r\n\r\n"
    )
    answer = raw_http(server, head)
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 413"), answer[:200]
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["code"] == "too_large" and str(CAP) in body["detail"]


def test_chunked_upload_over_cap_is_413(server: Server) -> None:
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        yield multipart_prefix("bnd")
        for _ in range(40):  # up to 40 MB, far over the cap, with no Content-Length anywhere
            sent += 1 << 20
            yield b"\xff" * (1 << 20)
        yield b"\r\n--bnd--\r\n"

    r = post_chunked(server, body())
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    assert r.status_code == 413, r.text
    assert r.json()["code"] == "too_large" and "exceeds" in r.json()["detail"]
    assert server.proc.poll() is None
    # The service still answers on a fresh connection.
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_chunked_upload_under_cap_is_served(server: Server, tiny_data: Path) -> None:
    photo = encode(upright(tiny_data), "PNG")

    def body() -> Iterator[bytes]:
        yield multipart_prefix("bnd")
        for i in range(0, len(photo), 4096):
            yield photo[i : i + 4096]
        yield b"\r\n--bnd--\r\n"

    r = post_chunked(server, body())
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert ids(r) == ids(search(server, photo))


def test_lying_content_length_is_not_trusted(server: Server) -> None:
    # Announces 1,000 bytes and sends 3 MB: the server reads only what was announced (a cut-off
    # multipart body, 4xx) and treats the rest as garbage on the connection, never as upload bytes.
    head = (
        "POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=bnd\r\n"
        "Content-Length: 1000\r\n\r\n"
    )
    answer = raw_http(server, head, iter([multipart_prefix("bnd"), b"\xff" * (3 << 20)]))
    assert answer.startswith(b"HTTP/1.1 4"), answer[:200]
    assert b" 500 " not in answer and server.proc.poll() is None
    assert httpx.get(server.url + "/healthz").status_code == 200


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


# --- 2. image variants: one decode for the indexer and the service -------------------------------------


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


def as_decoded_png(data: bytes) -> bytes:
    """The pixels decode_image (the indexer's decode) makes of `data`, as a plain gray PNG."""
    return encode(Image.fromarray(decode_image(data, None)), "PNG")


def test_every_variant_is_searchable(server: Server, tiny_data: Path) -> None:
    # The service answers each variant exactly as it answers the pixels the indexer's decode makes
    # of it: the same decode on both sides. (The paper preset reacts to a grey level of rounding,
    # so the answer is compared with that of the decoded pixels, not with the RGB original.)
    for name, data in variants(upright(tiny_data)).items():
        r = search(server, data, name)
        assert r.status_code == 200, f"{name}: {r.status_code} {r.text}"
        assert ids(r) == ids(search(server, as_decoded_png(data))), name


def test_indexer_and_service_extract_the_same_features(tiny_data: Path, tiny_artifacts: Path) -> None:
    # The indexer's path (features.extract.image_to_features, used for map images) and the service's
    # (Searcher.analyze, used for uploads) give identical features for every variant.
    from app.core.config import Settings
    from app.main import load_searcher

    searcher = load_searcher(Settings(data=tiny_data, artifacts=tiny_artifacts, preset="paper"))
    img = upright(tiny_data)
    samples = variants(img) | {f"exif{o}.jpg": with_orientation(img, o, "JPEG") for o in range(1, 9)}
    for name, data in samples.items():
        indexed = image_to_features(data, searcher.conf)
        served = searcher.analyze(data).features
        assert np.array_equal(indexed.descriptors, served.descriptors), name
        assert np.array_equal(indexed.xy, served.xy), name


def animated(img: Image.Image, fmt: str) -> bytes:
    frames = [img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), img.convert("L").convert("RGB")]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_animated_image_is_searched_by_its_first_frame(server: Server, tiny_data: Path, fmt: str) -> None:
    img = upright(tiny_data)
    data = animated(img, fmt)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    kw = {"lossless": True} if fmt == "WEBP" else {}
    first = decode_image(encode(img, fmt, **kw), None)  # the first frame alone
    # The same picture (APNG is composited by OpenCV: up to one grey level of rounding).
    assert np.abs(decode_image(data, None).astype(int) - first).max() <= (0 if fmt == "WEBP" else 1)
    assert ids(search(server, data, "anim")) == ids(search(server, as_decoded_png(data)))


def test_multi_picture_jpeg_from_cameras_is_a_jpeg(server: Server, tiny_data: Path) -> None:
    # Pillow calls a JPEG with appended pictures (MPF, written by many phones and cameras) "MPO";
    # it is a JPEG whose first picture is the photo, not an unsupported format.
    img = upright(tiny_data)
    data = encode(img, "MPO", save_all=True, append_images=[img.rotate(90)], quality=95)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert probe_image(data) == ("JPEG", *img.size)
    first = decode_image(encode(img, "JPEG", quality=95), None)
    assert np.array_equal(decode_image(data, None), first)
    assert ids(search(server, data, "phone.jpg")) == ids(search(server, as_decoded_png(data)))


def test_animated_gif_is_outside_the_allow_list(server: Server, tiny_data: Path) -> None:
    # Decided: GIF stays refused (415), animated or not. Its 256-colour palette is not a photo,
    # and the README's allow-list (JPEG, PNG, WebP, BMP, TIFF) is the contract.
    data = animated(upright(tiny_data), "GIF")
    with pytest.raises(UnsupportedFormatError):
        probe_image(data)
    r = search(server, data, "anim.jpg")
    assert r.status_code == 415, f"animated GIF should be 415 unsupported_format by decision, got {r.status_code}"
    assert r.json()["code"] == "unsupported_format" and "GIF" in r.json()["detail"]


# --- EXIF orientation ----------------------------------------------------------------------------------

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


def test_indexer_features_do_not_depend_on_orientation(tiny_data: Path) -> None:
    # The indexer's path (features.extract.image_to_features) decodes with the same function.
    img = upright(tiny_data)
    for preset in ("paper", DEFAULT_PRESET):
        conf = get_conf(preset)
        ref = image_to_features(encode(img, "PNG"), conf)
        for o in range(2, 9):
            f = image_to_features(with_orientation(img, o, "PNG"), conf)
            assert np.array_equal(f.descriptors, ref.descriptors) and np.allclose(f.xy, ref.xy), (preset, o)


def test_search_answer_is_the_same_for_every_orientation(server: Server, tiny_data: Path) -> None:
    img = upright(tiny_data)
    expected = search(server, encode(img, "PNG")).json()["results"]
    for o in range(1, 9):
        got = search(server, with_orientation(img, o, "PNG"), f"o{o}.png").json()["results"]
        assert [(h["id"], h["distance"]) for h in got] == [(h["id"], h["distance"]) for h in expected], o


@pytest.mark.parametrize("o", range(1, 9))
def test_apply_orientation_matches_pil(o: int) -> None:
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    stored = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = o
    pil = ImageOps.exif_transpose(Image.open(io.BytesIO(encode(stored, "PNG", exif=exif))))
    assert np.array_equal(apply_orientation(a, o), np.asarray(pil))


def test_corrupt_exif_is_read_as_upright(server: Server, tiny_data: Path) -> None:
    img = upright(tiny_data)
    bad = encode(img, "JPEG", quality=95, exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff")
    assert decode_image(bad, None).shape == decode_image(encode(img, "PNG"), None).shape
    assert search(server, bad, "badexif.jpg").status_code == 200


# --- tiny and blank images: 422 no_keypoints -----------------------------------------------------------


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


@pytest.mark.parametrize("name", list(tiny_and_blank()))
def test_tiny_and_single_colour_images_are_422(server: Server, name: str) -> None:
    r = search(server, tiny_and_blank()[name], name)
    assert r.status_code == 422, f"{name}: {r.status_code} {r.text}"
    assert r.json()["code"] == "no_keypoints" and "keypoints" in r.json()["detail"]


def test_single_colour_has_no_keypoints_with_dense_features_too() -> None:
    # Dense ORB describes a grid whatever the content: a flat image would give all-zero descriptors
    # that match anything. The default preset must refuse it like the FAST-based ones.
    conf = get_conf(DEFAULT_PRESET)
    for data in tiny_and_blank().values():
        with pytest.raises(NoKeypointsError):
            extract_orb(decode_image(data, conf["image"]["max_side"]), conf["features"])


# --- 3. the `file` field -------------------------------------------------------------------------------


def test_duplicated_file_field_is_422(server: Server, tiny_data: Path) -> None:
    photo = encode(upright(tiny_data), "PNG")
    files = [("file", ("a.png", photo)), ("file", ("b.png", photo))]
    r = httpx.post(server.url + "/search", files=files)
    assert r.status_code == 422
    assert r.json() == {"code": "invalid_request", "detail": "send exactly one multipart field 'file'; got 2"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"data": {"photo": "x"}},
        {"files": {"photo": ("a.png", b"\x89PNG")}},
        {"json": {"file": "aGVsbG8="}},
        {"content": b"\xff\xd8\xff", "headers": {"Content-Type": "image/jpeg"}},
    ],
    ids=["other-field", "file-under-another-name", "json-body", "raw-image-body"],
)
def test_missing_file_field_says_what_to_send(server: Server, kwargs: dict) -> None:
    r = httpx.post(server.url + "/search", **kwargs)
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_request"
    assert "multipart/form-data field 'file' is missing" in r.json()["detail"]


def test_file_field_as_plain_text_is_422(server: Server) -> None:
    r = httpx.post(server.url + "/search", data={"file": "not a file"})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request" and "file" in r.json()["detail"]
