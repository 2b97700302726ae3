"""The data path: write buffers, flushing to objects, and the decrypted-segment cache.

Writes land in per-block buffers in memory (bounded by `dirty_limit`). A flush
encrypts the dirty blocks of one or more files into new objects, puts them,
passes one durability barrier (`Backend.sync`) and only then commits the block
map, sizes and times in one transaction: so committed metadata never points at an
object that could be lost. Replaced objects go to the `garbage` table in that same
transaction and a collector deletes them afterwards.

Reads fetch only the segments a request needs and keep decrypted segments in a
bounded LRU (memory only: plaintext never touches the disk).
"""

from __future__ import annotations

import contextvars
import errno
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from . import defaults
from . import format as fmt
from .backends import Backend, NoSuchObject
from .crypto import SYSTEM, Caller, KeyManager, WrappedKey, WriteGrant
from .errors import BackendError, IntegrityError, KeyUnavailable, S3fuseError
from .meta import BlockRef, Meta
from .pagecache import PageCachePusher
from .policy import DEFAULT, LOST_AT_STOP, SSE_KMS, SSE_S3, XATTR_DAMAGE, Policy
from .util import now_ns, one_error
from .workers import WorkerPool

log = logging.getLogger(__name__)
# set in a task that fetches ahead of any read: its failures are not logged, since the read
# that needs the data fetches it again and reports what it finds
_SPECULATIVE = contextvars.ContextVar("s3fuse_speculative", default=False)

# Crypto on buffers above this size goes to a worker thread; below it the hand-off
# costs more than the work (AES-GCM runs at several GB/s here).
THREAD_THRESHOLD = 256 * 1024
GRANT_WAIT = 10.0  # s: a store waits this long for block 0's key still being made after the open
PAGE = 4096  # the kernel's page size, the unit of its page cache
READAHEAD = 4 * 1024 * 1024  # a sequential reader fetches the rest of the block at once
READ_AROUND = 256 * 1024  # a random reader's miss fetches the aligned range around it
PREFETCH_BLOCKS = 8  # over S3, a sequential reader has the next 8 blocks' objects fetched ahead
PREFETCH_TRIGGER = 1 << 20  # ... when a read starts within the first MiB of a block
# a file up to this size opened for reading is fetched at once, while the kernel returns from
# open(2) and sends its first read: the fetch's latency overlaps that round trip
PREFETCH_ON_OPEN = 256 * 1024
PREFETCH_TASKS = 8  # such fetches (and core's read-ahead of names) under way at once
BATCH_DELAY = 0.03  # a streaming writer's full blocks are stored this soon
# Closed files wait this long, so that the closes of a burst of small files share one put batch,
# one sync and one commit: each sync is a journal commit of the disk under the store, which
# holds up the metadata database's writes meanwhile. fsync, truncate and memory pressure do not
# wait.
CLOSE_BATCH_DELAY = 0.25
# at most this many files per flush batch; a longer queue is worked off batch after batch,
# without the delay above between them (with it, a burst of small files was stored slowly,
# and a reader that followed competed with the backlog for seconds)
FLUSH_BATCH = 256
# how long stored blocks of a streaming writer may wait for their metadata commit
COMMIT_DELAY = 1.0
# a file whose store keeps failing for a reason of its own is retried alone, after this
# long, doubling up to the maximum: the files it was batched with never wait for it
RETRY_FIRST = 1.0
RETRY_MAX = 30.0
# a writer that finds the write-back buffer full of data that cannot be stored waits at most
# this long for space, then gets ENOSPC (its data was never accepted)
SPACE_WAIT = 30.0


@dataclass(eq=False)
class Block:
    """A block of an open file that differs from (or is not yet in) the store."""

    data: bytearray
    version: int = 0
    # written up to its end by a write that ended there: a sequential writer is done with it,
    # so it is worth storing now rather than waiting for close or idleness
    sealed: bool = False
    inflight: bool = False  # being encrypted from this very buffer: copy before changing it
    superseded: bool = False  # a copy replaced it while in flight; its bytes still count as dirty


@dataclass(eq=False)
class FileState:
    """In-memory state of a file with open handles or unflushed data."""

    ino: int
    size: int  # current size, including unflushed writes
    db_size: int  # size in the committed metadata
    mtime_ns: int
    ctime_ns: int
    policy: Policy = DEFAULT  # encryption of this file's new objects
    writer: Caller = SYSTEM  # whose key access stores this file's data (the last writer)
    # the key the last writer's open fixed for storing its data (crypto.WriteGrant)
    grant: WriteGrant | None = None
    blocks: dict[int, Block] = field(default_factory=dict)
    open_count: int = 0
    flush_requested: bool = False
    dirty_since: float = 0.0
    error: int = 0  # errno of a failed background flush, reported at the next write or fsync
    # a store of this file failed for a reason of its own: retried alone, not before retry_at
    # (monotonic), with a delay that doubles per failure; `failure` says why, for status
    retry_delay: float = 0.0
    retry_at: float = 0.0
    failure: str = ""
    last_read_end: int = -1
    # handles open for writing, plus changes under way (truncate): while any, nothing is
    # pushed to the kernel's page cache (pagecache.py)
    writers: int = 0
    push_gen: int = 0  # bumped by every change: pushes of data read before it are dropped
    # st_blocks (in bytes) the kernel was last told, or the stored value it may cache: if a
    # commit stores another, its cached attributes are invalidated (see `attrs_changed`)
    stored_reported: int = 0

    @property
    def dirty(self) -> bool:
        return bool(self.blocks) or self.size != self.db_size


class SegmentCache:
    """LRU of decrypted segments, keyed by the block they belong to (object id, inode, block)
    and the segment index, bounded in bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        # key: ((object id, inode, block), segment index)
        self._items: OrderedDict[tuple[tuple[bytes, int, int], int], bytes] = OrderedDict()

    def get(self, key: tuple[tuple[bytes, int, int], int]) -> bytes | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: tuple[tuple[bytes, int, int], int], value: bytes) -> None:
        if key in self._items:
            return
        self._items[key] = value
        self.used += len(value)
        self.shrink_to(self.limit)

    def shrink_to(self, size: int) -> None:
        """Evict the least recently used segments until at most `size` bytes are held."""
        while self.used > size and self._items:
            _, old = self._items.popitem(last=False)
            self.used -= len(old)


@dataclass(frozen=True)
class _OpenObject:
    keys: fmt.ObjectKeys
    header: fmt.ObjectHeader


class DataStore:
    def __init__(
        self,
        meta: Meta,
        backend: Backend,
        keys: KeyManager,
        store_id: bytes,
        block_size: int,
        segment_size: int,
        dirty_limit: int = defaults.DIRTY_LIMIT,
        cache_limit: int = defaults.CACHE_LIMIT,
        flush_delay: float = 2.0,
        crypto_threads: int = 2,
    ) -> None:
        self.meta = meta
        self.backend = backend
        self.keys = keys
        self.store_id = store_id
        self.block_size = block_size
        self.segment_size = segment_size
        self.dirty_limit = dirty_limit
        self.flush_delay = flush_delay
        self.files: dict[int, FileState] = {}
        self.cache = SegmentCache(cache_limit)
        self._objects: OrderedDict[bytes, _OpenObject] = OrderedDict()
        self.dirty_bytes = 0
        self._flush_lock = trio.Lock()
        self._crypto = WorkerPool(crypto_threads, "s3fuse-crypto")
        # blocks stored at once: a few for a local disk; more hide a network store's latency
        self._store_limiter = trio.CapacityLimiter(backend.store_concurrency)
        self._kick = trio.Event()
        self._sealed_waiting = False  # full blocks of a streaming writer may be waiting: hurry
        self._space = trio.Event()
        self._gc_kick = trio.Event()
        self._loading: dict[tuple[int, int], trio.Event] = {}
        self._fetching: dict[bytes, trio.Event] = {}  # objects being fetched for reads
        self._prefetch_nursery: trio.Nursery | None = None  # set while `prefetcher` runs
        self._prefetches = 0  # open-time fetches under way
        # stored but not yet committed blocks of streaming writers: ino -> blockno -> ref
        self.pending: dict[int, dict[int, BlockRef | None]] = {}
        self.pending_size: dict[int, int] = {}
        self._pending_since = 0.0
        self.stats = {"writes": 0, "bytes_written": 0, "reads": 0, "bytes_read": 0,
                      "objects_put": 0, "bytes_put": 0, "flushes": 0, "integrity_errors": 0,
                      "flush_errors": 0, "read_fetches": 0, "prefetches": 0, "prefetches_ahead": 0,
                      "blocks_read_ahead": 0}
        self._last_failure = ""
        # objects a batch puts, by inode, even one whose put is cancelled: garbage if it fails
        self._attempted: dict[int, list[bytes]] = {}
        self.space_wait = SPACE_WAIT
        self._starved = False  # a writer waited `space_wait` in vain; no store freed space since
        self.damaged: set[int] = set()  # files marked LOST_AT_STOP: reads fail
        # set while mounted: hands the rest of a fetched segment to the kernel's page cache
        self.pusher: PageCachePusher | None = None
        # set while mounted: told of inodes whose attributes changed without a kernel request
        # (st_blocks after a commit), so that the kernel drops what it caches of them
        self.attrs_changed: Callable[[list[int]], None] | None = None

    # ------------------------------------------------------------------ files
    def state(self, ino: int) -> FileState:
        fs = self.files.get(ino)
        if fs is None:
            row = self.meta.inode(ino)
            if row is None:
                raise S3fuseError(f"inode {ino} does not exist", errno.ENOENT)
            fs = FileState(ino, row.size, row.size, row.mtime_ns, row.ctime_ns,
                           policy=Policy.decode(row.sse) or DEFAULT, stored_reported=row.stored_bytes)
            self.files[ino] = fs
        return fs

    def overlay(self, ino: int) -> FileState | None:
        """Unflushed size and times of a file, if it has any, for getattr."""
        return self.files.get(ino)

    def opened(self, ino: int, writer: Caller | None = None, grant: WriteGrant | None = None) -> None:
        fs = self.state(ino)
        fs.open_count += 1
        if writer is not None:
            fs.writer = writer
            if grant is not None or fs.policy.mode == SSE_S3:
                if fs.grant is not None and fs.grant is not grant:
                    fs.grant.wipe()
                fs.grant = grant

    async def block_pushes(self, ino: int) -> None:
        """Stop handing this file's data to the kernel's page cache until `unblock_pushes`
        (a handle opened for writing calls the latter at release): pushes already queued
        are dropped, and one under way is waited for. See pagecache.py."""
        fs = self.state(ino)
        fs.writers += 1
        if self.pusher is not None:
            while self.pusher.invalidate(fs, ino):
                await trio.to_thread.run_sync(self.pusher.wait_for, ino)

    def unblock_pushes(self, ino: int) -> None:
        fs = self.files.get(ino)
        if fs is not None:
            fs.writers -= 1
            self._maybe_drop(fs)

    def released(self, ino: int, writer: bool = False) -> None:
        fs = self.files.get(ino)
        if fs is None:
            return
        fs.open_count -= 1
        if writer:
            fs.writers -= 1
        if fs.dirty and (fs.open_count <= 0 or (writer and fs.writers <= 0)):
            # the last close, or the last writer's: store the data soon
            fs.flush_requested = True
            self._kick.set()
        self._maybe_drop(fs)

    def _maybe_drop(self, fs: FileState) -> None:
        if (fs.open_count <= 0 and fs.writers <= 0 and not fs.dirty and not fs.error
                and fs.ino not in self.pending and self.files.get(fs.ino) is fs):
            del self.files[fs.ino]
            if fs.grant is not None:
                fs.grant.wipe()
            if self.pusher is not None:
                self.pusher.invalidate(fs, fs.ino)  # the inode number may be reused after this

    def take_error(self, ino: int) -> int:
        fs = self.files.get(ino)
        if fs is None or not fs.error:
            return 0
        err, fs.error = fs.error, 0
        self._maybe_drop(fs)
        return err

    def discard(self, ino: int) -> None:
        """The inode is gone: forget its unflushed data."""
        pending = self.pending.pop(ino, None)
        self.pending_size.pop(ino, None)
        if pending:
            with self.meta.transaction():
                for ref in pending.values():
                    if ref is not None:
                        self.meta.add_garbage(ref.object_id)
        fs = self.files.pop(ino, None)
        if fs is not None:
            if fs.grant is not None:
                fs.grant.wipe()
            if self.pusher is not None:
                self.pusher.invalidate(fs, ino)
            for blk in fs.blocks.values():
                self.dirty_bytes -= len(blk.data)
            fs.blocks.clear()
            self._space.set()

    def set_times(self, ino: int, mtime_ns: int | None, ctime_ns: int | None) -> None:
        fs = self.files.get(ino)
        if fs is not None:
            if mtime_ns is not None:
                fs.mtime_ns = mtime_ns
            if ctime_ns is not None:
                fs.ctime_ns = ctime_ns

    # ------------------------------------------------------------------ reads
    def prefetch_on_open(self, ino: int, who: Caller, first: BlockRef | None) -> None:
        """A file was opened for reading by `who` (its key checks passed): if it is small and
        stored, fetch and authenticate it now, into the segment cache, so that its first read
        finds it there or waits for this fetch instead of starting its own. `first` is block
        0's committed row, if the caller has it."""
        fs = self.files.get(ino)
        if fs is None or fs.blocks or not 0 < fs.size <= PREFETCH_ON_OPEN:
            return
        pending = self.pending.get(ino)
        if pending is not None and 0 in pending:
            first = pending[0]
        elif first is None:
            first = self.meta.block(ino, 0)
        if not self._push_on_open(fs, first):
            self.prefetch(ino, fs.size, first, who)

    def _push_on_open(self, fs: FileState, ref: BlockRef | None) -> bool:
        """If a small file's whole plaintext is in the segment cache (fetched ahead), hand it
        to the kernel's page cache before its OPEN is answered: the reader's first READ is then
        answered by the kernel, a round trip saved per file. -> whether it was handed over.

        This runs on the event loop, which must never wait on a page lock (pagecache.py). It
        cannot here: the kernel locks a page of the file while a READ of it is under way, and
        a READ needs an open handle, which keeps the file open in this daemon until RELEASE,
        which the kernel sends only after the handle's last READ. So when this OPEN, not yet
        answered, is the file's only one, no page of it is locked waiting for us. The data are
        committed, unchanged (nothing written, no writer) and authenticated."""
        if (self.pusher is None or ref is None or fs.open_count != 1 or fs.writers or fs.dirty
                or fs.ino in self.pending or ref.length < fs.size):
            return False
        ident = (ref.object_id, ref.inode, ref.blockno)
        segs = []
        for i in range(-(-fs.size // self.segment_size)):
            seg = self.cache.get((ident, i))
            if seg is None:
                return False
            segs.append(seg)
        data = segs[0] if len(segs) == 1 else b"".join(segs)
        self.pusher.store_now(fs.ino, memoryview(data)[: fs.size])
        return True

    def _decrypt_ahead(self, fs: FileState | None, blockno: int, who: Caller) -> None:
        """A sequential reader entering a block has the next one fetched and authenticated into
        the segment cache meanwhile, so that its first read there finds it (or waits for a fetch
        already under way) instead of only then starting the fetch and the whole block's
        decryption."""
        if fs is None or blockno in fs.blocks or blockno * self.block_size >= fs.size or not self.can_prefetch():
            return
        ref = self.block_ref(fs.ino, blockno)
        if ref is not None and self._start_fetch(ref, ref.length, who):
            self.stats["blocks_read_ahead"] += 1

    def run_in_background(self, fn, *args) -> bool:
        """Start `fn(*args)` in a task of the mount's background nursery (the prefetcher's);
        -> False when not mounted (the caller runs it itself)."""
        if self._prefetch_nursery is None:
            return False
        self._prefetch_nursery.start_soon(fn, *args)
        return True

    def can_prefetch(self) -> bool:
        return self._prefetch_nursery is not None and self._prefetches < PREFETCH_TASKS

    def prefetch(self, ino: int, size: int, ref: BlockRef | None, who: Caller) -> bool:
        """Fetch a small file's stored block `ref` into the segment cache in the background,
        unless it is too big, unflushed, cached, being fetched, or enough fetches are under
        way. -> whether a fetch was started."""
        if ref is None or not 0 < size <= PREFETCH_ON_OPEN:
            return False
        fs = self.files.get(ino)
        if fs is not None and (fs.blocks or fs.size != size) or ino in self.pending:
            return False  # newer data than `ref` exists
        if not self._start_fetch(ref, min(size, ref.length), who):
            return False
        self.stats["prefetches"] += 1
        return True

    def _start_fetch(self, ref: BlockRef, length: int, who: Caller) -> bool:
        """Fetch `ref` into the segment cache in a background task, unless it is cached, being
        fetched, or enough fetches are under way. -> whether a fetch was started."""
        if (not self.can_prefetch() or ref.object_id in self._fetching
                or self.cache.get(((ref.object_id, ref.inode, ref.blockno), 0)) is not None):
            return False
        self._prefetches += 1
        self._prefetch_nursery.start_soon(self._prefetch, ref, length, who)
        return True

    async def _prefetch(self, ref: BlockRef, length: int, who: Caller) -> None:
        _SPECULATIVE.set(True)  # this task's own context
        try:
            await self._read_stored(ref, 0, length, False, who)
        except (S3fuseError, OSError):
            pass  # the read fetches again, and reports
        finally:
            self._prefetches -= 1

    async def prefetcher(self) -> None:
        """Runs the fetches of `prefetch` (at open, and ahead of a reader) while mounted."""
        try:
            async with trio.open_nursery() as nursery:
                self._prefetch_nursery = nursery
                await trio.sleep_forever()
        finally:
            self._prefetch_nursery = None

    async def read(self, ino: int, off: int, size: int, who: Caller = SYSTEM) -> bytes:
        if ino in self.damaged:
            raise S3fuseError(f"inode {ino} lost unstored data at a stop (xattr user.s3fuse.damage)", errno.EIO)
        self.stats["reads"] += 1
        self.stats["bytes_read"] += size
        fs = self.files.get(ino)
        if fs is not None:
            file_size = fs.size
        else:
            row = self.meta.inode(ino)
            if row is None:
                raise S3fuseError(f"inode {ino} does not exist", errno.ENOENT)
            file_size = row.size
        if off >= file_size or size <= 0:
            return b""
        end = min(off + size, file_size)
        sequential = fs is not None and fs.last_read_end == off
        if fs is not None:
            # noted on arrival, not on completion: the kernel's read-ahead sends several
            # requests at once, in order, and each must see its predecessor as sequential
            fs.last_read_end = end
        # a random reader's misses leave the rest of their segments in the kernel's page cache
        # (a sequential reader has the kernel's read-ahead)
        push = (fs, fs.push_gen, off, end) if self.pusher is not None and fs is not None and not sequential \
            else None
        parts = []
        pos = off
        bs = self.block_size
        while pos < end:
            blockno, boff = divmod(pos, bs)
            n = min(end - pos, bs - boff)
            blk = fs.blocks.get(blockno) if fs is not None else None
            if sequential and boff < PREFETCH_TRIGGER:
                # a sequential reader entering a block: have the next blocks' objects on their way
                for ahead in range(blockno + 1, blockno + 1 + PREFETCH_BLOCKS):
                    ref = self.block_ref(ino, ahead)
                    if ref is not None:
                        self.backend.prefetch(ref.object_id.hex())
                self._decrypt_ahead(fs, blockno + 1, who)
            if blk is not None:
                chunk = bytes(blk.data[boff : boff + n])
            else:
                ref = self.block_ref(ino, blockno)
                if ref is None:
                    chunk = b""
                else:
                    chunk = await self._read_stored(ref, boff, n, sequential, who, push)
            if len(chunk) < n:
                chunk += bytes(n - len(chunk))
            parts.append(chunk)
            pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read_stored(self, ref: BlockRef, boff: int, n: int, sequential: bool, who: Caller,
                           push: tuple[FileState, int, int, int] | None = None) -> bytes:
        """Bytes [boff, boff+n) of a stored block, clipped to its valid length."""
        stop = min(boff + n, ref.length)
        if boff >= stop:
            return b""
        seg = self.segment_size
        first, last = boff // seg, (stop - 1) // seg
        # cached segments are bound to the block they were authenticated for, not just to the
        # object: a block-map row pointed at another file's object must not find its plaintext
        ident = (ref.object_id, ref.inode, ref.blockno)
        segs = [self.cache.get((ident, i)) for i in range(first, last + 1)]
        while any(s is None for s in segs) and ref.object_id in self._fetching:
            # another request is fetching this object (read-ahead): wait, then look again
            await self._fetching[ref.object_id].wait()
            segs = [self.cache.get((ident, i)) for i in range(first, last + 1)]
        if any(s is None for s in segs):
            missing = [first + k for k, s in enumerate(segs) if s is None]
            lo, hi = missing[0], missing[-1]
            if sequential:
                count = fmt.segment_count(ref.obj_length, seg)
                hi = min(count - 1, max(hi, lo + READAHEAD // seg - 1))
            elif push is not None:
                count = fmt.segment_count(ref.obj_length, seg)
                if self.backend.fetches_whole_objects:
                    # the whole object is fetched anyway: authenticate all of it, for the page cache
                    lo, hi = 0, count - 1
                else:
                    # read around the miss, as the kernel does for a page fault: a random reader
                    # soon finds most of a file it keeps reading in the page cache
                    around = READ_AROUND // seg
                    lo, hi = min(lo, lo // around * around), min(count - 1, max(hi, (lo // around + 1) * around - 1))
            needed = missing[0], missing[-1]
            if not _SPECULATIVE.get():
                self.stats["read_fetches"] += 1  # a reader that waits for the store itself
            done = self._fetching[ref.object_id] = trio.Event()
            try:
                try:
                    fetched = await self._fetch_segments(ref, lo, hi, who)
                except IntegrityError:
                    if (lo, hi) == needed:
                        raise
                    # a segment fetched only for read-ahead failed (and was logged): the ones
                    # this read needs may still be intact, so a damaged neighbour costs no more
                    # than its own range
                    (lo, hi), push = needed, None
                    fetched = await self._fetch_segments(ref, lo, hi, who)
            finally:
                del self._fetching[ref.object_id]
                done.set()
            for k, s in enumerate(fetched):
                if first <= lo + k <= last or push is None:
                    self.cache.put((ident, lo + k), s)
            segs = [s if s is not None else fetched[first + k - lo] for k, s in enumerate(segs)]
            if push is not None:
                self._push_fetched(push, ref, lo, fetched)
        data = segs[0] if len(segs) == 1 else b"".join(segs)
        start = boff - first * seg
        return data[start : start + (stop - boff)]

    def _push_fetched(self, push: tuple[FileState, int, int, int], ref: BlockRef, lo: int,
                      fetched: list[bytes]) -> None:
        """Queue the fetched plaintext, less the pages the current request will fill, for the
        kernel's page cache, if the file allows it (pagecache.py says when)."""
        fs, gen, req_start, req_end = push
        if (self.pusher is None or fs.push_gen != gen or fs.writers > 0 or fs.dirty or fs.open_count <= 0
                or fs.ino in self.pending or self.files.get(fs.ino) is not fs):
            return
        data = memoryview(fetched[0] if len(fetched) == 1 else b"".join(fetched))
        block_start = ref.blockno * self.block_size
        start = block_start + lo * self.segment_size
        end = min(start + len(data), block_start + ref.length, fs.size)
        # the request's own pages stay locked until it is answered: storing them would only wait
        cut_lo, cut_hi = req_start // PAGE * PAGE, -(-req_end // PAGE) * PAGE
        for a, b in ((start, min(end, cut_lo)), (max(start, cut_hi), end)):
            if b != fs.size:
                b = b // PAGE * PAGE  # whole pages: the kernel keeps a partial one only at EOF
            if b > a:
                self.pusher.push(fs, gen, a, data[a - start : b - start])

    async def _fetch_segments(self, ref: BlockRef, first: int, last: int, who: Caller,
                              grant: WriteGrant | None = None) -> list[bytes]:
        try:
            return await self._fetch_segments_of(ref, first, last, who, grant)
        except BackendError as exc:  # the store failed (integrity errors are logged as such)
            if not _SPECULATIVE.get():
                log.error("reading object %s (inode %d, block %d) failed: %s", ref.object_id.hex(), ref.inode,
                      ref.blockno, exc)
            raise

    async def _fetch_segments_of(self, ref: BlockRef, first: int, last: int, who: Caller,
                                 grant: WriteGrant | None = None) -> list[bytes]:
        key = ref.object_id.hex()
        opened = self._objects.get(ref.object_id)
        if opened is not None and not self._matches(opened.header, ref):
            opened = None  # opened for another row: this row must unwrap and authenticate for itself
        start, length = fmt.segment_range(ref.hdr_len, self.segment_size, ref.obj_length, first, last)
        expected = last - first + 1
        if opened is not None:
            if length <= THREAD_THRESHOLD:
                # bytes already in memory: small enough to fetch and decrypt right here
                bufs = self.backend.try_get_ranges(key, [(start, length)])
                if bufs is not None:
                    try:
                        return fmt.decrypt_segments(opened.keys, opened.header, first, bufs[0], expected)
                    except fmt.FormatError as exc:
                        raise self._integrity(ref, str(exc)) from None

            # keys known: fetch and authenticate in one worker-thread hop
            def decrypt(bufs: list[bytes]) -> list[bytes]:
                return fmt.decrypt_segments(opened.keys, opened.header, first, bufs[0], expected)

            try:
                return await self.backend.get_ranges_and(key, [(start, length)], decrypt)
            except NoSuchObject:
                raise self._integrity(ref, "object is missing from the store") from None
            except fmt.FormatError as exc:
                raise self._integrity(ref, str(exc)) from None
        ranges = [(0, ref.hdr_len), (start, length)]
        try:
            bufs = await self.backend.get_ranges(key, ranges)
        except NoSuchObject:
            raise self._integrity(ref, "object is missing from the store") from None
        if opened is None:
            opened = await self._open_object(ref, bufs[0], who, grant)
        try:
            if length > THREAD_THRESHOLD:
                return await self._crypto.run(
                    fmt.decrypt_segments, opened.keys, opened.header, first, bufs[-1], last - first + 1)
            return fmt.decrypt_segments(opened.keys, opened.header, first, bufs[-1], last - first + 1)
        except fmt.FormatError as exc:
            raise self._integrity(ref, str(exc)) from None

    async def _open_object(self, ref: BlockRef, header_bytes: bytes, who: Caller,
                           grant: WriteGrant | None = None) -> _OpenObject:
        """Unwrap the data key, authenticate the header and check it against the block map."""
        wrapped = WrappedKey(ref.mode, ref.key_ref, ref.key_version, ref.key_slot)
        try:
            try:
                data_key = await self.keys.open_data_key_async(ref.object_id, ref.inode, ref.blockno,
                                                               wrapped, who, grant=grant)
            except KeyUnavailable:
                # `ref` was read before an await: the re-wrap sweep may have moved the row to a
                # newer master key since, and the old version been retired. The row as it is now:
                row = self.meta.db.execute("SELECT key_version, key_slot FROM blocks WHERE object_id=?",
                                           (ref.object_id,)).fetchone()
                if ref.mode != SSE_S3 or row is None or row[0] == ref.key_version:
                    raise
                wrapped = WrappedKey(ref.mode, ref.key_ref, row[0], row[1])
                data_key = await self.keys.open_data_key_async(ref.object_id, ref.inode, ref.blockno,
                                                               wrapped, who)
        except IntegrityError as exc:
            raise self._integrity(ref, str(exc)) from None
        keys = fmt.derive_object_keys(data_key, ref.object_id)
        try:
            header = fmt.parse_header(header_bytes, keys)
        except fmt.FormatError as exc:
            raise self._integrity(ref, str(exc)) from None
        if not self._matches(header, ref):
            raise self._integrity(ref, "header does not match the block map")
        opened = _OpenObject(keys, header)
        self._objects[ref.object_id] = opened
        if len(self._objects) > 4096:
            self._objects.popitem(last=False)
        return opened

    def _matches(self, header: fmt.ObjectHeader, ref: BlockRef) -> bool:
        """Does an authenticated header describe exactly this block-map row's object?"""
        return ((header.object_id, header.store_id, header.inode, header.block, header.mode, header.key_ref,
                 header.segment_size, header.length)
                == (ref.object_id, self.store_id, ref.inode, ref.blockno, ref.mode, ref.key_ref,
                    self.segment_size, ref.obj_length))

    def _integrity(self, ref: BlockRef, why: str) -> IntegrityError:
        msg = f"object {ref.object_id.hex()} (inode {ref.inode}, block {ref.blockno}): {why}"
        if not _SPECULATIVE.get():
            self.stats["integrity_errors"] += 1
            log.error("integrity error: %s", msg)
        return IntegrityError(msg)

    async def _load_block(self, ref: BlockRef, who: Caller, grant: WriteGrant | None) -> bytearray:
        """The whole valid plaintext of a stored block, for a read-modify-write."""
        count = fmt.segment_count(ref.obj_length, self.segment_size)
        segs = await self._fetch_segments(ref, 0, count - 1, who, grant)
        data = bytearray(b"".join(segs))
        del data[ref.length :]
        return data

    # ------------------------------------------------------------------ writes
    async def _block_for_write(self, fs: FileState, blockno: int, boff: int, n: int) -> Block:
        while True:
            blk = fs.blocks.get(blockno)
            if blk is not None:
                return blk
            loading = self._loading.get((fs.ino, blockno))
            if loading is None:
                break
            await loading.wait()
        ref = self.block_ref(fs.ino, blockno) if blockno * self.block_size < fs.size else None
        if ref is None or (boff == 0 and n >= ref.length):
            blk = Block(bytearray())
        else:
            event = self._loading[(fs.ino, blockno)] = trio.Event()
            try:
                data = await self._load_block(ref, fs.writer, fs.grant)
            finally:
                del self._loading[(fs.ino, blockno)]
                event.set()
            if blockno in fs.blocks:  # a concurrent writer won the race
                return fs.blocks[blockno]
            # a truncate may have shortened the file while we loaded
            del data[max(0, fs.size - blockno * self.block_size) :]
            blk = Block(data)
            self.dirty_bytes += len(data)
        fs.blocks[blockno] = blk
        if not fs.dirty_since:
            fs.dirty_since = time.monotonic()
        return blk

    async def write(self, ino: int, off: int, buf: bytes) -> int:
        self.stats["writes"] += 1
        self.stats["bytes_written"] += len(buf)
        fs = self.state(ino)
        # An earlier failed write-back is not a reason to refuse this data: with the kernel's
        # writeback cache these writes are the kernel's own write-back, and a refusal makes it
        # drop the pages. The data is kept (within the dirty limit) and the error is
        # reported at the next fsync, or by a write that must wait for buffer space (close
        # does not see it: FLUSH answers ENOSYS).
        # Room first: the buffer holds at most `dirty_limit` (plus the requests let in at
        # once), which is what a stop may have to keep in the recovery area's reserve.
        deadline = trio.current_time() if self._starved else None
        while (self.dirty_bytes + len(buf) > self.dirty_limit and self.dirty_bytes
               and self.dirty_bytes + self._growth(fs, off, len(buf)) > self.dirty_limit):
            # A writer the store cannot keep up with: plaintext kept for readers gives way
            # (a quarter stays), so that the daemon's memory is what the write-back buffer
            # holds rather than both at their limits (scripts/bench's 4 GiB write came after
            # phases that had filled the segment cache).
            self.cache.shrink_to(self.cache.limit // 4)
            self._kick.set()
            if self._space.is_set():
                self._space = trio.Event()
            if deadline is None:
                deadline = trio.current_time() + self.space_wait
            with trio.move_on_at(deadline):
                await self._space.wait()
            if fs.error:  # its data could not be stored: say so now rather than wait forever
                raise S3fuseError("write-back of this file failed", self.take_error(ino))
            if trio.current_time() >= deadline and \
                    self.dirty_bytes + self._growth(fs, off, len(buf)) > self.dirty_limit:
                # the buffer is held by data the store refuses: this write is not accepted,
                # and later writers hear so without waiting, until a store frees space
                self._starved = True
                raise S3fuseError("the write-back buffer is full of data that cannot be stored yet",
                                  errno.ENOSPC)
        view = memoryview(buf)
        pos = off
        bs = self.block_size
        while view:
            blockno, boff = divmod(pos, bs)
            n = min(len(view), bs - boff)
            blk = await self._block_for_write(fs, blockno, boff, n)
            if blk.inflight:
                blk.superseded = True
                blk = fs.blocks[blockno] = Block(bytearray(blk.data), blk.version, blk.sealed)
                self.dirty_bytes += len(blk.data)
            data = blk.data
            before = len(data)
            if boff > before:
                data.extend(bytes(boff - before))
            data[boff : boff + n] = view[:n]
            blk.version += 1
            self.dirty_bytes += len(data) - before
            if boff + n == bs and len(data) == bs:
                blk.sealed = True
                self._sealed_waiting = True
                self._kick.set()
            pos += n
            view = view[n:]
        if pos > fs.size:
            fs.size = pos
        now = now_ns()
        fs.mtime_ns = fs.ctime_ns = now
        if not fs.dirty_since:
            fs.dirty_since = time.monotonic()
        return len(buf)

    def _growth(self, fs: FileState, off: int, n: int) -> int:
        """How much a write would add to the buffers: nothing where it overwrites buffered
        bytes of a block not in flight."""
        grow = 0
        bs = self.block_size
        end = off + n
        while off < end:
            blockno, boff = divmod(off, bs)
            upto = min(end - off, bs - boff) + boff
            blk = fs.blocks.get(blockno)
            grow += upto - boff if blk is None or blk.inflight else max(0, upto - len(blk.data))
            off += upto - boff
        return grow

    async def truncate(self, ino: int, size: int) -> None:
        """Set a file's size; flushes its pending data first, so the commit is one state."""
        await self.block_pushes(ino)
        try:
            await self._truncate(ino, size)
        finally:
            self.unblock_pushes(ino)

    async def _truncate(self, ino: int, size: int) -> None:
        fs = self.state(ino)
        async with self._flush_lock:
            await self._flush_locked([fs], durable=False)
            bs = self.block_size
            for blockno in [b for b in fs.blocks if b * bs >= size]:
                self.dirty_bytes -= len(fs.blocks.pop(blockno).data)
            partial = fs.blocks.get(size // bs)
            if partial is not None and len(partial.data) > size % bs:
                self.dirty_bytes -= len(partial.data) - size % bs
                del partial.data[size % bs :]
                partial.version += 1
            now = now_ns()
            with self.meta.transaction():
                if size < fs.db_size:
                    self.meta.truncate_blocks(ino, size, bs)
                self.meta.update_inode(ino, size=size, mtime_ns=now, ctime_ns=now)
            fs.size = fs.db_size = size
            fs.mtime_ns = fs.ctime_ns = now
            self._space.set()
        self._gc_kick.set()
        self._maybe_drop(fs)

    # ------------------------------------------------------------------ flushing
    async def flush(self, ino: int, durable: bool) -> None:
        """Store a file's pending data; with `durable`, also make it survive a crash."""
        fs = self.files.get(ino)
        if fs is not None and (fs.dirty or ino in self.pending):
            async with self._flush_lock:
                await self._flush_locked([fs], durable)
            self._maybe_drop(fs)
        elif durable:
            await trio.to_thread.run_sync(self.meta.sync)
        err = self.take_error(ino)
        if err:
            raise S3fuseError("write-back of this file failed", err)

    async def flush_files(self, inos: list[int]) -> dict[int, S3fuseError]:
        """Store several files' pending data as one batch (one sync barrier, one transaction;
        not made durable): the S3 API's concurrent PUTs share them. -> the error of each file
        that could not be stored; a failure shared by all is raised."""
        files = [fs for fs in (self.files.get(i) for i in inos) if fs is not None and (fs.dirty or fs.ino in self.pending)]
        failed: dict[int, S3fuseError] = {}
        if files:
            async with self._flush_lock:
                failed = await self._flush_batch(files, durable=False)
            for fs in files:
                self._maybe_drop(fs)
        return failed

    async def flush_all(self, durable: bool = True) -> None:
        """Store every file's data; files that fail do not hold back the others, and the
        first failure is raised once all were tried."""
        async with self._flush_lock:
            files = [fs for fs in self.files.values() if fs.dirty or fs.ino in self.pending]
            failed = await self._flush_batch(files, durable)
        for fs in list(self.files.values()):
            self._maybe_drop(fs)
        if failed:
            raise next(iter(failed.values()))

    async def restore(self, ino: int, body: dict, writer: Caller, grant: WriteGrant | None) -> None:
        """Store a file's data that a stop kept in the recovery area (recovery.py): its blocks
        as they were in memory then, its size and times; raises if the store fails (the data
        then stays in memory, dirty, as any failed store's)."""
        fs = self.state(ino)
        fs.open_count += 1  # held while stored
        try:
            for blockno, content in body["blocks"]:
                old = fs.blocks.get(blockno)
                if old is not None:
                    self.dirty_bytes -= len(old.data)
                fs.blocks[blockno] = Block(bytearray(content))
                self.dirty_bytes += len(content)
            fs.size = body["size"]
            fs.mtime_ns, fs.ctime_ns = body["mtime_ns"], body["ctime_ns"]
            fs.writer = writer
            if grant is not None:
                if fs.grant is not None:
                    fs.grant.wipe()
                fs.grant = grant
            fs.dirty_since = fs.dirty_since or time.monotonic()
            fs.flush_requested = True
            await self.flush(ino, durable=True)
        finally:
            fs.open_count -= 1
            self._maybe_drop(fs)

    def mark_damaged(self, ino: int, why: str) -> None:
        """A stop had to drop this file's unstored data: record it in the metadata, so that
        fsck reports it and opening it fails (EIO) instead of returning what is left."""
        with self.meta.transaction():
            self.meta.set_xattr(ino, XATTR_DAMAGE, LOST_AT_STOP + why.encode("utf-8", "replace"))
        self.damaged.add(ino)

    def clear_damage(self, ino: int) -> None:
        """The owner removed the damage record: reads are served again."""
        self.damaged.discard(ino)

    def load_damaged(self) -> None:
        self.damaged = set(self.meta.inodes_with_xattr(XATTR_DAMAGE, LOST_AT_STOP))

    async def _flush_locked(self, files: list[FileState], durable: bool, only_full: bool = False) -> None:
        """`_flush_batch`, raising the failure of a file that could not be stored (for callers
        that flush one file: fsync, truncate, re-encryption)."""
        failed = await self._flush_batch(files, durable, only_full)
        if failed:
            raise next(iter(failed.values()))

    async def _flush_batch(self, files: list[FileState], durable: bool,
                           only_full: bool = False) -> dict[int, S3fuseError]:
        """Store the dirty blocks of `files`, then commit (or, for sealed blocks of a streaming
        writer, defer the commit so that one sync and one transaction cover many blocks).

        Batching is an optimisation only: a failure that belongs to one file (its key, its
        object's put) leaves that file dirty and is returned for it (inode -> error), while
        the others are stored and committed. A shared failure (the sync barrier, the
        commit) fails them all and is raised."""
        jobs = []  # (fs, blockno, block); the job records the version it stored
        refs: dict[tuple[int, int], BlockRef | None] = {}
        stored_versions: dict[tuple[int, int], int] = {}
        small: dict[int, list[tuple[str, bytearray]]] = {}  # objects put together in one batch
        failed: dict[int, S3fuseError] = {}
        self._attempted = {}  # every object this batch puts, even one whose put is cancelled
        try:
            try:
                async with trio.open_nursery() as nursery:
                    for fs in files:
                        try:
                            for blockno, blk in list(fs.blocks.items()):
                                if only_full and not blk.sealed:
                                    continue
                                jobs.append((fs, blockno, blk))
                                if len(blk.data) <= THREAD_THRESHOLD and not self._remote_key(fs.policy):
                                    self._store_small(fs, blockno, blk, refs, stored_versions,
                                                      small.setdefault(fs.ino, []))
                                else:
                                    nursery.start_soon(self._store_block_of, fs, blockno, blk, refs,
                                                       stored_versions, failed)
                        except S3fuseError as exc:  # its key: this file's failure only
                            failed.setdefault(fs.ino, exc)
                    if small:
                        nursery.start_soon(self._put_small, small, failed)
            except BaseExceptionGroup as group:
                raise one_error(group, S3fuseError) from None  # one backend failure, not a group, for the callers
            stored = [fs for fs in files if fs.ino not in failed]
            mine = {k: ref for k, ref in refs.items() if k[0] not in failed}
            if only_full and not durable:
                self._defer(stored, mine)
            elif stored or not files:
                await self._commit(stored, mine, {fs.ino: fs.size for fs in stored}, durable)
        except S3fuseError as exc:
            self._flush_failed(files, refs, exc)
            raise
        for fs in files:
            exc = failed.get(fs.ino)
            if exc is not None:
                self._file_failed(fs, {k: r for k, r in refs.items() if k[0] == fs.ino}, exc)
        if stored:
            self._last_failure = ""
            self._starved = False
            self.stats["flushes"] += 1
        for fs in stored:
            if not only_full:
                fs.error = 0  # everything it held is stored now: an earlier failure lost nothing
            if fs.retry_delay:
                log.info("inode %d is stored now, after earlier failures", fs.ino)
            fs.retry_delay = fs.retry_at = 0.0
            fs.failure = ""
        for fs, blockno, blk in jobs:
            if fs.ino in failed:
                continue
            current = fs.blocks.get(blockno)
            if current is blk and blk.version == stored_versions.get((fs.ino, blockno)):
                del fs.blocks[blockno]
                self.dirty_bytes -= len(blk.data)
            elif blk.superseded:  # replaced by a copy while it was stored
                self.dirty_bytes -= len(blk.data)
        for fs in stored:
            if not fs.blocks:
                fs.dirty_since = 0.0
                if fs.size == fs.db_size:
                    fs.flush_requested = False
        self._space.set()
        return failed

    async def _store_block_of(self, fs: FileState, blockno: int, blk: Block, refs: dict,
                              stored_versions: dict, failed: dict[int, S3fuseError]) -> None:
        """`_store_block`, its failure recorded as this file's own."""
        try:
            await self._store_block(fs, blockno, blk, refs, stored_versions)
        except S3fuseError as exc:
            failed.setdefault(fs.ino, exc)

    async def _put_small(self, small: dict[int, list[tuple[str, bytearray]]],
                         failed: dict[int, S3fuseError]) -> None:
        """The small objects of a batch in one call; if that fails, each file's objects on
        their own, so that the failure is pinned on the files whose puts fail."""
        items = [item for ino, its in small.items() if ino not in failed for item in its]
        if not items:
            return
        try:
            await self._put_many(items)
            return
        except S3fuseError as exc:
            if len(small) == 1:
                failed.setdefault(next(iter(small)), exc)
                return
        for ino, its in small.items():
            if ino in failed:
                continue
            try:
                await self._put_many(its)
            except S3fuseError as exc:
                failed.setdefault(ino, exc)

    async def _put_many(self, items: list[tuple[str, bytearray]]) -> None:
        try:
            await self.backend.put_many(items)
        except BaseExceptionGroup as group:
            raise one_error(group, S3fuseError) from None

    def _flush_failed(self, files: list[FileState], refs: dict[tuple[int, int], BlockRef | None],
                      exc: S3fuseError) -> None:
        """A shared failure (sync, commit): the data stays in memory (dirty), each file
        remembers the error for its next write or fsync, and the objects this batch did put
        are garbage. The flusher retries the whole batch."""
        inos = ",".join(str(f.ino) for f in files)
        failure = f"{inos}/{exc.errno}"
        if failure != self._last_failure:  # a retry that fails the same way is not news
            log.error("flush of inode(s) %s failed, their data is kept in memory: %s (errno %s)",
                      inos, exc, errno.errorcode.get(exc.errno, exc.errno))
        self._last_failure = failure
        self.stats["flush_errors"] += 1
        for fs in files:
            fs.error = exc.errno
            fs.failure = str(exc)
        attempted = {oid for oids in self._attempted.values() for oid in oids}
        self._garbage({ref.object_id for ref in refs.values() if ref is not None} | attempted)

    def _file_failed(self, fs: FileState, refs: dict[tuple[int, int], BlockRef | None],
                     exc: S3fuseError) -> None:
        """One file could not be stored for a reason of its own: its data stays in memory, the
        error goes to its next write or fsync, it is retried alone with backoff, and the
        objects it did put are garbage."""
        reason = f"{exc} (errno {errno.errorcode.get(exc.errno, exc.errno)})"
        if reason != fs.failure:  # a retry that fails the same way is not news
            log.error("storing inode %d (%s) failed, its data is kept in memory and retried: %s",
                      fs.ino, self.describe(fs.ino), reason)
        fs.failure = reason
        self.stats["flush_errors"] += 1
        fs.error = exc.errno
        fs.retry_delay = min(RETRY_MAX, fs.retry_delay * 2 or RETRY_FIRST)
        fs.retry_at = time.monotonic() + fs.retry_delay
        self._garbage({ref.object_id for ref in refs.values() if ref is not None}
                      | set(self._attempted.get(fs.ino, ())))

    def _garbage(self, oids: set[bytes]) -> None:
        if oids:
            with self.meta.transaction():
                for oid in oids:
                    self.meta.add_garbage(oid)
            self._gc_kick.set()  # at once: on ENOSPC, the space they take is what is missing
        self._space.set()  # writers waiting for buffer space learn of the failure

    def describe(self, ino: int) -> str:
        """A file's path for messages (or why there is none)."""
        try:
            return self.meta.path_of(ino)
        except Exception:  # noqa: BLE001 - a message must not fail
            return "unlinked"

    def waiting_for_key(self, mode: str, ref: str) -> list[str]:
        """Paths of files with data not yet stored under a customer key (by fingerprint) or a
        KMS key (by id): what `key remove` and `kms disable` name."""
        out = []
        for fs in self.files.values():
            if not (fs.dirty or fs.ino in self.pending) or fs.policy.mode != mode:
                continue
            if (fs.grant.fingerprint if fs.grant is not None and mode != SSE_KMS else fs.policy.key) == ref:
                out.append(self.describe(fs.ino))
        return sorted(out)

    def exclusive(self) -> trio.Lock:
        """Held (`async with`), no flush runs: no object is being sealed or committed, so
        every stored object is a committed row or a pending block."""
        return self._flush_lock

    def forget_cached_keys(self) -> None:
        """After a key is withdrawn, no cached data key or plaintext may outlive it."""
        self._objects.clear()
        self.cache = type(self.cache)(self.cache.limit)

    def renew_prepared(self, key_id: str) -> None:
        """A KMS key was rotated: the data keys that opens made under it are made again under
        its new version (the old one stays if that fails), so that data is stored under the
        version current when it is stored, as without them. Not for a network KMS, whose
        call would hold up the loop."""
        if self.keys.kms_blocks(key=key_id):
            return
        for fs in self.files.values():
            grant = fs.grant
            if grant is None or not grant.prepared or fs.policy.mode != SSE_KMS or fs.policy.key != key_id:
                continue
            for block in list(grant.prepared):
                object_id = os.urandom(fmt.OBJECT_ID_LEN)
                try:
                    data_key, wrapped = self.keys.new_data_key(fs.policy, object_id, fs.ino, block, fs.writer,
                                                               self.describe(fs.ino))
                except S3fuseError:
                    continue
                grant.prepared[block] = (object_id, data_key, wrapped)

    def failing(self) -> list[dict]:
        """Files whose data could not be stored yet: inode, path, bytes held, why."""
        return [{"inode": fs.ino, "path": self.describe(fs.ino), "reason": fs.failure,
                 "bytes": sum(len(b.data) for b in fs.blocks.values())}
                for fs in self.files.values() if fs.dirty and fs.failure]

    def _defer(self, files: list[FileState], refs: dict[tuple[int, int], BlockRef | None]) -> None:
        """Stored but not yet committed: reads find these refs in `pending` meanwhile."""
        bs = self.block_size
        replaced = []
        for (ino, blockno), ref in refs.items():
            old = self.pending.setdefault(ino, {}).get(blockno)
            if old is not None:
                replaced.append(old.object_id)
            self.pending[ino][blockno] = ref
        for fs in files:
            ends = [(b + 1) * bs for (i, b) in refs if i == fs.ino]
            if ends:
                before = self.pending_size.get(fs.ino, fs.db_size)
                self.pending_size[fs.ino] = max(before, min(fs.size, max(ends)))
        if replaced:
            with self.meta.transaction():
                for oid in replaced:
                    self.meta.add_garbage(oid)
        if not self._pending_since:
            self._pending_since = time.monotonic()

    async def _commit(self, files: list[FileState], refs: dict[tuple[int, int], BlockRef | None],
                      sizes: dict[int, int], durable: bool) -> None:
        """One sync, then one transaction for `refs` and everything deferred before them."""
        bs = self.block_size
        deferred = {ino: dict(p) for ino, p in self.pending.items()}  # what this commit covers
        by_ino: dict[int, dict[int, BlockRef | None]] = {ino: dict(p) for ino, p in deferred.items()}
        replaced = []
        for (ino, blockno), ref in refs.items():
            old = by_ino.setdefault(ino, {}).get(blockno)
            if old is not None:
                replaced.append(old.object_id)
            by_ino[ino][blockno] = ref
        pending_size = dict(self.pending_size)
        changed: list[int] = []  # inodes whose st_blocks the kernel may hold a stale value of
        if by_ino:
            await self.backend.sync()
        # The deferred blocks this commit covers leave `pending`, whether committed or
        # superseded by a newer object in `refs` (then garbage, above: a superseded one left
        # pending would be committed later, pointing at a deleted object). The sync may have
        # let other tasks defer more blocks: those stay pending for next time.
        for ino, blocks in deferred.items():
            mine = self.pending.get(ino, {})
            for blockno, ref in blocks.items():
                if blockno in mine and mine[blockno] is ref:
                    del mine[blockno]
            if not mine:
                self.pending.pop(ino, None)
                self.pending_size.pop(ino, None)
        if not self.pending:
            self._pending_since = 0.0
        with self.meta.transaction():
            for oid in replaced:
                self.meta.add_garbage(oid)
            for ino in set(by_ino) | set(sizes):
                blocks = by_ino.get(ino, {})
                if self.meta.inode(ino) is None:  # deleted while we were storing
                    for ref in blocks.values():
                        if ref is not None:
                            self.meta.add_garbage(ref.object_id)
                    continue
                fs = self.files.get(ino)
                size = sizes[ino] if ino in sizes else pending_size.get(ino, fs.db_size if fs else 0)
                for blockno, ref in blocks.items():
                    if blockno * bs >= size:
                        if ref is not None:
                            self.meta.add_garbage(ref.object_id)
                    elif ref is None:
                        old = self.meta.block(ino, blockno)
                        if old is not None:
                            self.meta.add_garbage(old.object_id)
                            self.meta.db.execute("DELETE FROM blocks WHERE inode=? AND blockno=?", (ino, blockno))
                    else:
                        self.meta.put_block(ref)
                stored = self.meta.db.execute(
                    "SELECT coalesce(sum(length), 0) FROM blocks WHERE inode=?", (ino,)).fetchone()[0]
                fields = {"size": size, "stored_bytes": stored}
                if fs is None or fs.stored_reported != stored:
                    changed.append(ino)
                if fs is not None:
                    fs.stored_reported = stored
                    # times as they are now: setattr may have changed them while we stored
                    fields.update(mtime_ns=fs.mtime_ns, ctime_ns=fs.ctime_ns)
                    fs.db_size = size
                self.meta.update_inode(ino, **fields)
        self._gc_kick.set()
        if changed and self.attrs_changed is not None:
            self.attrs_changed(changed)
        if durable:
            await trio.to_thread.run_sync(self.meta.sync)

    def block_ref(self, ino: int, blockno: int) -> BlockRef | None:
        """The object holding a block: a stored-but-uncommitted one first, else the block map."""
        pending = self.pending.get(ino)
        if pending is not None and blockno in pending:
            return pending[blockno]
        return self.meta.block(ino, blockno)

    def _store_small(self, fs: FileState, blockno: int, blk: Block, refs: dict, stored_versions: dict,
                     batch: list[tuple[str, bytearray]]) -> None:
        """Encrypt a small block on the loop (cheaper than a thread hop) and queue its put."""
        stored_versions[(fs.ino, blockno)] = blk.version
        data = bytes(blk.data)
        if _all_zero(data):
            refs[(fs.ino, blockno)] = None  # all zeros: a hole costs no object
            return
        header, data_key, wrapped = self._new_object(fs.ino, blockno, len(data), fs.policy, fs.writer, fs.grant)
        blob, header_len = fmt.encrypt_object_buffer(header, data_key, data)
        self._attempted.setdefault(fs.ino, []).append(header.object_id)
        batch.append((header.object_id.hex(), blob))
        refs[(fs.ino, blockno)] = self._stored(header, wrapped, header_len, len(blob))

    def _remote_key(self, policy: Policy) -> bool:
        """Whether new objects under `policy` need a network KMS call (then: a task each)."""
        return policy.mode == SSE_KMS and self.keys.kms_blocks(key=policy.key)

    async def _store_block(self, fs: FileState, blockno: int, blk: Block, refs: dict,
                           stored_versions: dict) -> None:
        # The limiter bounds the buffers in flight (snapshot + ciphertext) to a few blocks.
        async with self._store_limiter:
            stored_versions[(fs.ino, blockno)] = blk.version
            if blk.sealed:
                # a finished block of a sequential writer is stored as it is; a later write
                # to it copies it first (see `write`), so no snapshot copy is needed
                blk.inflight = True
                data = blk.data
            else:
                data = bytes(blk.data)  # writes may go on while this snapshot is stored
            try:
                if _all_zero(data):
                    refs[(fs.ino, blockno)] = None  # all zeros: a hole costs no object
                    return
                refs[(fs.ino, blockno)] = await self._store_snapshot(
                    fs.ino, blockno, data, fs.policy, fs.writer, fs.grant)
            finally:
                blk.inflight = False

    async def _store_snapshot(self, ino: int, blockno: int, data: bytes, policy: Policy, who: Caller,
                              grant: WriteGrant | None = None) -> BlockRef:
        """Seal and put one block: encryption in a worker thread when it is large, then the put."""
        if self._remote_key(policy):
            header, data_key, wrapped = await self._new_object_async(ino, blockno, len(data), policy, who, grant)
        else:
            header, data_key, wrapped = self._new_object(ino, blockno, len(data), policy, who, grant)
        if len(data) > THREAD_THRESHOLD:
            blob, header_len = await self._crypto.run(fmt.encrypt_object_buffer, header, data_key, data)
        else:
            blob, header_len = fmt.encrypt_object_buffer(header, data_key, data)
        self._attempted.setdefault(ino, []).append(header.object_id)
        await self.backend.put(header.object_id.hex(), blob)
        return self._stored(header, wrapped, header_len, len(blob))

    def _new_object(self, ino: int, blockno: int, length: int, policy: Policy, who: Caller,
                    grant: WriteGrant | None = None) -> tuple[fmt.ObjectHeader, bytes, WrappedKey]:
        """A fresh object id, data key and header. Runs on the loop: KMS and audit live there."""
        prepared = _prepared(grant, policy, blockno)
        if prepared is not None:
            object_id, data_key, wrapped = prepared
        else:
            object_id = os.urandom(fmt.OBJECT_ID_LEN)
            path = self.meta.path_of(ino) if policy.mode == SSE_KMS else None  # for the audit record
            data_key, wrapped = self.keys.new_data_key(policy, object_id, ino, blockno, who, path, grant)
        header = fmt.ObjectHeader(object_id, self.store_id, ino, blockno, wrapped.mode,
                                  wrapped.key_ref, self.segment_size, length)
        return header, data_key, wrapped

    async def _new_object_async(self, ino: int, blockno: int, length: int, policy: Policy, who: Caller,
                                grant: WriteGrant | None = None) -> tuple[fmt.ObjectHeader, bytes, WrappedKey]:
        """`_new_object` for a network KMS: the data-key call runs in a worker thread."""
        if grant is not None and blockno == 0:
            await grant.wait_ready(GRANT_WAIT)
        prepared = _prepared(grant, policy, blockno)
        if prepared is not None:
            object_id, data_key, wrapped = prepared
        else:
            object_id = os.urandom(fmt.OBJECT_ID_LEN)
            path = self.meta.path_of(ino)
            data_key, wrapped = await self.keys.new_data_key_async(policy, object_id, ino, blockno, who, path,
                                                                   grant)
        header = fmt.ObjectHeader(object_id, self.store_id, ino, blockno, wrapped.mode,
                                  wrapped.key_ref, self.segment_size, length)
        return header, data_key, wrapped

    def _stored(self, header: fmt.ObjectHeader, wrapped: WrappedKey, header_len: int, size: int) -> BlockRef:
        """The block-map row of an object that was (or is about to be) put."""
        self.stats["objects_put"] += 1
        self.stats["bytes_put"] += size
        return BlockRef(header.inode, header.block, header.object_id, header.length, header.length,
                        header_len, wrapped.mode, wrapped.key_ref, wrapped.key_version, wrapped.key_slot)

    async def reencrypt(self, ino: int, policy: Policy, who: Caller) -> int:
        """Store every block of a file again under `policy`, switching all at once.

        New objects are put and synced first, then one transaction swaps the whole block
        map: readers see the old or the new objects, never a mix. Blocks are done one at a
        time, so memory stays at one block.
        """
        fs = self.state(ino)
        async with self._flush_lock:
            await self._flush_locked([fs], durable=False)
            new_refs = []
            try:
                for ref in self.meta.blocks_of(ino):
                    data = await self._load_block(ref, who, None)
                    new_refs.append(await self._store_snapshot(ino, ref.blockno, bytes(data), policy, who))
                await self.backend.sync()
            except BaseException:
                with self.meta.transaction():
                    for ref in new_refs:
                        self.meta.add_garbage(ref.object_id)
                raise
            now = now_ns()
            with self.meta.transaction():
                for ref in new_refs:
                    self.meta.put_block(ref)
                self.meta.update_inode(ino, sse=policy.encode(), ctime_ns=now)
            fs.policy, fs.writer = policy, who
            if fs.grant is not None:  # made for the old setting
                fs.grant.wipe()
                fs.grant = None
            fs.ctime_ns = now  # the same instant as the row, not a second reading
        self._gc_kick.set()
        self._maybe_drop(fs)
        return len(new_refs)

    # ------------------------------------------------------------------ background
    async def flusher(self) -> None:
        """Stores data that was closed, idle, or is pressing on the buffer limit."""
        backlog = False  # the last batch left files behind: store them now, without waiting
        while True:
            with trio.move_on_after(0.5):
                await self._kick.wait()
            pressure = self.dirty_bytes > self.dirty_limit // 2
            if not pressure and not backlog:
                await trio.sleep(BATCH_DELAY if self._sealed_waiting else CLOSE_BATCH_DELAY)
            self._kick = trio.Event()
            now = time.monotonic()
            # files failing for reasons of their own are retried alone, when their backoff is due
            retry = [fs for fs in self.files.values() if fs.retry_delay and fs.dirty and fs.retry_at <= now]
            healthy = [fs for fs in self.files.values() if not fs.retry_delay]
            batch = [fs for fs in healthy if fs.dirty and (
                fs.flush_requested or (fs.dirty_since and now - fs.dirty_since >= self.flush_delay))]
            only_full = False
            if not batch:
                full = [fs for fs in healthy if any(b.sealed for b in fs.blocks.values())]
                if full:
                    batch, only_full = full, True
                elif pressure:
                    batch = sorted((fs for fs in healthy if fs.blocks),
                                   key=lambda f: -sum(len(b.data) for b in f.blocks.values()))[:1]
            if not batch and not retry and self._pending_since and now - self._pending_since >= COMMIT_DELAY:
                try:
                    async with self._flush_lock:
                        await self._commit([], {}, {}, durable=False)
                except S3fuseError as exc:
                    log.error("commit of stored blocks failed (will retry): %s", exc)
                    await trio.sleep(1)
                except Exception:
                    log.exception("commit of stored blocks failed unexpectedly (will retry)")
                    await trio.sleep(1)
                for fs in list(self.files.values()):  # closed files that are clean now
                    self._maybe_drop(fs)
                continue
            backlog = len(batch) > FLUSH_BATCH
            batch = batch[:FLUSH_BATCH]
            for group, full in ([(batch, only_full)] if batch else []) + [([fs], False) for fs in retry]:
                if not await self._flush_in_background(group, full):
                    await trio.sleep(1)  # a shared failure: back off, then the batch again
            if self._sealed_waiting:
                self._sealed_waiting = any(b.sealed for fs in self.files.values() for b in fs.blocks.values())
            if any(fs.dirty and not fs.retry_delay for fs in self.files.values()):
                self._kick.set()

    async def _flush_in_background(self, batch: list[FileState], only_full: bool) -> bool:
        """One flush of the flusher; -> False after a shared failure (the caller backs off)."""
        ok = True
        try:
            async with self._flush_lock:
                await self._flush_batch(batch, durable=False, only_full=only_full)
        except S3fuseError:
            ok = False  # the error is reported to each file's next write or fsync
        except Exception:
            # a bug must not stop the flusher (and with it the daemon): log it, keep the data
            log.exception("flush failed unexpectedly; its data is kept in memory")
            for fs in batch:
                fs.error = fs.error or errno.EIO
            ok = False
        for fs in batch:
            self._maybe_drop(fs)
        return ok

    async def collector(self) -> None:
        """Deletes objects that the metadata no longer references."""
        while True:
            with trio.move_on_after(5):
                await self._gc_kick.wait()
            self._gc_kick = trio.Event()
            await self.collect_garbage()

    async def collect_garbage(self) -> int:
        done = 0
        while True:
            ids = self.meta.garbage(256)
            if not ids:
                return done
            try:
                try:
                    await self.backend.delete_many([oid.hex() for oid in ids])
                except BaseExceptionGroup as group:
                    raise one_error(group, S3fuseError) from None
            except BackendError as exc:
                log.warning("could not delete unreferenced objects (will retry): %s", exc)
                return done
            for oid in ids:
                self._objects.pop(oid, None)
            with self.meta.transaction():
                self.meta.forget_garbage(ids)
            done += len(ids)

    async def sweep_unreferenced(self) -> int:
        """After an unclean stop: delete objects that were put but never committed."""
        removed = 0
        async for key in self.backend.list():
            try:
                oid = bytes.fromhex(key)
            except ValueError:
                continue
            if len(oid) == fmt.OBJECT_ID_LEN and not self.meta.is_referenced(oid):
                await self.backend.delete(key)
                removed += 1
        return removed


def _all_zero(data: bytes | bytearray) -> bool:
    """True for a block of zeros (checked cheaply: most blocks fail at the last byte)."""
    return not data[-1:].strip(b"\0") and data == bytes(len(data))


def _prepared(grant: WriteGrant | None, policy: Policy, blockno: int):
    """The data key a file's open made for this block, if any (used for one object only:
    a second object under it would repeat its nonces)."""
    if grant is None or grant.policy != policy:
        return None
    return grant.take(blockno)
