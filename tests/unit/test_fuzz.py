"""The decode path's fuzz target (fuzz/fuzz_decode.py) in CI: a short run from the committed corpus, every
corpus file replayed once, the target's own check that it flags what is not a domain error, and the
inputs the fuzzer found, each refused with a domain error."""

from __future__ import annotations

import importlib.util
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.pipeline import DEFAULT_PRESET, get_pipeline
from features.decode import ImageDecodeError, decode_image, png_chunks_fit, probe_image
from features.extract import query_features
from tests.imagegen import animated, encode, variants

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "fuzz" / "fuzz_decode.py"
CORPUS = ROOT / "fuzz" / "corpus" / "decode"
FUZZ_SECONDS = 30
# Findings of the fuzzer, kept in the corpus: PNGs of ~100 bytes with a chunk that declares gigabytes.
PNG_CHUNK_OVERRUNS = {
    "APNG whose first IDAT declares 4 GB": CORPUS / "4f425e5953d27301bdc822dcd8defea0f6e3e87c",
    "PNG with an IEND before its IDAT, then a chunk of 3.4 GB": CORPUS / "d1a14e60f1cbdb81e1b04d3a929f8205ab007fff",
}


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.iterdir() if p.is_file())


def atheris_or_fail() -> None:
    """In CI a missing atheris is a failure (the fuzz run would silently not happen), elsewhere a visible skip."""
    if importlib.util.find_spec("atheris") is not None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but atheris is not installed (pip install -e '.[dev]')")
    pytest.skip("atheris is not installed (pip install -e '.[dev]')")


def run_target(*args: str, timeout: float, code: str | None = None) -> subprocess.CompletedProcess[str]:
    """fuzz/fuzz_decode.py with libFuzzer's `args`, or the Python `code` that drives it; output and errors together."""
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, str(TARGET), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def output_of(proc: subprocess.CompletedProcess[str]) -> str:
    # Only the end: libFuzzer's summary and any traceback (the decoders' warnings come before).
    return (proc.stdout + proc.stderr)[-4000:]


def test_the_committed_corpus_is_small_and_named_by_content() -> None:
    files = corpus_files()
    assert files, f"no corpus in {CORPUS}: run fuzz/seeds.py"
    assert sum(p.stat().st_size for p in files) < 2_000_000
    assert all(re.fullmatch(r"[0-9a-f]{40}", p.name) for p in files), "libFuzzer's SHA-1 names, no image extensions"


def test_fuzzing_from_the_corpus_finds_nothing(tmp_path: Path) -> None:
    atheris_or_fail()
    new, findings = tmp_path / "new", tmp_path / "findings"
    new.mkdir()
    findings.mkdir()
    # -runs only bounds the run from above: the time limit ends it. New inputs go to the scratch folder.
    proc = run_target(
        f"-max_total_time={FUZZ_SECONDS}",
        "-runs=100000000",
        "-print_final_stats=1",
        f"-artifact_prefix={findings}/",
        str(new),
        str(CORPUS),
        timeout=FUZZ_SECONDS + 240,
    )
    out = output_of(proc)
    assert proc.returncode == 0, out
    assert not list(findings.iterdir()), out
    executed = re.search(r"stat::number_of_executed_units:\s*(\d+)", out)
    assert executed is not None, out
    assert int(executed.group(1)) > len(corpus_files()), out


def test_every_corpus_file_replays_without_a_finding() -> None:
    atheris_or_fail()
    files = corpus_files()
    proc = run_target(*map(str, files), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, output_of(proc)
    # With files as arguments libFuzzer runs each exactly once (and saves no artifact: the exit code tells).
    assert len(re.findall(r"^Executed .+ in \d+ ms$", out, re.MULTILINE)) == len(files), output_of(proc)


def test_the_target_flags_an_error_outside_the_domain_errors(tmp_path: Path) -> None:
    # The target run with a feature extractor that raises a plain ValueError (the base class of both
    # domain errors) for a picture that decodes. The target must report it.
    atheris_or_fail()
    seeds, findings = tmp_path / "seeds", tmp_path / "findings"
    seeds.mkdir()
    findings.mkdir()
    rng = np.random.default_rng(0)
    (seeds / "noise").write_bytes(encode(Image.fromarray(rng.integers(0, 256, (96, 128), dtype=np.uint8)), "PNG"))
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('fuzz_decode', {str(TARGET)!r})\n"
        "target = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(target)\n"
        "def outside(*args):\n"
        "    raise ValueError('outside the domain errors')\n"
        "target.query_features = outside\n"
        "target.main(sys.argv)\n"
    )
    # Fuzzing (not replaying) from a folder with the one picture, so libFuzzer saves what it ran.
    proc = run_target("-runs=1", f"-artifact_prefix={findings}/", str(seeds), code=code, timeout=300)
    out = output_of(proc)
    assert proc.returncode != 0, out
    assert "ValueError: outside the domain errors" in out, out
    assert [p.name.split("-")[0] for p in findings.iterdir()] == ["crash"], out


# The findings, each refused with a domain error; they need no atheris.


@pytest.mark.parametrize("name", list(PNG_CHUNK_OVERRUNS))
def test_png_chunk_longer_than_the_file_is_refused_before_decoding(name: str) -> None:
    # OpenCV allocated and zeroed the declared gigabytes before finding the data missing: seconds
    # and gigabytes for about 100 bytes. The header check now refuses them, so OpenCV never sees them.
    data = PNG_CHUNK_OVERRUNS[name].read_bytes()
    assert data.startswith(b"\x89PNG")
    assert not png_chunks_fit(data)
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        probe_image(data)
    with pytest.raises(ImageDecodeError):
        decode_image(data, 341)
    conf = get_pipeline(DEFAULT_PRESET)
    with pytest.raises(ImageDecodeError):
        query_features(data, conf.features, conf.verify_features)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_every_place_opencv_reads_a_declared_length_is_checked() -> None:
    # Where OpenCV allocates a chunk's declared length: every chunk up to the first IDAT, IEND
    # included, and each IDAT of an animated PNG's first frame. A gigabyte claimed in 16 bytes.
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    still, moving = encode(img, "PNG"), animated(img, "PNG")
    head = still[:33]  # signature and IHDR
    claim = struct.pack(">I", 1 << 30)
    at = still.index(b"IDAT") - 4
    first = moving.index(b"IDAT") - 4
    idat_end = first + 12 + int.from_bytes(moving[first : first + 4], "big")
    bad = {
        "first IDAT": still[:at] + claim + still[at + 4 :],
        "IEND before IDAT, then IDAT": head + chunk(b"IEND", b"") + claim + b"IDAT" + bytes(16),
        "IEND first": head + claim + b"IEND" + bytes(16),
        "second IDAT of an APNG": moving[:idat_end] + claim + b"IDAT" + bytes(16) + moving[idat_end:],
    }
    for name, data in bad.items():
        with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
            probe_image(data)
        assert not png_chunks_fit(data), name
    assert probe_image(still) == ("PNG", 128, 96)
    # Bytes after the IEND that ends the image are not chunks: OpenCV stops there, and so does the check.
    assert png_chunks_fit(still + claim + b"IDAT")


def test_every_png_the_service_reads_passes_the_chunk_check() -> None:
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    pngs = {name: data for name, data in variants(img).items() if name.endswith(".png")}
    pngs["animated.png"] = animated(img, "PNG")
    pngs["trailing-bytes.png"] = pngs["rgb.png"] + b"\x00" * 7  # after IEND: not a chunk
    for name, data in pngs.items():
        assert png_chunks_fit(data), name
        assert decode_image(data, None).shape == (96, 128), name
