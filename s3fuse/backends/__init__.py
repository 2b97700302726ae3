"""Object-store backends behind one small async interface (see base.Backend)."""

from __future__ import annotations

from .base import Backend, NoSuchObject
from .local import LocalBackend

__all__ = ["Backend", "NoSuchObject", "LocalBackend", "open_backend"]


def open_backend(store_dir: str, config: dict) -> Backend:
    return _with_faults(_open(store_dir, config))


def _open(store_dir: str, config: dict) -> Backend:
    kind = config.get("backend", {}).get("type", "local")
    if kind == "local":
        return LocalBackend(config["backend"].get("path") or f"{store_dir}/objects")
    raise ValueError(f"unknown backend type {kind!r}")


def _with_faults(backend: Backend) -> Backend:
    """Tests only: wrap in fault injection when S3FUSE_TESTING_FAULT_PLAN names a plan file."""
    import os

    from .faulty import FAULT_ENV, FaultyBackend

    plan = os.environ.get(FAULT_ENV)
    return FaultyBackend(backend, plan) if plan else backend
