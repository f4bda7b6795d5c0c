"""Seed corpus for fuzz/fuzz_decode.py: every upload variant the tests make, and the uploads that must be refused.

The pictures are a real photo of the synthetic street (dataset/synthetic.py), shrunk so the seeds
stay small, encoded every way tests/images.py does (formats, bit depths, colour modes, EXIF
orientations, animation, MPO, tiny and blank images, a progressive JPEG and the same with its
smallest scan repeated up to the scan limit and past it), plus other formats' headers, truncated
files and a corrupt EXIF block.
They are written to a scratch folder, then merged with libFuzzer's -merge=1 into the corpus folder,
which keeps only the seeds that add coverage, under their SHA-1 names.

    .venv/bin/python fuzz/seeds.py [--corpus fuzz/corpus/decode]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/images.py, when run as a script

from dataset import synthetic  # noqa: E402
from features.decode import jpeg_scans  # noqa: E402
from features.limits import MAX_JPEG_SCANS  # noqa: E402
from tests.imagegen import (  # noqa: E402
    STORE,
    animated,
    encode,
    many_scans,
    tiny_and_blank,
    upright,
    variants,
    with_orientation,
)

TARGET = ROOT / "fuzz" / "decode.py"
CORPUS = ROOT / "fuzz" / "corpus" / "decode"
WIDTH = 128  # pixels: enough texture for ORB keypoints, small enough for fast runs and a small corpus
ORIENTED = ("JPEG", "PNG", "WEBP", "TIFF")  # the formats that carry EXIF orientation


def photo(work: Path) -> Image.Image:
    """The synthetic street's first query photo, shrunk to WIDTH pixels wide."""
    data = synthetic.main(work / "tiny", synthetic.confs["tiny"])
    img = upright(data)
    return img.resize((WIDTH, max(1, round(img.height * WIDTH / img.width))), Image.Resampling.LANCZOS)


def seeds(img: Image.Image) -> dict[str, bytes]:
    out = dict(variants(img))
    for fmt in ("WEBP", "PNG"):
        out[f"animated.{fmt.lower()}"] = animated(img, fmt)
    for fmt in ORIENTED:
        for o in STORE:
            out[f"exif{o}.{fmt.lower()}"] = with_orientation(img, o, fmt)
    out |= tiny_and_blank()
    out["mpo.jpg"] = encode(img, "MPO", save_all=True, append_images=[img.rotate(90)], quality=95)
    progressive = encode(img, "JPEG", quality=90, progressive=True)
    out["progressive.jpg"] = progressive
    # The scan limit's both sides: decoded at the limit, refused past it (a valid JPEG may repeat scans).
    scans = jpeg_scans(progressive)
    out["scans-at-limit.jpg"] = many_scans(img, MAX_JPEG_SCANS - scans)
    out["scans-many.jpg"] = many_scans(img, 4 * MAX_JPEG_SCANS)
    out["bad-exif.jpg"] = encode(img, "JPEG", quality=95, exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff")
    # Formats outside the allow-list: refused by their leading bytes.
    out["animated.gif"] = animated(img, "GIF")
    out["ico"] = encode(img, "ICO", sizes=[(32, 32)])
    out["pdf"] = encode(img, "PDF")[:512]
    out["psd"] = b"8BPS\x00\x01" + bytes(6) + b"\x00\x03" + (96).to_bytes(4, "big") + (128).to_bytes(4, "big")
    out["svg"] = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="128" height="96"/>'
    # Cut short: in the middle of the pixels, and just past the header.
    for name in ("rgb.jpg", "rgb.png", "lossless.webp", "tiff", "bmp", "progressive.jpg"):
        data = out[name]
        out[f"half-{name}"] = data[: len(data) // 2]
        out[f"head-{name}"] = data[:64]
    return out


def merge(staging: Path, corpus: Path) -> None:
    """Merge `staging` into `corpus`: only inputs that add coverage are copied, under their SHA-1."""
    corpus.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(TARGET), "-merge=1", str(corpus), str(staging)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="folder the seeds are merged into")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        staging = work / "seeds"
        staging.mkdir()
        for name, data in seeds(photo(work)).items():
            (staging / name).write_bytes(data)
        merge(staging, args.corpus)
    files = [p for p in args.corpus.iterdir() if p.is_file()]
    print(f"{len(files)} inputs, {sum(p.stat().st_size for p in files)} bytes in {args.corpus}")


if __name__ == "__main__":
    main()
