"""Multipart uploads (not yet served: 501)."""

from __future__ import annotations

from .errors import S3Error


class Multipart:
    def __init__(self, api) -> None:
        self.api = api

    async def dispatch(self, ctx, bucket: str, key: str):
        raise S3Error("NotImplemented", "multipart uploads are not implemented yet", status=501)

    async def list_uploads(self, ctx, bucket: str):
        raise S3Error("NotImplemented", "multipart uploads are not implemented yet", status=501)
