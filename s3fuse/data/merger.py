"""The background merge: blocks that the flusher left with patches (small writes into stored
blocks, flush.py) are stored whole again once the filesystem is not being written, so that a
read of such a block fetches one object instead of the object and all its patches.

A merge changes how a block is stored, never what it holds. Under the flush lock (so no flush,
truncate or re-encryption changes the block's rows meanwhile, and the collector's sweep sees
no object between its put and its commit) it loads the block with its patches applied, seals
and puts that as a new object, passes the sync barrier, and commits the block's row in one
transaction, which drops the patches: the old object and the patches become garbage. So
committed metadata still refers only to durable objects, and a block reads as the state of
some commit. A write that arrives meanwhile goes to the buffer as it would otherwise: a small
one keeps its runs, which apply over whichever object the block has when they are stored; a
larger one loads the block through the read path, which holds the objects it looked up
(collector.InUse) until it has them.

One block at a time (its plaintext, the patches and the sealed object are what it holds), its
decryption and encryption in worker threads. Only files under the master key (SSE-S3) are
merged: a customer key or a KMS key would be used for a request no caller made.
"""

from __future__ import annotations

import logging
import time

import trio

from ..backends import Backend
from ..crypto import SYSTEM
from ..errors import BackendError, S3fuseError
from ..meta import BlockRef, Meta
from ..policy import DEFAULT, SSE_S3, Policy
from .codec import ObjectCodec
from .collector import Collector
from .flush import Flusher
from .readcache import ReadCache
from .writeback import WriteBack

log = logging.getLogger(__name__)

MERGE_IDLE = 1.0  # s without a write before blocks are merged
MERGE_LOOK = 0.5  # s: how often the merger looks whether it may run
MERGE_BATCH = 16  # patched blocks looked up at once
FAILED_BACKOFF = 30.0  # s: after a merge failed for a reason of the store's


class Merger:
    def __init__(self, meta: Meta, backend: Backend, codec: ObjectCodec, wb: WriteBack, reads: ReadCache,
                 flusher: Flusher, collector: Collector, stats: dict[str, int]) -> None:
        self.meta = meta
        self.backend = backend
        self.codec = codec
        self.wb = wb
        self.reads = reads
        self.flusher = flusher
        self.collector = collector
        self.stats = stats
        self.last_write = 0.0  # time.monotonic() of the last write (DataStore.write notes it)
        self._skipped: set[int] = set()  # inodes not merged while mounted (their key, damage)

    def idle(self) -> bool:
        return time.monotonic() - self.last_write >= MERGE_IDLE

    async def run(self) -> None:
        """Merges patched blocks whenever the filesystem has not been written for a while."""
        while True:
            await trio.sleep(MERGE_LOOK)
            if not self.idle():
                continue
            try:
                await self.merge_while_idle()
            except S3fuseError as exc:
                log.warning("background merge of patched blocks failed (will retry): %s", exc)
                await trio.sleep(FAILED_BACKOFF)
            except Exception:
                log.exception("background merge of patched blocks failed unexpectedly (will retry)")
                await trio.sleep(FAILED_BACKOFF)

    async def merge_while_idle(self) -> int:
        """Merge patched blocks until none is left or a write arrives. -> blocks merged."""
        merged = 0
        while self.idle():
            # a file with buffered blocks is the flusher's for now; a merge would only be redone
            busy = {ino for ino, fs in self.wb.files.items() if fs.blocks} | set(self.wb.pending)
            blocks = self.meta.patched_blocks(MERGE_BATCH, exclude=self._skipped | busy)
            if not blocks:
                return merged
            progress = 0
            for ino, blockno in blocks:
                if not self.idle():
                    break
                progress += await self.merge(ino, blockno)
            merged += progress
            if not progress:  # what is left changed under us: look again at the next round
                return merged
        return merged

    async def merge(self, ino: int, blockno: int) -> bool:
        """Store one patched block whole; -> whether it was merged."""
        async with self.flusher.lock:
            fs = self.wb.get(ino)
            if fs is not None and blockno in fs.blocks or self.wb.pending_ref(ino, blockno)[0]:
                return False  # newer data is buffered or stored: the flusher stores the block
            row = self.meta.inode(ino)
            if row is None:
                return False
            policy = Policy.decode(row.sse) or DEFAULT
            base = self.meta.block(ino, blockno)
            patches = self.meta.patches_of(ino, blockno)
            if not patches:
                return False  # merged meanwhile
            if policy.mode != SSE_S3 or base is None:
                self._skipped.add(ino)  # not ours to merge (patches with no block are fsck's)
                return False
            try:
                data = await self.reads.load_block(base, SYSTEM, None)
            except BackendError:
                raise  # the store's: retried after a while
            except S3fuseError:  # damage or a key (logged by the read path): not ours to mend
                self._skipped.add(ino)
                return False
            plain = bytes(data)
            del data  # one copy of the block at a time
            ref = await self._store(ino, blockno, plain, policy)
            del plain
            with self.meta.transaction():
                now = self.meta.block(ino, blockno)
                if (now is None or now.object_id != base.object_id
                        or [p.object_id for p in self.meta.patches_of(ino, blockno)]
                        != [p.object_id for p in patches]):
                    self.meta.add_garbage(ref.object_id)  # the file was deleted meanwhile
                    merged = False
                else:
                    self.meta.put_block(ref)  # the old object and the patches become garbage
                    merged = True
        self.reads.forget_patches(patches)
        self.collector.kick()
        if merged:
            self.stats["background_merges"] += 1
            self.stats["background_merged_patches"] += len(patches)
        return merged

    async def _store(self, ino: int, blockno: int, data: bytes, policy: Policy) -> BlockRef:
        """Seal, put and sync a block's new object; -> its row (not committed). An object
        whose put or sync failed is garbage."""
        blob, ref = await self.codec.seal(ino, blockno, data, policy, SYSTEM)
        size = len(blob)
        try:
            await self.backend.put(ref.object_id.hex(), blob)
            del blob
            await self.backend.sync()
        except BaseException:
            with self.meta.transaction():
                self.meta.add_garbage(ref.object_id)
            raise
        self.stats["objects_put"] += 1
        self.stats["bytes_put"] += size
        return ref
