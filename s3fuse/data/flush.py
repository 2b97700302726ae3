"""Storing buffered data: a flush seals the dirty blocks of one or more files into new
objects, puts them, passes one durability barrier (`Backend.sync`) and only then commits the
block map, sizes and times in one transaction: so committed metadata never points at an
object that could be lost. Replaced objects go to the `garbage` table in that same
transaction and the collector deletes them afterwards.

What to store, and what a store's outcome means for the buffers, is writeback.py's; this
module does the I/O.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .. import format as fmt
from ..backends import Backend, BarrierFailed
from ..errors import S3fuseError
from ..meta import BlockRef, Meta
from ..util import one_error
from .codec import THREAD_THRESHOLD, ObjectCodec
from .collector import Collector
from .writeback import BatchResult, Block, FileState, WriteBack

log = logging.getLogger(__name__)

BATCH_DELAY = 0.03  # a streaming writer's full blocks are stored this soon
# Closed files wait this long, so that the closes of a burst of small files share one put batch,
# one sync and one commit: each sync is a journal commit of the disk under the store, which
# holds up the metadata database's writes meanwhile. fsync, truncate and memory pressure do not
# wait.
CLOSE_BATCH_DELAY = 0.25
IDLE_LOOK = 0.5  # s: the flusher looks for idle files at least this often
# A sparse block is stored as a patch of its object while the block has fewer patches than
# this and their plaintexts add up to at most a PATCH_BYTES_DIVISOR-th of a block; otherwise
# it is merged: loaded
# with its patches, written over, and stored whole (which drops the patches). This bounds what
# a read of the block fetches besides the object.
MAX_PATCHES = 16
PATCH_BYTES_DIVISOR = 2

Stored = tuple[tuple[int, int], int, BlockRef | None]  # (inode, block), version stored, its row


@dataclass
class _Early:
    """A streaming batch's blocks released as they are stored (Flusher._release_stored)."""

    jobs: list[tuple[FileState, int, Block]]  # the batch's jobs and outcomes: a released block leaves them
    done: list[Stored]
    order: dict[int, list[int]]  # per inode, the blocks not yet released, in block order
    stored: dict[tuple[int, int], tuple[Stored, Block]] = field(default_factory=dict)  # stored, not yet released


class Flusher:
    def __init__(self, meta: Meta, backend: Backend, codec: ObjectCodec, wb: WriteBack, collector: Collector,
                 stats: dict[str, int], describe: Callable[[int], str]) -> None:
        self.meta = meta
        self.backend = backend
        self.codec = codec
        self.wb = wb
        self.collector = collector
        self.stats = stats
        self.describe = describe
        self.lock = trio.Lock()  # one flush at a time; held, no object is being sealed or committed
        # blocks stored at once: a few for a local disk; more hide a network store's latency
        self._store_limiter = trio.CapacityLimiter(backend.store_concurrency)
        self._kick = trio.Event()
        self._space = trio.Event()
        self._waiting = 0  # writers waiting for buffer space: no reason to delay a store
        # objects a batch puts, by inode, even one whose put is cancelled: garbage if it fails
        self._attempted: dict[int, list[bytes]] = {}
        # set while mounted: told of inodes whose attributes changed without a kernel request
        # (st_blocks after a commit), so that the kernel drops what it caches of them
        self.attrs_changed: Callable[[list[int]], None] | None = None
        self.dropped: Callable[[FileState], None] = lambda fs: None  # see DataStore.settle
        self.load = None  # ReadCache.load_block: a stored block's bytes, its patches applied
        self._bases: dict[bytes, bytes] = {}  # a batch's patches: patch object id -> its block's object id

    # ------------------------------------------------------------------ signals
    def wake(self) -> None:
        """Something is worth storing now."""
        self._kick.set()

    def freed(self) -> None:
        """Buffer space was freed, or a store failed: writers waiting for space look again."""
        self._space.set()

    async def wait_for_space(self, deadline: float) -> None:
        """Until a store frees buffer space (or fails), or `deadline` (trio clock)."""
        if self._space.is_set():
            self._space = trio.Event()
        self._waiting += 1
        try:
            with trio.move_on_at(deadline):
                await self._space.wait()
        finally:
            self._waiting -= 1

    # ------------------------------------------------------------------ background
    async def run(self) -> None:
        """Stores data that was closed, idle, or is pressing on the buffer limit."""
        backlog = False  # the last batch left files behind: store them now, without waiting
        while True:
            with trio.move_on_after(IDLE_LOOK):
                await self._kick.wait()
            if not self.wb.pressure() and not backlog and not self._waiting:
                await trio.sleep(BATCH_DELAY if self.wb.sealed_waiting else CLOSE_BATCH_DELAY)
            self._kick = trio.Event()
            choice = self.wb.choose(time.monotonic())
            if choice.commit_due:
                try:
                    async with self.lock:
                        await self.commit([], {}, {}, durable=False)
                except S3fuseError as exc:
                    log.error("commit of stored blocks failed (will retry): %s", exc)
                    await trio.sleep(1)
                except Exception:
                    log.exception("commit of stored blocks failed unexpectedly (will retry)")
                    await trio.sleep(1)
                for fs in list(self.wb.files.values()):  # closed files that are clean now
                    self.dropped(fs)
                continue
            backlog = choice.backlog
            groups = ([(choice.batch, choice.only_full)] if choice.batch else []) + \
                [([fs], False) for fs in choice.retry]
            for group, full in groups:
                if not await self._flush_in_background(group, full):
                    await trio.sleep(1)  # a shared failure: back off, then the batch again
            if self.wb.after_round():
                self._kick.set()

    async def _flush_in_background(self, batch: list[FileState], only_full: bool) -> bool:
        """One flush of the flusher; -> False after a shared failure (the caller backs off)."""
        ok = True
        try:
            async with self.lock:
                await self.flush_batch(batch, durable=False, only_full=only_full)
        except S3fuseError:
            ok = False  # the error is reported to each file's next fsync (or a write that waits for room)
        except Exception:
            # a bug must not stop the flusher (and with it the daemon): log it, keep the data
            log.exception("flush failed unexpectedly; its data is kept in memory")
            for fs in batch:
                fs.error = fs.error or errno.EIO
            ok = False
        for fs in batch:
            self.dropped(fs)
        return ok

    # ------------------------------------------------------------------ one batch
    async def flush_one(self, files: list[FileState], durable: bool) -> None:
        """`flush_batch` (the lock held), raising the failure of a file that could not be
        stored (for callers that flush one file: fsync, truncate, re-encryption)."""
        failed = await self.flush_batch(files, durable)
        if failed:
            raise next(iter(failed.values()))

    async def flush_batch(self, files: list[FileState], durable: bool,
                          only_full: bool = False) -> dict[int, S3fuseError]:
        """Store the dirty blocks of `files`, then commit (or, for sealed blocks of a streaming
        writer, defer the commit so that one sync and one transaction cover many blocks).
        The lock must be held.

        Batching is an optimisation only: a failure that belongs to one file (its key, its
        object's put) leaves that file dirty and is returned for it (inode -> error), while
        the others are stored and committed. A shared failure (the sync barrier, the
        commit) fails them all and is raised."""
        jobs: list[tuple[FileState, int, Block]] = []
        done: list[Stored] = []
        small: dict[int, list[tuple[str, bytearray]]] = {}  # objects put together in one batch
        failed: dict[int, S3fuseError] = {}
        sizes: dict[int, int] = {}  # each file's size when its blocks were taken
        self._attempted = {}  # every object this batch puts, even one whose put is cancelled
        self._bases = {}
        self._synced = False  # the small objects' put ended with the sync barrier (_put_small)
        large = False
        # A streaming writer's full blocks leave the buffer one by one as they are stored
        # (`_release_stored`), not when the whole batch is: the writer waiting for room goes
        # on at once, so a few blocks in memory keep the store busy.
        early = _Early(jobs, done, {}) if only_full and not durable else None
        try:
            try:
                async with trio.open_nursery() as nursery:
                    for fs in files:
                        try:
                            file_jobs = self.wb.jobs(fs, only_full)
                            # the size these blocks make up: writes that land while they are
                            # stored may grow the file, and committing that larger size with
                            # these blocks would expose zeros after a crash
                            sizes[fs.ino] = fs.size
                            if early is not None:
                                early.order[fs.ino] = sorted(blockno for blockno, _ in file_jobs)
                            for blockno, blk in file_jobs:
                                jobs.append((fs, blockno, blk))
                                if (blk.runs is None and len(blk.data) <= THREAD_THRESHOLD
                                        and not self.codec.remote_key(fs.policy)):
                                    done.append(await self._seal_small(fs, blockno, blk, small.setdefault(fs.ino, [])))
                                else:
                                    large = True
                                    nursery.start_soon(self._store_block_of, fs, blockno, blk, done, failed, early)
                            # a block released early must not stay alive through these names
                            file_jobs = blk = None
                        except S3fuseError as exc:  # its key: this file's failure only
                            failed.setdefault(fs.ino, exc)
                    if small:
                        # with no other object in this batch, the barrier that its commit
                        # needs can follow the small ones in the same thread hand-off
                        commits = not (only_full and not durable)
                        nursery.start_soon(self._put_small, small, failed, commits and not large)
            except BaseExceptionGroup as group:
                raise one_error(group, S3fuseError) from None  # one backend failure, not a group, for the callers
            refs = {key: ref for key, _, ref in done}
            ok = [fs for fs in files if fs.ino not in failed]
            mine = {k: ref for k, ref in refs.items() if k[0] not in failed}
            if only_full and not durable:
                self._garbage(self.wb.defer(ok, mine, time.monotonic()), kick=False)
            elif ok or not files:
                await self.commit(ok, mine, {fs.ino: sizes[fs.ino] for fs in ok}, durable, synced=self._synced)
        except S3fuseError as exc:
            self._batch_failed(files, [ref for _, _, ref in done], exc)
            raise
        for fs in files:
            exc = failed.get(fs.ino)
            if exc is not None:
                self._file_failed(fs, [ref for key, _, ref in done if key[0] == fs.ino], exc)
        stored = self.wb.finish_batch(files, jobs, BatchResult({key: v for key, v, _ in done}, failed), only_full)
        if stored:
            self.stats["flushes"] += 1
        self._space.set()
        return failed

    async def _seal_small(self, fs: FileState, blockno: int, blk: Block,
                    batch: list[tuple[str, bytearray]]) -> Stored:
        """Seal a small block on the loop (cheaper than a thread hop) and queue its put."""
        version = blk.version
        data = bytes(blk.data)
        if _all_zero(data):
            return (fs.ino, blockno), version, None  # all zeros: a hole costs no object
        blob, ref = await self.codec.seal_here(fs.ino, blockno, data, fs.policy, fs.writer, fs.grant)
        self._attempted.setdefault(fs.ino, []).append(ref.object_id)
        batch.append((ref.object_id.hex(), blob))
        return (fs.ino, blockno), version, self._counted(ref, len(blob))

    async def _store_block_of(self, fs: FileState, blockno: int, blk: Block, done: list[Stored],
                              failed: dict[int, S3fuseError], early: _Early | None) -> None:
        """`_store_block`, its failure recorded as this file's own."""
        try:
            stored = await self._store_block(fs, blockno, blk)
        except S3fuseError as exc:
            failed.setdefault(fs.ino, exc)
            return
        done.append(stored)
        if early is not None:
            early.stored[stored[0]] = (stored, blk)
            self._release_stored(fs, early)

    def _release_stored(self, fs: FileState, early: _Early) -> None:
        """Defer the commit of `fs`'s stored blocks and drop them from the buffer, in block
        order and only as far as every earlier block of the batch is stored: a failure of one
        leaves the blocks after it dirty, so what is committed later is still a prefix of what
        the writer wrote. A released block is no longer the batch's: neither its outcome nor,
        should the file fail later, garbage."""
        order = early.order[fs.ino]
        while order and (fs.ino, order[0]) in early.stored:
            key = (fs.ino, order.pop(0))
            stored, blk = early.stored.pop(key)
            _, version, ref = stored
            self._garbage(self.wb.defer([fs], {key: ref}, time.monotonic()), kick=False)
            self.wb.release(fs, key[1], blk, version)
            early.done.remove(stored)
            early.jobs.remove((fs, key[1], blk))
            if ref is not None:
                self._attempted[fs.ino].remove(ref.object_id)
            self._space.set()

    async def _store_block(self, fs: FileState, blockno: int, blk: Block) -> Stored:
        # The limiter bounds the buffers in flight (snapshot + ciphertext) to a few blocks.
        async with self._store_limiter:
            if blk.runs is not None:
                return await self._store_sparse(fs, blockno, blk)
            version = blk.version
            if blk.sealed:
                # a finished block of a sequential writer is stored as it is; a later write
                # to it copies it first (see `WriteBack.write_block`), so no snapshot copy is needed
                blk.inflight = True
                data = blk.data
            else:
                data = bytes(blk.data)  # writes may go on while this snapshot is stored
            try:
                if _all_zero(data):
                    return (fs.ino, blockno), version, None  # all zeros: a hole costs no object
                ref = await self.store_snapshot(fs.ino, blockno, data, fs.policy, fs.writer, fs.grant)
                return (fs.ino, blockno), version, ref
            finally:
                blk.inflight = False

    async def _store_sparse(self, fs: FileState, blockno: int, blk: Block) -> Stored:
        """A sparse block: its runs as a patch of the block's committed object, or, when
        that object is no longer a whole block, is not committed yet, or has patches enough,
        merged: the block loaded (patches applied), the runs written over it, stored whole."""
        version = blk.version
        runs = blk.runs.copy()  # writes may go on while this is stored
        bs = self.wb.block_size
        pending, ref = self.wb.pending_ref(fs.ino, blockno)
        base = None if pending else self.meta.block(fs.ino, blockno)
        patches = self.meta.patches_of(fs.ino, blockno) if base is not None else []
        encoded = 4 + 8 * len(runs.starts) + runs.nbytes  # the patch's plaintext (format.encode_patch)
        if (base is not None and base.length == bs and len(patches) < MAX_PATCHES
                and encoded + sum(p.length for p in patches) <= bs // PATCH_BYTES_DIVISOR
                and not self.codec.remote_key(fs.policy)):
            seq = patches[-1].blockno - fmt.patch_number(blockno, 0) + 1 if patches else 0
            patch = await self.store_snapshot(fs.ino, fmt.patch_number(blockno, seq), fmt.encode_patch(runs.items()),
                                              fs.policy, fs.writer, fs.grant, base=base.object_id)
            self._bases[patch.object_id] = base.object_id
            self.stats["patches_put"] += 1
            return (fs.ino, blockno), version, patch
        old = ref if pending else base
        data = bytearray() if old is None else await self.load(old, fs.writer, fs.grant)
        end = runs.starts[-1] + len(runs.datas[-1]) if runs.nbytes else 0
        if end > len(data):
            data.extend(bytes(end - len(data)))
        runs.apply(data)
        self.stats["patch_merges"] += 1
        if not data or _all_zero(data):
            return (fs.ino, blockno), version, None
        return (fs.ino, blockno), version, await self.store_snapshot(fs.ino, blockno, bytes(data), fs.policy,
                                                                     fs.writer, fs.grant)

    async def store_snapshot(self, ino: int, blockno: int, data: bytes, policy, who, grant=None,
                             base: bytes = b"") -> BlockRef:
        """Seal and put one block (with `base`, a patch numbered `blockno` of that object).
        -> its block-map row (not committed)."""
        blob, ref = await self.codec.seal(ino, blockno, data, policy, who, grant, base)
        self._attempted.setdefault(ino, []).append(ref.object_id)
        await self.backend.put(ref.object_id.hex(), blob)
        return self._counted(ref, len(blob))

    def _counted(self, ref: BlockRef, size: int) -> BlockRef:
        self.stats["objects_put"] += 1
        self.stats["bytes_put"] += size
        return ref

    async def _put_small(self, small: dict[int, list[tuple[str, bytearray]]],
                         failed: dict[int, S3fuseError], sync: bool = False) -> None:
        """The small objects of a batch in one call, with `sync` the barrier after them
        (`self._synced` says whether it ran). If a put fails, each file's objects on their own,
        so that the failure is pinned on the files whose puts fail; a failed barrier is the
        whole batch's failure."""
        items = [item for ino, its in small.items() if ino not in failed for item in its]
        if not items:
            return
        try:
            await self._put_many(items, sync)
            self._synced = sync
            return
        except BarrierFailed:
            raise  # the batch's failure, as in `commit`: every file of it stays dirty
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

    async def _put_many(self, items: list[tuple[str, bytearray]], sync: bool = False) -> None:
        try:
            await self.backend.put_many(items, sync)
        except BaseExceptionGroup as group:
            raise one_error(group, S3fuseError) from None

    def _batch_failed(self, files: list[FileState], refs: list[BlockRef | None], exc: S3fuseError) -> None:
        """A shared failure (sync, commit): the data stays in memory (dirty), each file
        remembers the error for its next fsync (or a write that waits for room), and the objects this batch did put
        are garbage. The flusher retries the whole batch."""
        if self.wb.batch_failed(files, exc):  # a retry that fails the same way is not news
            log.error("flush of inode(s) %s failed, their data is kept in memory: %s (errno %s)",
                      ",".join(str(f.ino) for f in files), exc, errno.errorcode.get(exc.errno, exc.errno))
        self.stats["flush_errors"] += 1
        attempted = {oid for oids in self._attempted.values() for oid in oids}
        self._garbage({ref.object_id for ref in refs if ref is not None} | attempted)

    def _file_failed(self, fs: FileState, refs: list[BlockRef | None], exc: S3fuseError) -> None:
        """One file could not be stored for a reason of its own: its data stays in memory, the
        error goes to its next fsync (or a write that waits for room), it is retried alone with backoff, and the
        objects it did put are garbage."""
        if self.wb.file_failed(fs, exc, time.monotonic()):  # a retry that fails the same way is not news
            log.error("storing inode %d (%s) failed, its data is kept in memory and retried: %s",
                      fs.ino, self.describe(fs.ino), fs.failure)
        self.stats["flush_errors"] += 1
        self._garbage({ref.object_id for ref in refs if ref is not None}
                      | set(self._attempted.get(fs.ino, ())))

    def _garbage(self, oids, kick: bool = True) -> None:
        if oids:
            with self.meta.transaction():
                for oid in oids:
                    self.meta.add_garbage(oid)
            if kick:
                self.collector.kick()  # at once: on ENOSPC, the space they take is what is missing
        if kick:
            self._space.set()  # writers waiting for buffer space learn of the failure

    async def commit(self, files: list[FileState], refs: dict[tuple[int, int], BlockRef | None],
                     sizes: dict[int, int], durable: bool, synced: bool = False) -> None:
        """One sync, then one transaction for `refs` and everything deferred before them.
        `synced`: a barrier already followed every put of `refs`; the deferred blocks' puts
        ended before it too, since they were stored by earlier batches under the same lock."""
        bs = self.wb.block_size
        deferred, pending_size = self.wb.deferred()  # what this commit covers
        by_ino: dict[int, dict[int, BlockRef | None]] = {ino: dict(p) for ino, p in deferred.items()}
        replaced = []
        for (ino, blockno), ref in refs.items():
            old = by_ino.setdefault(ino, {}).get(blockno)
            if old is not None:
                replaced.append(old.object_id)
            by_ino[ino][blockno] = ref
        changed: list[int] = []  # inodes whose st_blocks the kernel may hold a stale value of
        if by_ino and not synced:
            await self.backend.sync()
        for (ino, blockno), ref in refs.items():
            # a patch applies to the object it was made for: that must still be the block's
            # (the flush lock keeps it so; if not, the batch fails and its data stays dirty)
            if ref is not None and fmt.is_patch(ref.blockno):
                row = self.meta.block(ino, blockno)
                if row is None or row.object_id != self._bases.get(ref.object_id):
                    raise S3fuseError(f"block {blockno} of inode {ino} changed under its patch", errno.EIO)
        # The deferred blocks this commit covers leave `pending`, whether committed or
        # superseded by a newer object in `refs` (then garbage, above: a superseded one left
        # pending would be committed later, pointing at a deleted object). The sync may have
        # let other tasks defer more blocks: those stay pending for next time.
        self.wb.covered(deferred)
        garbage_before = self.meta.garbage_made
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
                fs = self.wb.get(ino)
                size = sizes[ino] if ino in sizes else pending_size.get(ino, fs.db_size if fs else 0)
                for blockno, ref in blocks.items():
                    if blockno * bs >= size:
                        if ref is not None:
                            self.meta.add_garbage(ref.object_id)
                    elif ref is None:
                        old = self.meta.block(ino, blockno)
                        if old is not None:
                            self.meta.add_garbage(old.object_id)
                            self.meta.delete_block(ino, blockno)  # and its patches
                    else:
                        self.meta.put_block(ref)
                stored = self.meta.stored_bytes_of(ino)
                fields = {"size": size, "stored_bytes": stored}
                if self.wb.committed(fs, size, stored):
                    changed.append(ino)
                if fs is not None:
                    # times as they are now: setattr may have changed them while we stored
                    fields.update(mtime_ns=fs.mtime_ns, ctime_ns=fs.ctime_ns)
                self.meta.update_inode(ino, **fields)
        if self.meta.garbage_made != garbage_before:
            self.collector.kick()
        if changed and self.attrs_changed is not None:
            self.attrs_changed(changed)
        if durable:
            await trio.to_thread.run_sync(self.meta.sync)


def _all_zero(data: bytes | bytearray) -> bool:
    """True for a block of zeros (checked cheaply: most blocks fail at the last byte)."""
    return not data[-1:].strip(b"\0") and data == bytes(len(data))
