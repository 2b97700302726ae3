"""Whole files written with O_DIRECT, for object files that should not pass through the page
cache: a local store's block objects and the S3 backend's cache of fetched objects.

On this VM a buffered write of a block object cost more than everything else in the write
path together: the kernel's copy into fresh page-cache pages (`copy_folio_from_iter_atomic`)
was 32% of all CPU during a 1 GiB sequential write, and every such page is also one to write
back, and later reclaim, though nothing is likely to read it before it is evicted. With
O_DIRECT the disk reads the bytes straight out of one of a few page-aligned buffers that are
reused (mapped once, so they stay warm).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Sequence

BLOCK = 4096  # O_DIRECT wants offsets, lengths and buffer addresses in whole blocks
DIRECT_BUFFER = 4 << 20 | 64 << 10  # a 4 MiB block's object (header and tags) fits


class DirectWriter:
    """Writes a file with O_DIRECT from one of `buffers` page-aligned buffers.

    `write` returns False when this is not possible here (the file is larger than a buffer,
    every buffer is in use, or the filesystem refuses O_DIRECT, as tmpfs does); the caller then
    writes the usual way. Thread-safe: puts run in worker threads.
    """

    def __init__(self, buffers: int = 2, size: int = DIRECT_BUFFER) -> None:
        self.size = size
        # mmap gives page-aligned memory; the kernel maps it only when first written
        self._free = [mmap.mmap(-1, size) for _ in range(buffers)]
        self._lock = threading.Lock()
        self.ok = True  # False once the filesystem refused O_DIRECT
        self.writes = 0

    def write(self, path: str, parts: Sequence[bytes | bytearray | memoryview], size: int,
              mode: int = 0o600) -> bool:
        """Create `path` holding the concatenation of `parts` (`size` bytes in all)."""
        if size > self.size or not self.ok:
            return False
        with self._lock:
            if not self._free:
                return False
            buf = self._free.pop()
        try:
            pos = 0
            for p in parts:
                buf[pos:pos + len(p)] = p
                pos += len(p)
            return self.write_aligned(path, buf, size, mode)
        finally:
            with self._lock:
                self._free.append(buf)

    def write_aligned(self, path: str, buf: mmap.mmap, size: int, mode: int = 0o600) -> bool:
        """Create `path` holding the first `size` bytes of `buf`, page-aligned memory of at
        least `size` rounded up to whole blocks (`aligned_buffer`), written as it is."""
        if not self.ok:
            return False
        padded = -(-size // BLOCK) * BLOCK  # whole blocks; the tail is cut off below
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, mode)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.ok = False
            return False
        try:
            view = memoryview(buf)[:padded]
            done = 0
            while done < padded:
                done += os.write(fd, view[done:])
            os.ftruncate(fd, size)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            if exc.errno != errno.EINVAL:
                raise
            self.ok = False
            return False
        os.close(fd)
        self.writes += 1
        return True


def aligned_buffer(size: int) -> memoryview:
    """`size` bytes of page-aligned memory of their own (whole blocks of it, for
    `DirectWriter.write_aligned`), returned to the kernel when the last view of it goes."""
    return memoryview(mmap.mmap(-1, -(-size // BLOCK) * BLOCK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))[:size]
