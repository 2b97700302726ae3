"""Errors that carry an errno: the one vocabulary the FUSE adapter and CLI translate."""

from __future__ import annotations

import errno


class S3fuseError(Exception):
    """Base class: an error with a user-facing message and an errno."""

    errno: int = errno.EIO

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        if err is not None:
            self.errno = err


class StoreError(S3fuseError):
    """The store is missing, uninitialised, locked, or its state files are bad."""

    errno = errno.EINVAL


class IntegrityError(S3fuseError):
    """An object failed authentication or does not match its metadata."""

    errno = errno.EIO


class BackendError(S3fuseError):
    """The object store failed (I/O error, missing object, no space...)."""

    errno = errno.EIO


class KeyUnavailable(S3fuseError):
    """The key needed for an object is not loaded or not usable."""

    errno = errno.ENOKEY


class KmsUnavailable(S3fuseError):
    """An external KMS did not answer within its retry budget (not an integrity problem)."""

    errno = errno.EIO
