"""What an uploaded image may be, in a module of constants: the serving supervisor reads them without
loading OpenCV or Pillow (features/decode.py enforces them)."""

from __future__ import annotations

MAX_PIXELS = 40_000_000  # a 40-megapixel photo; larger uploads are refused before decoding
# A progressive JPEG is decoded scan by scan and a scan may cover the whole picture, so the work grows
# with scans x pixels; encoders write 1 (baseline) to about 12 scans. Both bounds hold a decode to about
# the cost of a 40-megapixel progressive photo; past them an upload is refused before decoding.
MAX_JPEG_SCANS = 64
MAX_SCAN_PIXELS = 12 * MAX_PIXELS
