"""Small filesystem helpers shared by the store, keyring and backends."""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable

_libc = ctypes.CDLL(None, use_errno=True)


def _on_dir(path: str, fn: Callable[[int], None]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fn(fd)
    finally:
        os.close(fd)


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fsync_dir(path: str) -> None:
    _on_dir(path, os.fsync)


def syncfs(path: str) -> None:
    """syncfs(2): everything written to the filesystem holding `path` reaches stable storage."""
    _on_dir(path, _syncfs)


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` so that a crash leaves the old or the new file, durably."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


# Linux's CLOCK_REALTIME_COARSE (Python 3.11's time module has no name for it)
CLOCK_REALTIME_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)


def now_ns() -> int:
    """The time to stamp inodes with: the coarse clock the kernel stamps them with (ext4's
    timestamps come from it too, a tick of a few ms). With the write-back cache the kernel
    keeps a file's mtime and sends it back with a SETATTR at close when a write changed it; a
    file written in the tick it was created in then still has the mtime we gave it, and no
    SETATTR follows."""
    return time.clock_gettime_ns(CLOCK_REALTIME_COARSE)


def one_error(group: BaseExceptionGroup,
              kind: type[BaseException] = Exception) -> BaseException:
    """The first error of a nursery's exception group when every error in it is a `kind`
    (concurrent puts failing alike: report one, with its errno); else the group itself.
    trio nurseries always raise groups, even of one error, which `except S3fuseError`
    would not catch."""
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup) -> None:
        for e in g.exceptions:
            walk(e) if isinstance(e, BaseExceptionGroup) else leaves.append(e)

    walk(group)
    if leaves and all(isinstance(e, kind) for e in leaves):
        return leaves[0]
    return group
