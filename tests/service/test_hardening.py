"""Upload hardening over real HTTP on loopback: body size without a trustworthy
Content-Length, every image variant searchable as its decoded pixels, EXIF orientation, tiny and blank
images, and the `file` field. tests/service/test_api.py has the other bad inputs (empty, random bytes,
HTML, GIF, pixel bomb, truncated JPEG, k out of range); tests/unit/test_uploads.py the same decoding
without a server.
"""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.core.body_limit import MULTIPART_OVERHEAD
from features.decode import UnsupportedFormatError, decode_image, probe_image
from tests.conftest import Server
from tests.imagegen import (
    animated,
    as_decoded_png,
    encode,
    many_scans,
    tiny_and_blank,
    upright,
    variants,
    with_orientation,
)

CAP = 10 * 1024 * 1024 + MULTIPART_OVERHEAD  # the server fixture runs with the default 10 MB upload limit


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


def test_declared_content_length_over_cap_is_413_before_the_body(server: Server) -> None:
    # Headers only: if the server waited for the 50 MB body it announced, this would time out.
    head = (
        "POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
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
        "POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=bnd\r\n"
        "Content-Length: 1000\r\n\r\n"
    )
    answer = raw_http(server, head, iter([multipart_prefix("bnd"), b"\xff" * (3 << 20)]))
    assert answer.startswith(b"HTTP/1.1 4"), answer[:200]
    assert b" 500 " not in answer and server.proc.poll() is None
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_every_variant_is_searchable(server: Server, tiny_data: Path) -> None:
    # The service answers each variant exactly as it answers the pixels the indexer's decode makes
    # of it: the same decode on both sides. (The paper preset reacts to a grey level of rounding,
    # so the answer is compared with that of the decoded pixels, not with the RGB original.)
    for name, data in variants(upright(tiny_data)).items():
        r = search(server, data, name)
        assert r.status_code == 200, f"{name}: {r.status_code} {r.text}"
        assert ids(r) == ids(search(server, as_decoded_png(data))), name


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


def test_search_answer_is_the_same_for_every_orientation(server: Server, tiny_data: Path) -> None:
    img = upright(tiny_data)
    expected = search(server, encode(img, "PNG")).json()["results"]
    for o in range(1, 9):
        got = search(server, with_orientation(img, o, "PNG"), f"o{o}.png").json()["results"]
        assert [(h["id"], h["distance"]) for h in got] == [(h["id"], h["distance"]) for h in expected], o


def test_corrupt_exif_is_read_as_upright(server: Server, tiny_data: Path) -> None:
    img = upright(tiny_data)
    bad = encode(img, "JPEG", quality=95, exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff")
    assert decode_image(bad, None).shape == decode_image(encode(img, "PNG"), None).shape
    assert search(server, bad, "badexif.jpg").status_code == 200


@pytest.mark.parametrize("name", list(tiny_and_blank()))
def test_tiny_and_single_colour_images_are_422(server: Server, name: str) -> None:
    r = search(server, tiny_and_blank()[name], name)
    assert r.status_code == 422, f"{name}: {r.status_code} {r.text}"
    assert r.json()["code"] == "no_keypoints" and "keypoints" in r.json()["detail"]


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


def test_a_jpeg_past_the_decoding_budget_is_422_while_searches_go_on(server: Server, tiny_data: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    img = upright(tiny_data)
    heavy = many_scans(img, 3000)
    assert len(heavy) < 2 << 20  # small on the wire: the cost is in decoding it
    normal = encode(img, "JPEG", progressive=True, quality=90)
    with ThreadPoolExecutor(4) as pool:
        bombs = [pool.submit(search, server, heavy, "scans.jpg") for _ in range(4)]
        searches = [pool.submit(search, server, normal, "photo.jpg") for _ in range(4)]
        for f in bombs:
            r = f.result()
            assert r.status_code == 422 and r.json()["code"] == "image_too_complex", r.text
            assert "scans" in r.json()["detail"]
        assert all(f.result().status_code == 200 for f in searches)


def test_thumbnails_are_cached_and_their_making_is_rate_limited(
    tiny_data: Path, tiny_artifacts: Path, start_server
) -> None:
    srv = start_server(
        {
            "IMGSEARCH_DATA": str(tiny_data),
            "IMGSEARCH_ARTIFACTS": str(tiny_artifacts),
            "IMGSEARCH_PRESET": "paper",
            "IMGSEARCH_THUMBNAILS_PER_S": "0.2",
            "IMGSEARCH_THUMBNAIL_BURST": "3",
        },
        wait_path="/readyz",
    )
    answers = [httpx.get(f"{srv.url}/images/{i}/thumbnail") for i in range(6)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429, 429, 429]
    limited = answers[3]
    assert limited.json()["code"] == "rate_limited" and int(limited.headers["Retry-After"]) >= 1
    # Made once, they are served from the worker's cache whatever the rate.
    for i in range(3):
        again = httpx.get(f"{srv.url}/images/{i}/thumbnail")
        assert again.status_code == 200 and again.content == answers[i].content
