"""What an uploaded image may be, in a module of constants: the serving supervisor reads them without
loading OpenCV or Pillow (features/decode.py enforces them)."""

from __future__ import annotations

MAX_PIXELS = 40_000_000  # a 40-megapixel photo; larger uploads are refused before decoding
