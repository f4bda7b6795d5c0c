"""The capped read of an uploaded file, shared by every route that takes one."""

from __future__ import annotations

from fastapi import UploadFile

from app.errors import ApiError


async def read_capped(file: UploadFile, limit: int) -> bytes:
    """The upload's bytes; 413 past `limit` (the body middleware caps the stream before this)."""
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise ApiError("too_large", f"upload exceeds {limit} bytes")
    return data
