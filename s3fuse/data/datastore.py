"""The data path's one public face: what the filesystem (core.py), the S3 API, the daemon,
key rotation and the control handlers may ask of it.

It owns the parts and wires them together: the write-back state (writeback.py), the object
codec (codec.py), the read cache (readcache.py), the flusher (flush.py) and the collector
(collector.py). It also holds the write path's I/O (loading a block for a partial overwrite,
waiting for buffer space), truncation, re-encryption, and the damage records of a stop.
"""

from __future__ import annotations

import errno
import os
import time

import trio

from .. import defaults
from .. import format as fmt
from ..backends import Backend
from ..crypto import SYSTEM, Caller, KeyManager, WriteGrant
from ..errors import S3fuseError
from ..meta import BlockRef, Inode, Meta
from ..pagecache import PageCachePusher
from ..policy import DEFAULT, LOST_AT_STOP, SSE_KMS, SSE_S3, XATTR_DAMAGE, Policy
from ..util import now_ns
from ..workers import WorkerPool
from .codec import ObjectCodec
from .collector import Collector, InUse
from .flush import Flusher
from .merger import Merger
from .readcache import ReadCache
from .writeback import Block, FileState, WriteBack

# a writer that finds the write-back buffer full of data that cannot be stored waits at most
# this long for space, then gets ENOSPC (its data was never accepted)
SPACE_WAIT = 30.0


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
        self.block_size = block_size
        self.segment_size = segment_size
        self.stats = {"writes": 0, "bytes_written": 0, "reads": 0, "bytes_read": 0,
                      "objects_put": 0, "bytes_put": 0, "flushes": 0, "integrity_errors": 0,
                      "flush_errors": 0, "read_fetches": 0, "prefetches": 0, "prefetches_ahead": 0,
                      "blocks_read_ahead": 0, "blocks_read_ahead_late": 0, "patches_put": 0,
                      "patch_merges": 0, "background_merges": 0, "background_merged_patches": 0}
        # enough full blocks of a streaming writer to keep the store's concurrent puts busy
        # while as many more wait their turn
        self.wb = WriteBack(block_size, dirty_limit, flush_delay, stream_blocks=2 * backend.store_concurrency)
        self.codec = ObjectCodec(keys, store_id, segment_size, WorkerPool(crypto_threads, "s3fuse-crypto"),
                                 meta.path_of, meta.key_slot_of, backend.buffer)
        in_use = InUse()  # objects reads have looked up: the collector leaves them until fetched
        self.reads = ReadCache(meta, backend, self.codec, self.wb, block_size, segment_size, cache_limit,
                               self.stats, in_use)
        self.collect = Collector(meta, backend, self.codec, in_use, self.reads.deleted)
        self.flushing = Flusher(meta, backend, self.codec, self.wb, self.collect, self.stats, self.describe)
        self.flushing.dropped = self._maybe_drop
        self.flushing.load = self.reads.load_block
        self.merging = Merger(meta, backend, self.codec, self.wb, self.reads, self.flushing, self.collect,
                              self.stats)
        self._loading: dict[tuple[int, int], trio.Event] = {}
        self.space_wait = SPACE_WAIT
        self.damaged: set[int] = set()  # files marked LOST_AT_STOP: reads fail

    # ------------------------------------------------------------------ mount wiring
    @property
    def dirty_bytes(self) -> int:
        return self.wb.dirty_bytes

    def mounted(self, pusher: PageCachePusher) -> None:
        """While mounted, fetched plaintext goes to the kernel's page cache through `pusher`,
        which is also told of inodes whose attributes changed without a kernel request
        (st_blocks after a commit), so that the kernel drops what it caches of them."""
        self.reads.pusher = pusher
        self.flushing.attrs_changed = pusher.attrs_changed

    def unmounted(self) -> None:
        self.reads.pusher = None
        self.flushing.attrs_changed = None

    def tell_attrs_changed(self, inos: list[int]) -> None:
        """Attributes of `inos` changed without a kernel request: the kernel drops its copy."""
        if self.flushing.attrs_changed is not None:
            self.flushing.attrs_changed(inos)

    async def flusher(self) -> None:
        await self.flushing.run()

    async def collector(self) -> None:
        await self.collect.run()

    async def prefetcher(self) -> None:
        await self.reads.prefetcher()

    async def merger(self) -> None:
        await self.merging.run()

    def status(self) -> dict:
        """Figures for `s3fuse status`."""
        return {"dirty_bytes": self.wb.dirty_bytes, "cache_bytes": self.reads.cache.used,
                "open_files": len(self.wb.files), **self.stats}

    # ------------------------------------------------------------------ files
    def state(self, ino: int) -> FileState:
        fs = self.wb.get(ino)
        if fs is None:
            row = self.meta.inode(ino)
            if row is None:
                raise S3fuseError(f"inode {ino} does not exist", errno.ENOENT)
            fs = self.wb.add(FileState(ino, row.size, row.size, row.mtime_ns, row.ctime_ns,
                                       policy=Policy.decode(row.sse) or DEFAULT, stored_reported=row.stored_bytes))
        return fs

    def is_open(self, ino: int) -> bool:
        fs = self.wb.get(ino)
        return fs is not None and fs.open_count > 0

    def has_unstored(self, ino: int) -> bool:
        """Written data or a size not yet stored (a commit is coming)."""
        fs = self.wb.get(ino)
        return fs is not None and fs.dirty

    def with_overlay(self, row: Inode) -> Inode:
        """A committed inode row with the file's unstored size, times and buffered bytes
        applied (what stat reports); the st_blocks reported is remembered, so that a commit
        that changes it tells the kernel."""
        fs = self.wb.get(row.id)
        if fs is not None:
            row.size = fs.size
            row.mtime_ns = fs.mtime_ns
            row.ctime_ns = fs.ctime_ns
            row.stored_bytes += fs.buffered
            fs.stored_reported = row.stored_bytes
        return row

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
        pusher = self.reads.pusher
        if pusher is not None:
            while pusher.invalidate(fs, ino):
                await trio.to_thread.run_sync(pusher.wait_for, ino)

    def unblock_pushes(self, ino: int) -> None:
        fs = self.wb.get(ino)
        if fs is not None:
            fs.writers -= 1
            self._maybe_drop(fs)

    def released(self, ino: int, writer: bool = False) -> None:
        fs = self.wb.get(ino)
        if fs is None:
            return
        self.wb.released(fs, writer)
        if fs.open_count <= 0:
            self.reads.closed(fs)
        if fs.flush_requested:
            self.flushing.wake()
        self._maybe_drop(fs)

    def _maybe_drop(self, fs: FileState) -> None:
        if self.wb.drop(fs) and self.reads.pusher is not None:
            self.reads.pusher.invalidate(fs, fs.ino)  # the inode number may be reused after this

    def take_error(self, ino: int) -> int:
        fs = self.wb.get(ino)
        if fs is None or not fs.error:
            return 0
        err = self.wb.take_error(fs)
        self._maybe_drop(fs)
        return err

    def discard(self, ino: int) -> None:
        """The inode is gone: forget its unflushed data."""
        fs, garbage = self.wb.discard(ino)
        if garbage:
            with self.meta.transaction():
                for ref in garbage:
                    self.meta.add_garbage(ref.object_id)
        if fs is not None:
            if self.reads.pusher is not None:
                self.reads.pusher.invalidate(fs, ino)
            self.flushing.freed()

    def set_times(self, ino: int, mtime_ns: int | None, ctime_ns: int | None) -> None:
        fs = self.wb.get(ino)
        if fs is not None:
            if mtime_ns is not None:
                fs.mtime_ns = mtime_ns
            if ctime_ns is not None:
                fs.ctime_ns = ctime_ns

    def unstored(self) -> list[FileState]:
        """Files with data not yet stored (what a stop keeps in the recovery area)."""
        return self.wb.unstored()

    def pending_by_version(self, mode: str) -> dict[int, int]:
        """Stored-but-uncommitted objects under `mode`, per master-key version."""
        return self.wb.pending_by_version(mode)

    # ------------------------------------------------------------------ reads
    def block_ref(self, ino: int, blockno: int) -> BlockRef | None:
        """The object holding a block: a stored-but-uncommitted one first, else the block map."""
        return self.reads.block_ref(ino, blockno)

    def prefetch_on_open(self, ino: int, who: Caller, first: BlockRef | None) -> None:
        """A file was opened for reading (see ReadCache.prefetch_on_open)."""
        fs = self.wb.get(ino)
        if fs is not None:
            self.reads.prefetch_on_open(fs, who, first)

    def run_in_background(self, fn, *args) -> bool:
        """Start `fn(*args)` in a task of the mount's background nursery; -> False when not
        mounted (the caller runs it itself)."""
        return self.reads.run_in_background(fn, *args)

    def can_prefetch(self) -> bool:
        return self.reads.can_prefetch()

    def prefetch(self, ino: int, size: int, ref: BlockRef | None, who: Caller, ahead: bool = False) -> bool:
        """Fetch a small file's stored block into the segment cache in the background (see
        ReadCache.prefetch); `ahead`: for a file not yet opened (a directory walk's next).
        -> whether a fetch was started."""
        started = self.reads.prefetch(ino, size, ref, who)
        if started and ahead:
            self.stats["prefetches_ahead"] += 1
        return started

    async def read(self, ino: int, off: int, size: int, who: Caller = SYSTEM) -> bytes:
        if ino in self.damaged:
            raise S3fuseError(f"inode {ino} lost unstored data at a stop (xattr user.s3fuse.damage)", errno.EIO)
        self.stats["reads"] += 1
        self.stats["bytes_read"] += size
        fs = self.wb.get(ino)
        if fs is not None:
            file_size = fs.size
        else:
            row = self.meta.inode(ino)
            if row is None:
                raise S3fuseError(f"inode {ino} does not exist", errno.ENOENT)
            file_size = row.size
        return await self.reads.read(ino, fs, file_size, off, size, who)

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
            data = bytearray()
        elif self._patchable(fs, blockno, ref):
            return self.wb.new_sparse_block(fs, blockno, time.monotonic())
        else:
            event = self._loading[(fs.ino, blockno)] = trio.Event()
            try:
                data = await self.reads.load_block(ref, fs.writer, fs.grant)
            finally:
                del self._loading[(fs.ino, blockno)]
                event.set()
            if blockno in fs.blocks:  # a concurrent writer won the race
                return fs.blocks[blockno]
        return self.wb.new_block(fs, blockno, data, time.monotonic())

    def _patchable(self, fs: FileState, blockno: int, ref: BlockRef) -> bool:
        """Can a small write into this stored block be kept without loading it, to be stored
        as a patch? Its committed object must be a whole block (so nothing past its end can
        show through), and its key one that needs no network call per object."""
        return (ref.length == self.block_size and not self.wb.pending_ref(fs.ino, blockno)[0]
                and not self.codec.remote_key(fs.policy))

    async def write(self, ino: int, off: int, buf: bytes) -> int:
        self.stats["writes"] += 1
        self.stats["bytes_written"] += len(buf)
        self.merging.last_write = time.monotonic()  # merges wait until writes pause
        fs = self.state(ino)
        # An earlier failed write-back is not a reason to refuse this data: with the kernel's
        # writeback cache these writes are the kernel's own write-back, and a refusal makes it
        # drop the pages. The data is kept (within the dirty limit) and the error is
        # reported at the next fsync, or by a write that must wait for buffer space (close
        # does not see it: FLUSH answers ENOSYS).
        # Room first: the buffer holds at most `dirty_limit` (plus the requests let in at
        # once), which is what a stop may have to keep in the recovery area's reserve.
        deadline = trio.current_time() if self.wb.starved else None
        while self.wb.must_wait(fs, off, len(buf)):
            for_room = self.wb.over_limit(fs, off, len(buf))  # not only the file's own full blocks
            # A writer the store cannot keep up with: plaintext kept for readers gives way
            # (a quarter stays), so that the daemon's memory is what the write-back buffer
            # holds rather than both at their limits.
            cache = self.reads.cache
            cache.shrink_to(cache.limit // 4)
            self.flushing.wake()
            if deadline is None:
                deadline = trio.current_time() + self.space_wait
            await self.flushing.wait_for_space(deadline)
            if fs.error and for_room:  # its data could not be stored: say so now rather than wait forever
                raise S3fuseError("write-back of this file failed", self.take_error(ino))
            if trio.current_time() >= deadline:
                if self.wb.dirty_bytes + self.wb.growth(fs, off, len(buf)) > self.wb.dirty_limit:
                    # the buffer is held by data the store refuses: this write is not accepted,
                    # and later writers hear so without waiting, until a store frees space
                    self.wb.starved = True
                    raise S3fuseError("the write-back buffer is full of data that cannot be stored yet",
                                      errno.ENOSPC)
                break  # only its own full blocks held it back, and there is room: it is accepted
        view = memoryview(buf)
        pos = off
        bs = self.block_size
        while view:
            blockno, boff = divmod(pos, bs)
            n = min(len(view), bs - boff)
            await self._block_for_write(fs, blockno, boff, n)
            if self.wb.write_block(fs, blockno, boff, view[:n]):
                self.flushing.wake()
            pos += n
            view = view[n:]
        self.wb.wrote(fs, pos, now_ns(), time.monotonic())
        return len(buf)

    async def truncate(self, ino: int, size: int) -> None:
        """Set a file's size; flushes its pending data first, so the commit is one state."""
        await self.block_pushes(ino)
        try:
            await self._truncate(ino, size)
        finally:
            self.unblock_pushes(ino)

    async def _truncate(self, ino: int, size: int) -> None:
        fs = self.state(ino)
        async with self.flushing.lock:
            await self.flushing.flush_one([fs], durable=False)
            now = now_ns()
            with self.meta.transaction():
                if size < fs.db_size:
                    self.meta.truncate_blocks(ino, size, self.block_size)
                self.meta.update_inode(ino, size=size, mtime_ns=now, ctime_ns=now)
            self.wb.truncate(fs, size, now)
            self.flushing.freed()
        self.collect.kick()
        self._maybe_drop(fs)

    # ------------------------------------------------------------------ flushing
    async def flush(self, ino: int, durable: bool) -> None:
        """Store a file's pending data; with `durable`, also make it survive a crash."""
        fs = self.wb.get(ino)
        if fs is not None and self.wb.unsettled(fs):
            async with self.flushing.lock:
                await self.flushing.flush_one([fs], durable)
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
        files = [fs for fs in (self.wb.get(i) for i in inos) if fs is not None and self.wb.unsettled(fs)]
        failed: dict[int, S3fuseError] = {}
        if files:
            async with self.flushing.lock:
                failed = await self.flushing.flush_batch(files, durable=False)
            for fs in files:
                self._maybe_drop(fs)
        return failed

    async def store_full_blocks(self, ino: int) -> None:
        """Store a streaming writer's full blocks now, their commit deferred (what the
        flusher does with them); raises the file's failure."""
        fs = self.wb.get(ino)
        if fs is not None:
            async with self.flushing.lock:
                failed = await self.flushing.flush_batch([fs], durable=False, only_full=True)
            if failed:
                raise failed[ino]

    async def flush_all(self, durable: bool = True) -> None:
        """Store every file's data; files that fail do not hold back the others, and the
        first failure is raised once all were tried."""
        async with self.flushing.lock:
            files = [fs for fs in self.wb.files.values() if self.wb.unsettled(fs)]
            failed = await self.flushing.flush_batch(files, durable)
        for fs in list(self.wb.files.values()):
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
            self.wb.restore(fs, body["blocks"], body["size"], body["mtime_ns"], body["ctime_ns"], writer, grant,
                            time.monotonic(), body.get("patches", []))
            await self.flush(ino, durable=True)
        finally:
            fs.open_count -= 1
            self._maybe_drop(fs)

    def exclusive(self) -> trio.Lock:
        """Held (`async with`), no flush runs: no object is being sealed or committed, so
        every stored object is a committed row or a pending block."""
        return self.flushing.lock

    async def collect_garbage(self) -> int:
        return await self.collect.collect()

    async def sweep_unreferenced(self) -> int:
        """After an unclean stop: delete objects that were put but never committed."""
        return await self.collect.sweep_unreferenced()

    # ------------------------------------------------------------------ re-encryption
    async def reencrypt(self, ino: int, policy: Policy, who: Caller) -> int:
        """Store every block of a file again under `policy`, switching all at once.

        New objects are put and synced first, then one transaction swaps the whole block
        map: readers see the old or the new objects, never a mix. Blocks are done one at a
        time, so memory stays at one block.
        """
        fs = self.state(ino)
        async with self.flushing.lock:
            await self.flushing.flush_one([fs], durable=False)
            new_refs = []
            try:
                for ref in self.meta.blocks_of(ino):
                    if fmt.is_patch(ref.blockno):
                        continue  # applied by load_block; the new object replaces them
                    data = await self.reads.load_block(ref, who, None)
                    new_refs.append(await self.flushing.store_snapshot(ino, ref.blockno, bytes(data), policy, who))
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
            fs.forget_grant()  # made for the old setting
            fs.ctime_ns = now  # the same instant as the row, not a second reading
        self.collect.kick()
        self._maybe_drop(fs)
        return len(new_refs)

    # ------------------------------------------------------------------ damage
    def mark_damaged(self, ino: int, why: str) -> None:
        """A stop had to drop this file's unstored data: record it in the metadata, so that
        fsck reports it and opening it fails (EIO) instead of returning what is left."""
        with self.meta.transaction():
            self.meta.set_xattr(ino, XATTR_DAMAGE, LOST_AT_STOP + why.encode("utf-8", "replace"))
        self.damaged.add(ino)

    def is_damaged(self, ino: int) -> bool:
        return ino in self.damaged

    def clear_damage(self, ino: int) -> None:
        """The owner removed the damage record: reads are served again."""
        self.damaged.discard(ino)

    def load_damaged(self) -> None:
        self.damaged = set(self.meta.inodes_with_xattr(XATTR_DAMAGE, LOST_AT_STOP))

    # ------------------------------------------------------------------ keys and reports
    def describe(self, ino: int) -> str:
        """A file's path for messages (or why there is none)."""
        try:
            return self.meta.path_of(ino)
        except Exception:  # noqa: BLE001 - a message must not fail
            return "unlinked"

    def waiting_for_key(self, mode: str, ref: str) -> list[str]:
        """Paths of files with data not yet stored under a customer key (by fingerprint) or a
        KMS key (by id): what `key remove` and `kms disable` name."""
        return sorted(self.describe(fs.ino) for fs in self.wb.waiting_for_key(mode, ref))

    def forget_cached_keys(self) -> None:
        """After a key is withdrawn, no cached data key or plaintext may outlive it."""
        self.codec.forget_all()
        self.reads.forget_plaintext()

    async def renew_prepared(self, key_id: str) -> None:
        """A KMS key was rotated: the data keys that opens made under it are made again under
        its new version (the old one stays if that fails), so that data is stored under the
        version current when it is stored, as without them. Not for a network KMS, whose
        call would hold up the loop."""
        if self.keys.kms_blocks(key=key_id):
            return
        for fs in self.wb.files.values():
            grant = fs.grant
            if grant is None or not grant.prepared or fs.policy.mode != SSE_KMS or fs.policy.key != key_id:
                continue
            for block in list(grant.prepared):
                object_id = os.urandom(fmt.OBJECT_ID_LEN)
                try:
                    data_key, wrapped = await self.keys.new_data_key(fs.policy, object_id, fs.ino, block, fs.writer,
                                                               self.describe(fs.ino))
                except S3fuseError:
                    continue
                grant.prepared[block] = (object_id, data_key, wrapped)

    def failing(self) -> list[dict]:
        """Files whose data could not be stored yet: inode, path, bytes held, why."""
        return [{"inode": fs.ino, "path": self.describe(fs.ino), "reason": fs.failure, "bytes": fs.buffered}
                for fs in self.wb.failing()]
