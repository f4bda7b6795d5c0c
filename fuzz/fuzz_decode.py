"""Coverage-guided fuzzing of the upload decode path: bytes -> features.extract.query_features.

Every input must end in features or in a domain error (ImageDecodeError and its subclasses,
NoKeypointsError), which the service answers with a 4xx; any other exception, a crash, a decode
past the time limit or memory past the RSS limit is a finding that libFuzzer saves as an artifact.

    .venv/bin/python fuzz/fuzz_decode.py [libFuzzer flags] fuzz/corpus/decode   # fuzz (see `make fuzz`)
    .venv/bin/python fuzz/fuzz_decode.py FILE...                                # replay inputs once each
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from pathlib import Path

import atheris

# Coverage comes from the decode path's own modules and the Pillow modules it runs (the allowed
# formats' plugins, and TIFF's tags for EXIF): they are instrumented as they are imported, so
# nothing may import them before this block. atheris instruments whole top-level packages.
with atheris.instrument_imports(include=["features", "PIL"]):
    from PIL import (
        BmpImagePlugin,  # noqa: F401
        ExifTags,  # noqa: F401
        Image,
        ImageFile,  # noqa: F401
        JpegImagePlugin,  # noqa: F401
        MpoImagePlugin,  # noqa: F401
        PngImagePlugin,  # noqa: F401
        TiffImagePlugin,  # noqa: F401
        TiffTags,  # noqa: F401
        WebPImagePlugin,  # noqa: F401
    )

    from features.decode import ImageDecodeError
    from features.extract import query_features
    from features.limits import MAX_PIXELS
    from features.orb import NoKeypointsError

from common.pipeline import DEFAULT_PRESET, get_pipeline

# Pillow's other plugins load now, uninstrumented: never on the path, they would only dilute the map.
Image.init()
# As the service sets it (cli/main.py): OpenCV's own pixel limit behind the header check, read at the
# first decode.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))

# The service's default preset, with its verification keypoints as retrieval/searcher.py asks for them.
PIPELINE = get_pipeline(DEFAULT_PRESET)
VERIFY_FEATURES = PIPELINE.verify_features if PIPELINE.verify is not None else None
EXPECTED = (ImageDecodeError, NoKeypointsError)
# Findings are what an upload may cost: a decode past 10 s or 2 GB of memory.
DEFAULT_FLAGS = ("-rss_limit_mb=2048", "-timeout=10")


def test_one_input(data: bytes) -> None:
    """One upload through the service's decode and feature extraction; only domain errors are expected."""
    with contextlib.suppress(*EXPECTED):
        query_features(data, PIPELINE.features, VERIFY_FEATURES)


def with_default_flags(argv: list[str]) -> list[str]:
    """`argv` with the default limits added where the command line sets none, and a program name that
    libFuzzer can run again: -merge=1 (and -fork, -jobs) start it through the shell, and the script
    itself is not executable."""
    given = {arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("-")}
    program = shlex.join([sys.executable, str(Path(__file__).resolve())])
    return [program] + [f for f in DEFAULT_FLAGS if f.split("=", 1)[0] not in given] + argv[1:]


def main(argv: list[str]) -> None:
    atheris.Setup(with_default_flags(argv), test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
