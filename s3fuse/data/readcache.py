"""Reads of stored blocks: ranged fetches of only the segments a request needs, a bounded
LRU of decrypted segments (memory only: plaintext never touches the disk), prefetch of small
files and of a sequential reader's next blocks, and handing fetched plaintext to the
kernel's page cache (pagecache.py).
"""

from __future__ import annotations

import contextvars
import logging
from bisect import bisect_right
from collections import OrderedDict

import trio

from .. import format as fmt
from ..backends import Backend, NoSuchObject
from ..crypto import Caller, WriteGrant
from ..errors import BackendError, IntegrityError, S3fuseError
from ..meta import BlockRef, Meta
from ..pagecache import PageCachePusher
from .codec import THREAD_THRESHOLD, ObjectCodec, OpenObject
from .collector import InUse
from .writeback import FileState, WriteBack

log = logging.getLogger(__name__)
# set in a task that fetches ahead of any read: its failures are not logged, since the read
# that needs the data fetches it again and reports what it finds
_SPECULATIVE = contextvars.ContextVar("s3fuse_speculative", default=False)

PAGE = 4096  # the kernel's page size, the unit of its page cache
READAHEAD = 4 * 1024 * 1024  # a sequential reader fetches the rest of the block at once
READ_AROUND = 256 * 1024  # a random reader's miss fetches the aligned range around it
PREFETCH_BLOCKS = 8  # a sequential reader has the next 8 blocks' objects read ahead
PREFETCH_TRIGGER = 1 << 20  # ... when a read starts within the first MiB of a block
# a file up to this size opened for reading is fetched at once, while the kernel returns from
# open(2) and sends its first read: the fetch's latency overlaps that round trip
PREFETCH_ON_OPEN = 256 * 1024
PREFETCH_TASKS = 8  # such fetches (and core's read-ahead of names) under way at once
# Fetches of more than THREAD_THRESHOLD under way at once: each holds its ciphertext (up to a
# block) until a crypto thread has decrypted it, and more than two per crypto thread (one
# being read, one being decrypted) would only wait for one there, holding theirs meanwhile.
LARGE_FETCHES = 4
# how far behind the furthest request one may arrive (the kernel's read-ahead window,
# defaults.READAHEAD_KB, sends several at once and they can arrive out of order)
OUT_OF_ORDER = 8 << 20
# A read this large is the kernel filling its page cache (its smallest read-ahead window):
# the segments it reads whole are not kept (ReadCache.read_stored says why)
STREAM_READ = 128 * 1024


class PatchRuns:
    """A patch's runs, decoded (cached like a segment, counted by its plaintext size)."""

    __slots__ = ("starts", "datas", "size")

    def __init__(self, runs: list[tuple[int, memoryview]], size: int) -> None:
        self.starts = [off for off, _ in runs]
        self.datas = [data for _, data in runs]
        self.size = size

    def __len__(self) -> int:
        return self.size

    def apply(self, target: bytearray, base: int) -> None:
        """Write the runs into `target`, which holds the block's bytes from `base` on."""
        n = len(target)
        k = max(0, bisect_right(self.starts, base) - 1)
        while k < len(self.starts) and self.starts[k] < base + n:
            start, data = self.starts[k], self.datas[k]
            lo, hi = max(start, base), min(start + len(data), base + n)
            if lo < hi:
                target[lo - base : hi - base] = data[lo - start : hi - start]
            k += 1


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

    def discard(self, key: tuple[tuple[bytes, int, int], int]) -> None:
        value = self._items.pop(key, None)
        if value is not None:
            self.used -= len(value)

    def shrink_to(self, size: int) -> None:
        """Evict the least recently used segments until at most `size` bytes are held."""
        while self.used > size and self._items:
            _, old = self._items.popitem(last=False)
            self.used -= len(old)

    def discard_inode(self, ino: int) -> None:
        """Drop every segment of inode `ino`."""
        for key in [key for key in self._items if key[0][1] == ino]:
            self.discard(key)

    def discard_objects(self, object_ids: set[bytes]) -> None:
        """Drop every segment of these objects."""
        for key in [key for key in self._items if key[0][0] in object_ids]:
            self.discard(key)

    def clear(self) -> None:
        self._items.clear()
        self.used = 0


class ReadCache:
    def __init__(self, meta: Meta, backend: Backend, codec: ObjectCodec, wb: WriteBack,
                 block_size: int, segment_size: int, cache_limit: int, stats: dict[str, int],
                 in_use: InUse) -> None:
        self.meta = meta
        self.in_use = in_use  # what a read looked up stays in the store until it is fetched
        self.backend = backend
        self.codec = codec
        self.wb = wb
        self.block_size = block_size
        self.segment_size = segment_size
        self.cache = SegmentCache(cache_limit)
        self.stats = stats
        self._fetching: dict[bytes, trio.Event] = {}  # objects being fetched for reads
        self._large_fetches = trio.CapacityLimiter(LARGE_FETCHES)
        self._nursery: trio.Nursery | None = None  # set while `prefetcher` runs
        self._prefetches = 0  # background fetches under way
        # set while mounted: hands the rest of a fetched segment to the kernel's page cache
        self.pusher: PageCachePusher | None = None

    def block_ref(self, ino: int, blockno: int) -> BlockRef | None:
        """The object holding a block: a stored-but-uncommitted one first, else the block map."""
        found, ref = self.wb.pending_ref(ino, blockno)
        return ref if found else self.meta.block(ino, blockno)

    def patches_for(self, ref: BlockRef) -> list[BlockRef]:
        """The committed patches that apply over `ref`'s object: none unless `ref` is its
        block's committed row (a stored-but-uncommitted object already holds them)."""
        if not self.meta.has_patches(ref.inode):
            return []
        patches = self.meta.patches_of(ref.inode, ref.blockno)
        if not patches:
            return []
        row = self.meta.block(ref.inode, ref.blockno)
        return patches if row is not None and row.object_id == ref.object_id else []

    async def patch_runs(self, patch: BlockRef, base: BlockRef, who: Caller,
                         grant: WriteGrant | None = None) -> PatchRuns:
        """A patch's runs: fetched, authenticated (its header must name `base`'s object),
        decoded, and cached as a segment is."""
        key = ((patch.object_id, patch.inode, patch.blockno), 0)
        runs = self.cache.get(key)
        if runs is None:
            count = fmt.segment_count(patch.obj_length, self.segment_size)
            segs = await self.fetch_segments(patch, 0, count - 1, who, grant)
            opened = self.codec.opened(patch)
            if opened is None or opened.header.base != base.object_id:
                raise self._integrity(patch, "patch does not apply to its block's object")
            plain = segs[0] if len(segs) == 1 else b"".join(segs)
            try:
                runs = PatchRuns(fmt.decode_patch(plain, self.block_size), len(plain))
            except fmt.FormatError as exc:
                raise self._integrity(patch, str(exc)) from None
            self.cache.put(key, runs)
        return runs

    def forget_patches(self, patches: list[BlockRef]) -> None:
        """These patches were merged into their block: their decoded runs leave the cache."""
        for patch in patches:
            self.cache.discard(((patch.object_id, patch.inode, patch.blockno), 0))

    @staticmethod
    def _patched(overlays: list[PatchRuns], boff: int, chunk: bytes) -> bytes:
        """`chunk` (bytes from `boff` of a block, clipped to its length) with the block's
        patches applied in order."""
        if not overlays or not chunk:
            return chunk
        out = bytearray(chunk)
        for runs in overlays:
            runs.apply(out, boff)
        return bytes(out)

    # ------------------------------------------------------------------ prefetch
    def prefetch_on_open(self, fs: FileState, who: Caller, first: BlockRef | None) -> None:
        """`fs` was opened for reading by `who` (its key checks passed): if it is small and
        stored, fetch and authenticate it now, into the segment cache, so that its first read
        finds it there or waits for this fetch instead of starting its own. `first` is block
        0's committed row, if the caller has it."""
        if fs.blocks or not 0 < fs.size <= PREFETCH_ON_OPEN:
            return
        found, ref = self.wb.pending_ref(fs.ino, 0)
        if found:
            first = ref
        elif first is None:
            first = self.meta.block(fs.ino, 0)
        if not self._push_on_open(fs, first):
            self.prefetch(fs.ino, fs.size, first, who)

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
                or fs.ino in self.wb.pending or ref.length < fs.size or self.patches_for(ref)):
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
        if fs is None or blockno in fs.blocks or blockno * self.block_size >= fs.size:
            return
        fs.streamed = True
        if not self.can_prefetch():
            return
        ref = self.block_ref(fs.ino, blockno)
        fs.decrypting_ahead = blockno  # now fetching, cached already, or without an object
        if ref is not None and self._start_fetch(ref, ref.length, who, fs):
            self.stats["blocks_read_ahead"] += 1

    def _read_ahead(self, fs: FileState, blockno: int, who: Caller) -> None:
        """A sequential reader entered block `blockno` (each of the kernel's read-ahead requests
        that starts in a block's first MiB counts): ask the store for the objects of the next
        PREFETCH_BLOCKS blocks not asked for yet in this pass, and have the next block
        decrypted. A reader that went back starts a new pass."""
        end = blockno + 1 + PREFETCH_BLOCKS
        start = blockno + 1 if fs.read_ahead_to > end else max(blockno + 1, fs.read_ahead_to)
        for ahead in range(start, end):
            ref = self.block_ref(fs.ino, ahead)
            if ref is not None:
                self.backend.prefetch(ref.object_id.hex())
        fs.read_ahead_to = end
        if fs.decrypting_ahead != blockno + 1:
            self._decrypt_ahead(fs, blockno + 1, who)

    def run_in_background(self, fn, *args) -> bool:
        """Start `fn(*args)` in a task of the mount's background nursery (the prefetcher's);
        -> False when not mounted (the caller runs it itself)."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, *args)
        return True

    def can_prefetch(self) -> bool:
        return self._nursery is not None and self._prefetches < PREFETCH_TASKS

    def prefetch(self, ino: int, size: int, ref: BlockRef | None, who: Caller) -> bool:
        """Fetch a small file's stored block `ref` into the segment cache in the background,
        unless it is too big, unflushed, cached, being fetched, or enough fetches are under
        way. -> whether a fetch was started."""
        if ref is None or not 0 < size <= PREFETCH_ON_OPEN:
            return False
        fs = self.wb.get(ino)
        if fs is not None and (fs.blocks or fs.size != size) or ino in self.wb.pending:
            return False  # newer data than `ref` exists
        if not self._start_fetch(ref, min(size, ref.length), who):
            return False
        self.stats["prefetches"] += 1
        return True

    def _start_fetch(self, ref: BlockRef, length: int, who: Caller, reader: FileState | None = None) -> bool:
        """Fetch `ref` into the segment cache in a background task, unless it is cached, being
        fetched, or enough fetches are under way; `reader`: the sequential reader it is fetched
        ahead of. -> whether a fetch was started."""
        if (not self.can_prefetch() or ref.object_id in self._fetching
                or self.cache.get(((ref.object_id, ref.inode, ref.blockno), 0)) is not None):
            return False
        self._prefetches += 1
        self._nursery.start_soon(self._prefetch, ref, length, who, reader)
        return True

    async def _prefetch(self, ref: BlockRef, length: int, who: Caller, reader: FileState | None) -> None:
        _SPECULATIVE.set(True)  # this task's own context
        try:
            if reader is not None and reader.furthest_read_end > ref.blockno * self.block_size:
                # The reader reached the block before this task ran: its own requests fetch the
                # block to its end, and take what they read; a fetch now would only fill the
                # cache with segments they have already taken.
                self.stats["blocks_read_ahead_late"] += 1
                return
            await self.read_stored(ref, 0, length, False, who)
            if reader is not None and reader.open_count <= 0:  # closed meanwhile (`closed`)
                ident = (ref.object_id, ref.inode, ref.blockno)
                for i in range(fmt.segment_count(ref.obj_length, self.segment_size)):
                    self.cache.discard((ident, i))
        except (S3fuseError, OSError):
            pass  # the read fetches again, and reports
        finally:
            self._prefetches -= 1

    async def prefetcher(self) -> None:
        """Runs the fetches of `prefetch` (at open, and ahead of a reader) while mounted."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await trio.sleep_forever()
        finally:
            self._nursery = None

    # ------------------------------------------------------------------ reads
    async def read(self, ino: int, fs: FileState | None, file_size: int, off: int, size: int,
                   who: Caller) -> bytes:
        """Bytes [off, off+size) of a file of `file_size` bytes: buffered blocks from `fs`,
        the others from the store."""
        if off >= file_size or size <= 0:
            return b""
        end = min(off + size, file_size)
        sequential = fs is not None and fs.last_read_end == off
        if fs is not None:
            # noted on arrival, not on completion: the kernel's read-ahead sends several
            # requests at once, in order, and each must see its predecessor as sequential
            fs.last_read_end = end
            # how far the reader got, for the blocks fetched ahead of it (_prefetch): a request
            # arrives at most a read-ahead window behind it, a new pass from further back
            if end > fs.furthest_read_end or end < fs.furthest_read_end - OUT_OF_ORDER:
                fs.furthest_read_end = end
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
                self._read_ahead(fs, blockno, who)
            if blk is not None and blk.runs is None:
                chunk = bytes(blk.data[boff : boff + n])
            else:
                ref = self.block_ref(ino, blockno)
                if ref is None:
                    chunk = b""
                else:
                    patches = self.patches_for(ref)
                    with self.in_use.holding([ref.object_id, *(p.object_id for p in patches)]):
                        overlays = [await self.patch_runs(p, ref, who) for p in patches]
                        # what goes to the kernel's page cache is the object with the patches over it
                        chunk = await self.read_stored(ref, boff, n, sequential, who,
                                                       None if blk is not None else push,
                                                       size >= STREAM_READ, overlays)
                    chunk = self._patched(overlays, boff, chunk)
            if len(chunk) < n:
                chunk += bytes(n - len(chunk))
            if blk is not None and blk.runs is not None:  # a sparse block: its runs over the stored bytes
                out = bytearray(chunk)
                blk.runs.apply(out, boff)
                chunk = bytes(out)
            parts.append(chunk)
            pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read_stored(self, ref: BlockRef, boff: int, n: int, sequential: bool, who: Caller,
                          push: tuple[FileState, int, int, int] | None = None, use_once: bool = False,
                          overlays: list[PatchRuns] = ()) -> bytes:
        """Bytes [boff, boff+n) of a stored block, clipped to its valid length. With
        `use_once`, the segments read whole leave the cache (or do not enter it)."""
        stop = min(boff + n, ref.length)
        if boff >= stop:
            return b""
        seg = self.segment_size
        first, last = boff // seg, (stop - 1) // seg
        # cached segments are bound to the block they were authenticated for, not just to the
        # object: a block-map row pointed at another file's object must not find its plaintext
        ident = (ref.object_id, ref.inode, ref.blockno)
        segs = [self.cache.get((ident, i)) for i in range(first, last + 1)]
        waited = False
        while any(s is None for s in segs) and ref.object_id in self._fetching:
            # another request is fetching this object (read-ahead): wait, then look again
            await self._fetching[ref.object_id].wait()
            waited = True
            segs = [self.cache.get((ident, i)) for i in range(first, last + 1)]
        if waited and _SPECULATIVE.get() and any(s is None for s in segs):
            # a reader fetched this object first, and has read what is missing now: fetching it
            # again would only fill the cache with segments nobody asks for
            return b""
        # A large read fills the kernel's page cache (files are opened with keep_cache), which
        # then answers a reader who comes back: the segments it reads whole need no copy here,
        # so that streaming a file keeps only what was fetched ahead of the reader.
        used = range(0)
        if use_once:
            end = (stop - 1) // seg + 1 if stop == ref.length else stop // seg  # past the last whole one
            used = range(-(-boff // seg), end)
            for i in used:
                self.cache.discard((ident, i))
        if any(s is None for s in segs):
            missing = [first + k for k, s in enumerate(segs) if s is None]
            lo, hi = missing[0], missing[-1]
            if sequential and not waited:
                # (after a wait, the fetch that ended it was another request's of this block:
                # the kernel's read-ahead sends several at once, and one that arrived out of
                # order did not extend to the block's end; the later ones are under way too, so
                # this one fetches only its own, not what they take)
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
                    around = max(1, READ_AROUND // seg)  # segments of READ_AROUND or more: the one missed
                    lo, hi = min(lo, lo // around * around), min(count - 1, max(hi, (lo // around + 1) * around - 1))
            needed = missing[0], missing[-1]
            if not _SPECULATIVE.get():
                self.stats["read_fetches"] += 1  # a reader that waits for the store itself
            done = self._fetching[ref.object_id] = trio.Event()
            try:
                try:
                    fetched = await self.fetch_segments(ref, lo, hi, who)
                except IntegrityError:
                    if (lo, hi) == needed:
                        raise
                    # a segment fetched only for read-ahead failed (and was logged): the ones
                    # this read needs may still be intact, so a damaged neighbour costs no more
                    # than its own range
                    (lo, hi), push = needed, None
                    fetched = await self.fetch_segments(ref, lo, hi, who)
            finally:
                del self._fetching[ref.object_id]
                done.set()
            for k, s in enumerate(fetched):
                if (first <= lo + k <= last or push is None) and lo + k not in used:
                    self.cache.put((ident, lo + k), s)
            segs = [s if s is not None else fetched[first + k - lo] for k, s in enumerate(segs)]
            if push is not None:
                self._push_fetched(push, ref, lo, fetched, overlays)
        data = segs[0] if len(segs) == 1 else b"".join(segs)
        start = boff - first * seg
        return data[start : start + (stop - boff)]

    def _push_fetched(self, push: tuple[FileState, int, int, int], ref: BlockRef, lo: int,
                      fetched: list[bytes], overlays: list[PatchRuns] = ()) -> None:
        """Queue the fetched plaintext (the block's patches applied over it), less the pages
        the current request will fill, for the kernel's page cache, if the file allows it
        (pagecache.py says when)."""
        fs, gen, req_start, req_end = push
        if (self.pusher is None or fs.push_gen != gen or fs.writers > 0 or fs.dirty or fs.open_count <= 0
                or fs.ino in self.wb.pending or self.wb.get(fs.ino) is not fs):
            return
        data = memoryview(self._patched(overlays, lo * self.segment_size,
                                        fetched[0] if len(fetched) == 1 else b"".join(fetched)))
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

    async def fetch_segments(self, ref: BlockRef, first: int, last: int, who: Caller,
                             grant: WriteGrant | None = None) -> list[bytes]:
        """Segments first..last of a stored block, fetched and authenticated."""
        try:
            if (last - first + 1) * self.segment_size <= THREAD_THRESHOLD:
                return await self._fetch_segments_of(ref, first, last, who, grant)
            async with self._large_fetches:
                return await self._fetch_segments_of(ref, first, last, who, grant)
        except BackendError as exc:  # the store failed (integrity errors are logged as such)
            if not _SPECULATIVE.get():
                log.error("reading object %s (inode %d, block %d) failed: %s", ref.object_id.hex(), ref.inode,
                          ref.blockno, exc)
            raise

    async def _fetch_segments_of(self, ref: BlockRef, first: int, last: int, who: Caller,
                                 grant: WriteGrant | None = None) -> list[bytes]:
        key = ref.object_id.hex()
        opened = self.codec.opened(ref)
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
        opened = await self._open(ref, bufs[0], who, grant)
        try:
            if length > THREAD_THRESHOLD:
                return await self.codec.crypto.run(
                    fmt.decrypt_segments, opened.keys, opened.header, first, bufs[-1], last - first + 1)
            return fmt.decrypt_segments(opened.keys, opened.header, first, bufs[-1], last - first + 1)
        except fmt.FormatError as exc:
            raise self._integrity(ref, str(exc)) from None

    async def _open(self, ref: BlockRef, header_bytes: bytes, who: Caller,
                    grant: WriteGrant | None) -> OpenObject:
        try:
            return await self.codec.open(ref, header_bytes, who, grant)
        except (IntegrityError, fmt.FormatError) as exc:
            raise self._integrity(ref, str(exc)) from None

    def _integrity(self, ref: BlockRef, why: str) -> IntegrityError:
        msg = f"object {ref.object_id.hex()} (inode {ref.inode}, block {ref.blockno}): {why}"
        if not _SPECULATIVE.get():
            self.stats["integrity_errors"] += 1
            log.error("integrity error: %s", msg)
        return IntegrityError(msg)

    async def load_block(self, ref: BlockRef, who: Caller, grant: WriteGrant | None) -> bytearray:
        """The whole valid plaintext of a stored block (its patches applied), for a
        read-modify-write. The objects are held from here on (`InUse`): the caller looks
        `ref` up in this same step, with no await since, or holds a lock that keeps the
        block's rows (re-encryption holds the flush lock)."""
        count = fmt.segment_count(ref.obj_length, self.segment_size)
        patches = self.patches_for(ref)
        with self.in_use.holding([ref.object_id, *(p.object_id for p in patches)]):
            segs = await self.fetch_segments(ref, 0, count - 1, who, grant)
            data = bytearray(b"".join(segs))
            del data[ref.length :]
            for patch in patches:
                (await self.patch_runs(patch, ref, who, grant)).apply(data, 0)
        return data

    def closed(self, fs: FileState) -> None:
        """The last handle of `fs` was released. A file streamed through keeps nothing here:
        the segments its reads took whole never entered (`read_stored`), and what is left was
        fetched ahead of requests the kernel no longer sends (it had the pages, or the reader
        stopped); a reader who comes back finds the kernel's page cache (keep_cache)."""
        fs.read_ahead_to, fs.decrypting_ahead = 0, -1  # a reader who comes back starts afresh
        if fs.streamed:
            fs.streamed = False
            self.cache.discard_inode(fs.ino)

    def deleted(self, object_ids: list[bytes]) -> None:
        """These objects were deleted from the store: no read can reach their segments any
        more, so the plaintext kept of them is dead weight among the live data."""
        self.cache.discard_objects(set(object_ids))

    def forget_plaintext(self) -> None:
        """Drop every cached segment (after a key is withdrawn)."""
        self.cache.clear()

