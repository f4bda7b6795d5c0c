"""Property tests over real HTTP on loopback:

- hypothesis: any bytes, and valid JPEG/PNG/WebP bytes mutated or cut, posted to /search give 2xx or
  4xx, a 4xx body is JSON with a `code`, and the server process is still alive afterwards;
- schemathesis: every operation of the served OpenAPI schema, with generated (valid and invalid)
  parameters and bodies, answers without a 5xx and as its schema documents (status codes, content
  type, body schema). Admin operations get the X-API-Key.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import ADMIN_KEY, Server

# Leading bytes of each format the service knows, so generated bodies reach the decoders too.
MAGIC = [b"", b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM", b"II*\x00", b"GIF89a"]
# derandomize: CI runs the same examples every time, so a failure is reproducible, not a flake.
PROPS = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def valid_images(tiny_data: Path) -> list[bytes]:
    q = json.loads((tiny_data / "query" / "query.json").read_text())
    img = Image.open(tiny_data / q["im_paths"][0]).convert("RGB")
    out = []
    for fmt, kw in (("JPEG", {"quality": 90}), ("PNG", {}), ("WEBP", {"quality": 80})):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out.append(buf.getvalue())
    return out


def assert_handled(r: httpx.Response, server: Server) -> None:
    assert 200 <= r.status_code < 300 or 400 <= r.status_code < 500, f"{r.status_code}: {r.text[:300]}"
    body = r.json()  # every answer is JSON
    if r.status_code >= 400:
        assert isinstance(body.get("code"), str) and body["code"], body
        assert isinstance(body.get("detail"), str) and body["detail"], body
    assert server.proc.poll() is None, "the server process died"


@PROPS
@given(prefix=st.sampled_from(MAGIC), payload=st.binary(max_size=4096))
def test_any_bytes_give_2xx_or_4xx(client: httpx.Client, server: Server, prefix: bytes, payload: bytes) -> None:
    r = client.post("/search", files={"file": ("x.jpg", prefix + payload, "image/jpeg")})
    assert_handled(r, server)


@PROPS
@given(data=st.data())
def test_mutated_images_give_2xx_or_4xx(
    client: httpx.Client, server: Server, valid_images: list[bytes], data: st.DataObject
) -> None:
    img = bytearray(data.draw(st.sampled_from(valid_images), label="image"))
    # Overwrite a few bytes anywhere (headers included), then maybe cut the tail off or splice in junk.
    for _ in range(data.draw(st.integers(0, 16), label="n_flips")):
        img[data.draw(st.integers(0, len(img) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans(), label="truncate"):
        img = img[: data.draw(st.integers(0, len(img)), label="cut_at")]
    if data.draw(st.booleans(), label="splice"):
        at = data.draw(st.integers(0, len(img)))
        img[at:at] = data.draw(st.binary(min_size=1, max_size=256))
    k = data.draw(st.one_of(st.integers(-3, 120), st.sampled_from(["", "x", "1e3", "10.0"])), label="k")
    r = client.post("/search", params={"k": k}, files={"file": ("m.jpg", bytes(img))})
    assert_handled(r, server)


# --- schemathesis -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema_server(tiny_data: Path, tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory, start_server):
    """A server of its own, on a copy of the artifacts: generated admin calls may change its index."""
    artifacts = tmp_path_factory.mktemp("schemathesis") / "artifacts"
    shutil.copytree(tiny_artifacts, artifacts)
    return start_server(
        {
            "IMGSEARCH_DATA": str(tiny_data),
            "IMGSEARCH_ARTIFACTS": str(artifacts),
            "IMGSEARCH_PRESET": "paper",
            "IMGSEARCH_ADMIN_KEY": ADMIN_KEY,
        }
    )


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def test_api_conforms_to_its_openapi_schema(schema_server: Server) -> None:
    # schemathesis' own pytest plugin (from_fixture/parametrize) does not run under pytest 9, so its
    # per-operation hypothesis strategies are driven here directly: valid data with the admin key,
    # then invalid data (the admin key is generated too, so 401/403 are exercised).
    schema = schemathesis.openapi.from_url(schema_server.url + "/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/search", "/metrics/precision", "/healthz", "/readyz"}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fixed = {"headers": {"X-API-Key": ADMIN_KEY}} if mode is GenerationMode.POSITIVE else {}

            @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=op.as_strategy(generation_mode=mode, **fixed))
            def check(case) -> None:
                case.call_and_validate(checks=CHECKS, timeout=60)

            try:
                check()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, f"no valid request for {op.method.upper()} {op.path}"
                # No parameters, or only headers (any string is a valid header): no invalid request exists.
            except Exception as e:  # collect every operation's failure, then report them together
                failures.append(f"{op.method.upper()} {op.path} ({mode}): {e}")
            assert schema_server.proc.poll() is None, f"the server died on {op.method.upper()} {op.path}"
    assert not failures, "\n\n".join(failures)
