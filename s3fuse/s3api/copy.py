"""CopyObject (not yet served: 501)."""

from __future__ import annotations

from .errors import S3Error


async def copy_object(ctx, bucket: str, key: str):
    raise S3Error("NotImplemented", "CopyObject is not implemented yet", status=501)
