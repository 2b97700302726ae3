"""Write-back state: the files with open handles or unstored data, their dirty blocks, the
blocks stored but not yet committed, and each file's failure and backoff.

A state machine with no I/O: no backend, no metadata database, no event loop. The data path
(datastore.py, flush.py) asks it what to do next and tells it what happened; tests drive it
directly (tests/test_writeback.py). A block goes

    dirty (in `FileState.blocks`) -> in flight (being sealed from its own buffer)
      -> stored and deferred (in `pending`, a streaming writer's full block)
      -> committed (gone from here; the block map has it)

and a failed store leaves it dirty: a failure of the file's own (its key, its object's put)
sets the file's backoff, a shared failure (the sync barrier, the commit) that of the batch.
"""

from __future__ import annotations

import errno
import logging
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

from ..crypto import SYSTEM, Caller, WriteGrant
from ..errors import S3fuseError
from ..meta import BlockRef
from ..policy import DEFAULT, SSE_KMS, Policy

log = logging.getLogger(__name__)

# at most this many files per flush batch; a longer queue is worked off batch after batch,
# without the close delay between them, so that a reader that follows a burst of small files
# does not compete with the backlog for long
FLUSH_BATCH = 256
# how long stored blocks of a streaming writer may wait for their metadata commit
COMMIT_DELAY = 1.0
# a file whose store keeps failing for a reason of its own is retried alone, after this
# long, doubling up to the maximum: the files it was batched with never wait for it
RETRY_FIRST = 1.0
RETRY_MAX = 30.0


# what a run costs the buffer beyond its bytes (its list entries and bytearray), so that tiny
# writes at scattered offsets cannot hold many times `dirty_limit` in memory
RUN_COST = 128


class Runs:
    """The bytes written into a block that is not in memory (a sparse block): disjoint
    runs (offset within the block, bytes), ascending; touching runs are joined. `nbytes`
    counts the bytes, `cost` what they take in the buffer."""

    __slots__ = ("starts", "datas", "nbytes")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.datas: list[bytearray] = []
        self.nbytes = 0

    @property
    def cost(self) -> int:
        return self.nbytes + RUN_COST * len(self.starts)

    def copy(self) -> Runs:
        out = Runs()
        out.starts = list(self.starts)
        out.datas = [bytearray(d) for d in self.datas]
        out.nbytes = self.nbytes
        return out

    def items(self) -> list[tuple[int, bytearray]]:
        return list(zip(self.starts, self.datas))

    def covers(self, off: int, end: int) -> bool:
        i = bisect_right(self.starts, off) - 1
        return i >= 0 and self.starts[i] + len(self.datas[i]) >= end

    def write(self, off: int, chunk) -> int:
        """Write `chunk` at `off`. -> how much the cost grew by."""
        end = off + len(chunk)
        starts, datas = self.starts, self.datas
        i = bisect_right(starts, off) - 1
        lo = i if i >= 0 and starts[i] + len(datas[i]) >= off else i + 1
        hi = bisect_right(starts, end)  # runs starting at or before `end` touch the write
        before = self.cost
        if lo == hi:
            starts.insert(lo, off)
            datas.insert(lo, bytearray(chunk))
            self.nbytes += len(chunk)
            return self.cost - before
        start = min(off, starts[lo])
        stop = max(end, starts[hi - 1] + len(datas[hi - 1]))
        if hi == lo + 1 and starts[lo] <= off:  # inside one run, or extending it
            run = datas[lo]
            if stop - start > len(run):
                self.nbytes += stop - start - len(run)
                run.extend(bytes(stop - start - len(run)))
            run[off - start : end - start] = chunk
            return self.cost - before
        # the runs the write touches are joined into one (the write covers the gaps between them)
        joined = bytearray(stop - start)
        for k in range(lo, hi):
            joined[starts[k] - start : starts[k] - start + len(datas[k])] = datas[k]
            self.nbytes -= len(datas[k])
        joined[off - start : end - start] = chunk
        starts[lo:hi] = [start]
        datas[lo:hi] = [joined]
        self.nbytes += len(joined)
        return self.cost - before

    def truncate(self, size: int) -> int:
        """Drop what lies at or past `size`. -> how much the cost fell by."""
        before = self.cost
        k = bisect_left(self.starts, size)
        del self.starts[k:]
        del self.datas[k:]
        if self.datas and self.starts[-1] + len(self.datas[-1]) > size:
            del self.datas[-1][size - self.starts[-1] :]
        self.nbytes = sum(len(d) for d in self.datas)
        return before - self.cost

    def apply(self, target: bytearray, base: int = 0) -> None:
        """Write the runs into `target`, which holds the block's bytes from `base` on."""
        n = len(target)
        for start, data in zip(self.starts, self.datas):
            lo, hi = max(start, base), min(start + len(data), base + n)
            if lo < hi:
                target[lo - base : hi - base] = data[lo - start : hi - start]


@dataclass(eq=False)
class Block:
    """A block of an open file that differs from (or is not yet in) the store: its bytes
    from offset 0 (`data`), or, for a sparse block (a stored full block written in small
    pieces, which is not loaded), only the runs written (`runs`), stored as a patch."""

    data: bytearray
    version: int = 0
    # written up to its end by a write that ended there: a sequential writer is done with it,
    # so it is worth storing now rather than waiting for close or idleness
    sealed: bool = False
    inflight: bool = False  # being encrypted from this very buffer: copy before changing it
    superseded: bool = False  # a copy replaced it while in flight; its bytes still count as dirty
    runs: Runs | None = None

    @property
    def nbytes(self) -> int:
        """Bytes it holds in the buffer."""
        return self.runs.cost if self.runs is not None else len(self.data)


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
    # numbers of blocks marked sealed, some perhaps gone or replaced since (pruned when
    # counted): a write asks how many sealed blocks its file holds, and random writes keep
    # hundreds of unsealed blocks that are not worth looking through each time
    maybe_sealed: set[int] = field(default_factory=set)
    open_count: int = 0
    flush_requested: bool = False
    dirty_since: float = 0.0
    error: int = 0  # errno of a failed background flush, reported at the next fsync (or a waiting write)
    # a store of this file failed for a reason of its own: retried alone, not before retry_at
    # (monotonic), with a delay that doubles per failure; `failure` says why, for status
    retry_delay: float = 0.0
    retry_at: float = 0.0
    failure: str = ""
    last_read_end: int = -1
    furthest_read_end: int = -1  # of any read so far (requests may arrive out of order)
    streamed: bool = False  # read sequentially from one block into the next since last closed
    # a sequential reader's blocks below this one have had their objects asked for ahead of it
    read_ahead_to: int = 0
    decrypting_ahead: int = -1  # the block last fetched and decrypted ahead of it
    # handles open for writing, plus changes under way (truncate): while any, nothing is
    # pushed to the kernel's page cache (pagecache.py)
    writers: int = 0
    push_gen: int = 0  # bumped by every change: pushes of data read before it are dropped
    # st_blocks (in bytes) the kernel was last told, or the stored value it may cache: if a
    # commit stores another, its cached attributes are invalidated
    stored_reported: int = 0

    @property
    def dirty(self) -> bool:
        return bool(self.blocks) or self.size != self.db_size

    def sealed_count(self) -> int:
        """How many of the buffered blocks are sealed (dropping stale `maybe_sealed` entries)."""
        count = 0
        for blockno in list(self.maybe_sealed):
            blk = self.blocks.get(blockno)
            if blk is not None and blk.sealed:
                count += 1
            else:
                self.maybe_sealed.discard(blockno)
        return count

    @property
    def buffered(self) -> int:
        """Bytes of this file held in write-back buffers."""
        return sum(b.nbytes for b in self.blocks.values())

    def set_writer(self, writer: Caller, grant: WriteGrant | None) -> None:
        """The last writer stores the file's data, under the key its open fixed."""
        self.writer = writer
        if grant is not None:
            if self.grant is not None and self.grant is not grant:
                self.grant.wipe()
            self.grant = grant

    def forget_grant(self) -> None:
        if self.grant is not None:
            self.grant.wipe()
            self.grant = None


@dataclass
class Choice:
    """What the flusher does next (`WriteBack.choose`)."""

    batch: list[FileState]  # stored together
    only_full: bool  # only the batch's full blocks (a streaming writer's), commit deferred
    retry: list[FileState]  # each stored alone (its backoff is due)
    commit_due: bool  # nothing to store, but deferred blocks waited long enough: commit them
    backlog: bool  # the batch left files behind: the next round runs without delay


@dataclass
class BatchResult:
    """What a batch stored, for `WriteBack.finish_batch`: the version of every block it stored
    (keyed (inode, block)) and the error of each file that failed for a reason of its own."""

    versions: dict[tuple[int, int], int]
    failed: dict[int, S3fuseError]


class WriteBack:
    def __init__(self, block_size: int, dirty_limit: int, flush_delay: float, stream_blocks: int = 8) -> None:
        self.block_size = block_size
        self.dirty_limit = dirty_limit
        self.flush_delay = flush_delay
        # A streaming writer's full blocks only wait for the store, which takes them as fast
        # as it can whatever their number: beyond this many (being stored, or next), the writer
        # waits, and the rest of the buffer stays for writes that do gain from it (random writes).
        self.stream_blocks = stream_blocks
        self.files: dict[int, FileState] = {}
        self.dirty_bytes = 0
        # stored but not yet committed blocks of streaming writers: ino -> blockno -> ref
        self.pending: dict[int, dict[int, BlockRef | None]] = {}
        self.pending_size: dict[int, int] = {}
        self.pending_since = 0.0  # monotonic; 0: nothing pending
        self.sealed_waiting = False  # full blocks of a streaming writer may be waiting: hurry
        self.starved = False  # a writer waited in vain for space; no store freed space since
        self.last_failure = ""  # of the last shared failure, so that a repeat is not logged

    # ------------------------------------------------------------------ files
    def get(self, ino: int) -> FileState | None:
        return self.files.get(ino)

    def add(self, fs: FileState) -> FileState:
        self.files[fs.ino] = fs
        return fs

    def unsettled(self, fs: FileState) -> bool:
        """Has data not yet in the block map (dirty or stored-but-uncommitted)."""
        return fs.dirty or fs.ino in self.pending

    def drop(self, fs: FileState) -> bool:
        """Forget a file that is closed, clean and committed. -> whether it was forgotten.
        One still open for reading only, with nothing left to store, keeps its state but
        not its key copy: the grant is for storing what writers wrote."""
        settled = fs.writers <= 0 and not fs.dirty and not fs.error and fs.ino not in self.pending
        if settled and fs.open_count <= 0 and self.files.get(fs.ino) is fs:
            del self.files[fs.ino]
            fs.forget_grant()
            return True
        if settled:
            fs.forget_grant()
        return False

    def released(self, fs: FileState, writer: bool) -> None:
        fs.open_count -= 1
        if writer:
            fs.writers -= 1
        if fs.dirty and (fs.open_count <= 0 or (writer and fs.writers <= 0)):
            fs.flush_requested = True  # the last close, or the last writer's: store the data soon

    def take_error(self, fs: FileState) -> int:
        err, fs.error = fs.error, 0
        return err

    def discard(self, ino: int) -> tuple[FileState | None, list[BlockRef]]:
        """The inode is gone: forget its unflushed data. -> its state, if it had any, and the
        stored-but-uncommitted objects that are garbage now."""
        pending = self.pending.pop(ino, None) or {}
        self.pending_size.pop(ino, None)
        fs = self.files.pop(ino, None)
        if fs is not None:
            fs.forget_grant()
            self.dirty_bytes -= fs.buffered
            fs.blocks.clear()
        return fs, [ref for ref in pending.values() if ref is not None]

    def pending_ref(self, ino: int, blockno: int) -> tuple[bool, BlockRef | None]:
        """(True, ref) for a block stored but not yet committed (ref None: a hole)."""
        pending = self.pending.get(ino)
        if pending is not None and blockno in pending:
            return True, pending[blockno]
        return False, None

    def pending_by_version(self, mode: str) -> dict[int, int]:
        """Stored-but-uncommitted objects under `mode`, per master-key version."""
        counts: dict[int, int] = {}
        for blocks in self.pending.values():
            for ref in blocks.values():
                if ref is not None and ref.mode == mode:
                    counts[ref.key_version] = counts.get(ref.key_version, 0) + 1
        return counts

    # ------------------------------------------------------------------ writes
    def must_wait(self, fs: FileState, off: int, n: int) -> bool:
        """Should a write of `n` bytes at `off` wait: it would take the buffers over their
        limit, or add to a file that holds `stream_blocks` full blocks already?"""
        return self.over_limit(fs, off, n) or (self.streaming_full(fs) and self.growth(fs, off, n) > 0)

    def over_limit(self, fs: FileState, off: int, n: int) -> bool:
        """Would a write of `n` bytes at `off` take the buffers over their limit?"""
        return (self.dirty_bytes + n > self.dirty_limit and self.dirty_bytes > 0
                and self.dirty_bytes + self.growth(fs, off, n) > self.dirty_limit)

    def streaming_full(self, fs: FileState) -> bool:
        """Does `fs` hold its share of full blocks? Not for a file whose store failed: a
        wait would end in its error, and a write refused with it makes the kernel drop
        those pages; it waits only for the buffer's limit, as before the failure."""
        return (len(fs.blocks) >= self.stream_blocks and not fs.error and not fs.retry_delay
                and fs.sealed_count() >= self.stream_blocks)


    def growth(self, fs: FileState, off: int, n: int) -> int:
        """How much a write would add to the buffers: nothing where it overwrites buffered
        bytes of a block not in flight."""
        grow = 0
        bs = self.block_size
        end = off + n
        while off < end:
            blockno, boff = divmod(off, bs)
            upto = min(end - off, bs - boff) + boff
            blk = fs.blocks.get(blockno)
            if blk is not None and blk.runs is not None:
                grow += 0 if blk.runs.covers(boff, upto) else upto - boff + RUN_COST
            else:
                grow += upto - boff if blk is None or blk.inflight else max(0, upto - len(blk.data))
            off += upto - boff
        return grow

    def new_block(self, fs: FileState, blockno: int, data: bytearray, mono: float) -> Block:
        """A block enters the buffers: empty, or as loaded for a partial overwrite."""
        # a truncate may have shortened the file while it was loaded
        del data[max(0, fs.size - blockno * self.block_size) :]
        blk = fs.blocks[blockno] = Block(data)
        self.dirty_bytes += len(data)
        if not fs.dirty_since:
            fs.dirty_since = mono
        return blk

    def new_sparse_block(self, fs: FileState, blockno: int, mono: float) -> Block:
        """A stored full block enters the buffers without its bytes: only what is written
        into it is kept (`Block.runs`), and stored as a patch of its object."""
        blk = fs.blocks[blockno] = Block(bytearray(), runs=Runs())
        if not fs.dirty_since:
            fs.dirty_since = mono
        return blk

    def write_block(self, fs: FileState, blockno: int, boff: int, chunk: memoryview) -> bool:
        """Write `chunk` at `boff` into a buffered block. -> whether that filled the block
        (a streaming writer's: worth storing now)."""
        blk = fs.blocks[blockno]
        if blk.runs is not None:
            self.dirty_bytes += blk.runs.write(boff, chunk)
            blk.version += 1
            if blk.runs.nbytes < self.block_size:
                return False
            # written whole (one run of the block's size): an ordinary block from now on
            self.dirty_bytes -= RUN_COST
            blk.data, blk.runs = blk.runs.datas[0], None
            if boff + len(chunk) == self.block_size:
                blk.sealed = True
                fs.maybe_sealed.add(blockno)
                self.sealed_waiting = True
                return True
            return False
        if blk.inflight:
            blk.superseded = True
            blk = fs.blocks[blockno] = Block(bytearray(blk.data), blk.version, blk.sealed)
            self.dirty_bytes += len(blk.data)
        data = blk.data
        before = len(data)
        if boff > before:
            data.extend(bytes(boff - before))
        data[boff : boff + len(chunk)] = chunk
        blk.version += 1
        self.dirty_bytes += len(data) - before
        if boff + len(chunk) == self.block_size and len(data) == self.block_size:
            blk.sealed = True
            fs.maybe_sealed.add(blockno)
            self.sealed_waiting = True
            return True
        return False

    def wrote(self, fs: FileState, end: int, now_ns: int, mono: float) -> None:
        if end > fs.size:
            fs.size = end
        fs.mtime_ns = fs.ctime_ns = now_ns
        if not fs.dirty_since:
            fs.dirty_since = mono

    def truncate(self, fs: FileState, size: int, now_ns: int) -> None:
        """A committed truncate (after the file's data was stored): cut the buffers."""
        bs = self.block_size
        for blockno in [b for b in fs.blocks if b * bs >= size]:
            self.dirty_bytes -= fs.blocks.pop(blockno).nbytes
        partial = fs.blocks.get(size // bs)
        if partial is not None and partial.runs is not None:
            self.dirty_bytes -= partial.runs.truncate(size % bs)
            partial.version += 1
        elif partial is not None and len(partial.data) > size % bs:
            self.dirty_bytes -= len(partial.data) - size % bs
            del partial.data[size % bs :]
            partial.version += 1
        fs.size = fs.db_size = size
        fs.mtime_ns = fs.ctime_ns = now_ns

    def restore(self, fs: FileState, blocks: list, size: int, mtime_ns: int, ctime_ns: int,
                writer: Caller, grant: WriteGrant | None, mono: float, patches: list = ()) -> None:
        """Data a stop kept in the recovery area, back into the buffers, to be stored now:
        whole blocks, and the runs written into sparse ones."""
        for blockno, content in blocks:
            old = fs.blocks.get(blockno)
            if old is not None:
                self.dirty_bytes -= old.nbytes
            fs.blocks[blockno] = Block(bytearray(content))
            self.dirty_bytes += len(content)
        for blockno, runs in patches:
            old = fs.blocks.get(blockno)
            if old is not None:
                self.dirty_bytes -= old.nbytes
            blk = fs.blocks[blockno] = Block(bytearray(), runs=Runs())
            for off, content in runs:
                blk.runs.write(off, content)
            self.dirty_bytes += blk.nbytes
        fs.size = size
        fs.mtime_ns, fs.ctime_ns = mtime_ns, ctime_ns
        fs.set_writer(writer, grant)
        fs.dirty_since = fs.dirty_since or mono
        fs.flush_requested = True

    # ------------------------------------------------------------------ flushing
    def pressure(self) -> bool:
        return self.dirty_bytes > self.dirty_limit // 2

    def choose(self, mono: float) -> Choice:
        """What to store next: files closed or idle long enough, else streaming writers' full
        blocks, else (under pressure) the largest buffer; files in backoff alone when due."""
        retry = [fs for fs in self.files.values() if fs.retry_delay and fs.dirty and fs.retry_at <= mono]
        healthy = [fs for fs in self.files.values() if not fs.retry_delay]
        batch = [fs for fs in healthy if fs.dirty and (
            fs.flush_requested or (fs.dirty_since and mono - fs.dirty_since >= self.flush_delay))]
        only_full = False
        if not batch:
            full = [fs for fs in healthy if fs.sealed_count()]
            if full:
                batch, only_full = full, True
            elif self.pressure():
                batch = sorted((fs for fs in healthy if fs.blocks), key=lambda f: -f.buffered)[:1]
        commit_due = (not batch and not retry and bool(self.pending_since)
                      and mono - self.pending_since >= COMMIT_DELAY)
        return Choice(batch[:FLUSH_BATCH], only_full, retry, commit_due, len(batch) > FLUSH_BATCH)

    def after_round(self) -> bool:
        """After a flusher round: -> whether healthy files are still dirty (go again)."""
        if self.sealed_waiting:
            self.sealed_waiting = any(fs.sealed_count() for fs in self.files.values())
        return any(fs.dirty and not fs.retry_delay for fs in self.files.values())

    def jobs(self, fs: FileState, only_full: bool) -> list[tuple[int, Block]]:
        """The blocks of `fs` a batch stores."""
        return [(blockno, blk) for blockno, blk in list(fs.blocks.items()) if blk.sealed or not only_full]

    def finish_batch(self, files: list[FileState], jobs: list[tuple[FileState, int, Block]],
                     result: BatchResult, only_full: bool) -> list[FileState]:
        """A batch was stored (and committed or deferred), except the files in
        `result.failed`: drop the blocks that are stored as they are now. -> the files stored."""
        stored = [fs for fs in files if fs.ino not in result.failed]
        if stored:
            self.last_failure = ""
            self.starved = False
        for fs in stored:
            if not only_full:
                fs.error = 0  # everything it held is stored now: an earlier failure lost nothing
            if fs.retry_delay:
                log.info("inode %d is stored now, after earlier failures", fs.ino)
            fs.retry_delay = fs.retry_at = 0.0
            fs.failure = ""
        for fs, blockno, blk in jobs:
            if fs.ino not in result.failed:
                self.release(fs, blockno, blk, result.versions.get((fs.ino, blockno)))
        for fs in stored:
            if not fs.blocks:
                fs.dirty_since = 0.0
                if fs.size == fs.db_size:
                    fs.flush_requested = False
        return stored

    def release(self, fs: FileState, blockno: int, blk: Block, version: int | None) -> None:
        """`blk` was stored as of `version`: it leaves the buffer, unless written since."""
        if fs.blocks.get(blockno) is blk and blk.version == version:
            del fs.blocks[blockno]
            self.dirty_bytes -= blk.nbytes
        elif blk.superseded:  # replaced by a copy while it was stored
            self.dirty_bytes -= len(blk.data)

    def batch_failed(self, files: list[FileState], exc: S3fuseError) -> bool:
        """A shared failure (sync, commit): the data stays dirty, and each file remembers the
        error for its next fsync (or a write that waits for room). -> whether it is news (not the last one again)."""
        inos = ",".join(str(f.ino) for f in files)
        failure = f"{inos}/{exc.errno}"
        news = failure != self.last_failure
        self.last_failure = failure
        for fs in files:
            fs.error = exc.errno
            fs.failure = str(exc)
        return news

    def file_failed(self, fs: FileState, exc: S3fuseError, mono: float) -> bool:
        """One file could not be stored for a reason of its own: it keeps its data, is retried
        alone with backoff, and its next fsync (or a write that waits for room) gets the error. -> whether it is news."""
        reason = f"{exc} (errno {errno.errorcode.get(exc.errno, exc.errno)})"
        news = reason != fs.failure
        fs.failure = reason
        fs.error = exc.errno
        fs.retry_delay = min(RETRY_MAX, fs.retry_delay * 2 or RETRY_FIRST)
        fs.retry_at = mono + fs.retry_delay
        return news

    def defer(self, files: list[FileState], refs: dict[tuple[int, int], BlockRef | None],
              mono: float) -> list[bytes]:
        """Stored but not yet committed: reads find these refs in `pending` meanwhile.
        -> objects of earlier deferred blocks these replace (garbage)."""
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
        if not self.pending_since:
            self.pending_since = mono
        return replaced

    def deferred(self) -> tuple[dict[int, dict[int, BlockRef | None]], dict[int, int]]:
        """A copy of the deferred blocks and sizes, for a commit to cover."""
        return {ino: dict(p) for ino, p in self.pending.items()}, dict(self.pending_size)

    def covered(self, deferred: dict[int, dict[int, BlockRef | None]]) -> None:
        """The deferred blocks a commit covers leave `pending` (committed, or superseded by
        newer objects); blocks deferred meanwhile stay for the next."""
        for ino, blocks in deferred.items():
            mine = self.pending.get(ino, {})
            for blockno, ref in blocks.items():
                if blockno in mine and mine[blockno] is ref:
                    del mine[blockno]
            if not mine:
                self.pending.pop(ino, None)
                self.pending_size.pop(ino, None)
        if not self.pending:
            self.pending_since = 0.0

    def committed(self, fs: FileState | None, size: int, stored: int) -> bool:
        """A commit wrote this file's size and stored bytes. -> whether the kernel may hold a
        stale st_blocks of it."""
        changed = fs is None or fs.stored_reported != stored
        if fs is not None:
            fs.stored_reported = stored
            fs.db_size = size
        return changed

    # ------------------------------------------------------------------ reports
    def failing(self) -> list[FileState]:
        """Files whose data could not be stored yet."""
        return [fs for fs in self.files.values() if fs.dirty and fs.failure]

    def unstored(self) -> list[FileState]:
        """Files with data a stop would lose."""
        return [fs for fs in self.files.values() if fs.dirty]

    def waiting_for_key(self, mode: str, ref: str) -> list[FileState]:
        """Files with data not yet stored under a customer key (by fingerprint) or a KMS key
        (by id)."""
        out = []
        for fs in self.files.values():
            if not self.unsettled(fs) or fs.policy.mode != mode:
                continue
            if (fs.grant.fingerprint if fs.grant is not None and mode != SSE_KMS else fs.policy.key) == ref:
                out.append(fs)
        return out
