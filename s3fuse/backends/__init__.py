"""Object-store backends behind one small async interface (see base.Backend)."""

from __future__ import annotations

import os

from .base import BarrierFailed, Backend, NoSuchObject
from .local import LocalBackend

__all__ = ["Backend", "BarrierFailed", "NoSuchObject", "LocalBackend", "open_backend"]


def open_backend(store_dir: str, config: dict) -> Backend:
    """The backend a store's configuration names. For S3, `store_dir` is the local state
    directory (its cache/ holds the object cache); settings in config["backend"]:
    cache_mib, cache_writes_upto_kib, max_requests, retry_budget (seconds), multipart_threshold_mib."""
    b = config.get("backend", {})
    kind = b.get("type", "local")
    if kind == "local":
        return LocalBackend(b.get("path") or f"{store_dir}/objects")
    if kind == "s3":
        from .s3 import (DEFAULT_CACHE_LIMIT, DEFAULT_CACHE_WRITES_UPTO, DEFAULT_MAX_REQUESTS,
                         DEFAULT_RETRY_BUDGET, MULTIPART_THRESHOLD)
        from .s3 import S3Backend, S3Location

        return S3Backend(
            S3Location.from_config(b), cache_dir=os.path.join(store_dir, "cache"),
            cache_limit=int(b.get("cache_mib", DEFAULT_CACHE_LIMIT >> 20)) << 20,
            max_requests=int(b.get("max_requests", DEFAULT_MAX_REQUESTS)),
            retry_budget=float(b.get("retry_budget", DEFAULT_RETRY_BUDGET)),
            multipart_threshold=int(b.get("multipart_threshold_mib", MULTIPART_THRESHOLD >> 20)) << 20,
            cache_writes_upto=int(b.get("cache_writes_upto_kib", DEFAULT_CACHE_WRITES_UPTO >> 10)) << 10)
    raise ValueError(f"unknown backend type {kind!r}")
