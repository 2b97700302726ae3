"""Handing decrypted data we already hold to the kernel's page cache (FUSE_NOTIFY_STORE).

A read that misses has to fetch and authenticate a whole segment (64 KiB; over S3 a whole
object), but the kernel asked for only a page or a few. Storing the rest in the kernel's page
cache lets later reads of it finish in the kernel, without a request to the daemon: random
reads of a file get cheaper the more of it has been touched, as with a local file.

The kernel writes what it is sent over the pages, dirty or not, and extends the file if the
data reach past its end. So data go to the kernel only for a file that

1. has an open handle (so its inode number cannot be reused meanwhile),
2. has no handle open for writing (with the write-back cache the kernel writes a file's dirty
   pages back before it releases the last writable handle, so it holds none),
3. has no unflushed data in the daemon, and
4. has not changed since the data were read.

Every change (an open for writing, a truncate, the file's in-memory state being dropped) bumps
the file's generation under this module's lock; a queued push re-checks the generation under
the same lock just before it reaches the kernel, and the change waits for a push of that inode
that is already under way.

Pushes run in one worker thread of their own: storing a page waits for its lock, which a read
the event loop has not answered yet may hold, so the event loop must never make this call,
with one exception: `store_now`, a whole small file at its only OPEN, when no READ of it can
be under way (data.readcache, ReadCache._push_on_open).
The same thread tells the kernel to drop cached attributes that changed without a request
of its own (st_blocks after a background flush): a notification is a write to the FUSE
device, which need not cost the event loop a system call.
"""

from __future__ import annotations

import collections
import errno
import logging
import threading
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class Pushable(Protocol):
    """What the pusher needs of a file's in-memory state (data.FileState)."""

    ino: int
    push_gen: int


class PageCachePusher:
    """A bounded queue of page-cache stores, drained by one thread.

    `store(ino, offset, data)` is the kernel call (pyfuse3.notify_store). Pushes are best
    effort: when the queue holds `max_queued` bytes, new ones are dropped.
    `drop_attrs(ino)` (pyfuse3.invalidate_inode with attr_only) makes the kernel forget an
    inode's cached attributes.
    """

    def __init__(self, store: Callable[[int, int, memoryview], None],
                 drop_attrs: Callable[[int], None] | None = None, max_queued: int = 32 << 20) -> None:
        self._store = store
        self._drop_attrs = drop_attrs
        self._stale_attrs: collections.deque[int] = collections.deque()
        self._max_queued = max_queued
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: collections.deque[tuple[Pushable, int, int, memoryview]] = collections.deque()
        self._queued_bytes = 0
        self._busy_ino: int | None = None  # the inode whose data is being stored right now
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="s3fuse-pagecache", daemon=True)
        self._thread.start()
        self.stats = {"pagecache_bytes_pushed": 0, "pagecache_pushes_dropped": 0, "pagecache_opens_served": 0}

    # ------------------------------------------------------------------ event loop side
    def push(self, fs: Pushable, gen: int, offset: int, data: memoryview) -> None:
        """Queue `data` for the kernel's page cache of `fs` at `offset`, valid while the
        file's generation is still `gen`. Never blocks."""
        with self._lock:
            if self._closed or fs.push_gen != gen:
                return
            if self._queued_bytes + len(data) > self._max_queued:
                self.stats["pagecache_pushes_dropped"] += 1
                return
            self._queue.append((fs, gen, offset, data))
            self._queued_bytes += len(data)
            self._changed.notify_all()

    def store_now(self, ino: int, data: memoryview) -> None:
        """Store a whole small file's data at once, from the event loop, while its only
        OPEN is being answered (data.readcache, ReadCache._push_on_open, says why that cannot wait on a
        page lock). Best effort: a failure costs only the READ that the kernel then sends."""
        try:
            self._store(ino, 0, data)
            with self._lock:
                self.stats["pagecache_bytes_pushed"] += len(data)
                self.stats["pagecache_opens_served"] += 1
        except OSError as exc:
            log.debug("page-cache store at open of inode %d failed: %s", ino, exc)

    def attrs_changed(self, inos: list[int]) -> None:
        """The kernel's cached attributes of `inos` are stale: have them dropped. Never blocks."""
        if self._drop_attrs is None:
            return
        with self._lock:
            if not self._closed:
                self._stale_attrs.extend(inos)
                self._changed.notify_all()

    def invalidate(self, fs: Pushable | None, ino: int) -> bool:
        """The file is about to change: cancel its queued pushes. True if a push of this
        inode is under way right now; the caller must then `wait_for` it (in a thread)."""
        with self._lock:
            if fs is not None:
                fs.push_gen += 1
            return self._busy_ino == ino

    def wait_for(self, ino: int) -> None:
        """Block until no push of `ino` is under way (a worker thread calls this)."""
        with self._lock:
            while self._busy_ino == ino:
                self._changed.wait()

    @property
    def pending(self) -> int:
        """Pushes queued or under way (for status and tests)."""
        with self._lock:
            return len(self._queue) + (self._busy_ino is not None)

    def close(self, timeout: float = 5.0) -> None:
        """Drop what is queued and stop the thread (before the FUSE session goes away)."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._stale_attrs.clear()
            self._queued_bytes = 0
            self._changed.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stale_attrs and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                stale = list(self._stale_attrs)
                self._stale_attrs.clear()
            if stale:
                self._drop_stale(stale)
                continue
            with self._lock:
                if not self._queue:
                    continue
                fs, gen, offset, data = self._queue.popleft()
                self._queued_bytes -= len(data)
                if fs.push_gen != gen:
                    continue  # changed since it was read: the data may be stale
                self._busy_ino = fs.ino
            try:
                self._store(fs.ino, offset, data)
                self.stats["pagecache_bytes_pushed"] += len(data)
            except OSError as exc:
                # ENOENT: the kernel has already forgotten the inode. Nothing is lost either way.
                log.debug("page-cache store for inode %d at %d failed: %s", fs.ino, offset, exc)
            finally:
                with self._lock:
                    self._busy_ino = None
                    self._changed.notify_all()

    def _drop_stale(self, inos: list[int]) -> None:
        for ino in inos:
            try:
                self._drop_attrs(ino)
            except OSError as exc:
                # ENOENT: the kernel does not hold the inode, so it caches nothing of it
                if exc.errno != errno.ENOENT:
                    log.debug("dropping the kernel's attributes of inode %d failed: %s", ino, exc)
