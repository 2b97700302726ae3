"""Object-store backends behind one small async interface (see base.Backend)."""

from __future__ import annotations

from .base import Backend, NoSuchObject
from .local import LocalBackend

__all__ = ["Backend", "NoSuchObject", "LocalBackend", "open_backend"]


def open_backend(store_dir: str, config: dict) -> Backend:
    kind = config.get("backend", {}).get("type", "local")
    if kind == "local":
        return LocalBackend(config["backend"].get("path") or f"{store_dir}/objects")
    raise ValueError(f"unknown backend type {kind!r}")
