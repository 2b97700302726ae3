"""The write-back state machine (s3fuse/data/writeback.py) driven directly: no backend, no
metadata database, no mount, no event loop. Each test walks blocks and files through their
states (dirty, in flight, stored and deferred, committed; failed, backing off, retried) and
checks what the flusher is told to do next."""

from __future__ import annotations

import errno

from s3fuse.crypto import WriteGrant
from s3fuse.data.writeback import COMMIT_DELAY, FLUSH_BATCH, RETRY_FIRST, RETRY_MAX, BatchResult, FileState, WriteBack
from s3fuse.errors import S3fuseError
from s3fuse.meta import BlockRef
from s3fuse.policy import SSE_C, SSE_S3, Policy

BS = 16


def _wb(limit: int = 10 * BS, flush_delay: float = 2.0) -> WriteBack:
    return WriteBack(BS, limit, flush_delay)


def _file(wb: WriteBack, ino: int, size: int = 0) -> FileState:
    fs = wb.add(FileState(ino, size, size, 0, 0))
    fs.open_count = 1
    return fs


def _write(wb: WriteBack, fs: FileState, off: int, data: bytes, mono: float = 1.0) -> list[int]:
    """A write as the data path does it (blocks that are not buffered start empty).
    -> the blocks it filled."""
    full = []
    pos, view = off, memoryview(data)
    while view:
        blockno, boff = divmod(pos, BS)
        n = min(len(view), BS - boff)
        if blockno not in fs.blocks:
            wb.new_block(fs, blockno, bytearray(), mono)
        if wb.write_block(fs, blockno, boff, view[:n]):
            full.append(blockno)
        pos += n
        view = view[n:]
    wb.wrote(fs, pos, 1, mono)
    return full


def _ref(ino: int, blockno: int, oid: bytes, version: int = 1) -> BlockRef:
    return BlockRef(ino, blockno, oid, BS, BS, 60, SSE_S3, "", version, b"slot")


def _stored(wb: WriteBack, files: list[FileState], only_full: bool = False,
            failed: dict | None = None) -> list[FileState]:
    """A batch that stored the current version of every job and committed it (unless
    `only_full`: then the caller defers the commit), as the flusher's success path does."""
    if not only_full:
        for fs in files:
            if fs.ino not in (failed or {}):
                wb.committed(fs, fs.size, fs.size)
    jobs = [(fs, b, blk) for fs in files for b, blk in wb.jobs(fs, only_full)]
    versions = {(fs.ino, b): blk.version for fs, b, blk in jobs}
    return wb.finish_batch(files, jobs, BatchResult(versions, failed or {}), only_full)


def test_writes_fill_blocks_and_a_full_block_is_worth_storing_at_once():
    wb = _wb()
    fs = _file(wb, 1)
    assert _write(wb, fs, 0, b"a" * 10) == []
    assert wb.dirty_bytes == 10 and fs.size == 10 and fs.dirty and not wb.sealed_waiting
    assert wb.growth(fs, 0, 10) == 0  # overwriting buffered bytes adds nothing
    assert wb.growth(fs, 8, 10) == 6 + 2  # 6 more in block 0, 2 in a new block 1
    assert _write(wb, fs, 10, b"b" * 22) == [0, 1]  # both written up to their end
    assert wb.dirty_bytes == 32 and fs.size == 32 and wb.sealed_waiting
    assert _write(wb, fs, 32, b"c") == [] and not fs.blocks[2].sealed


def test_a_streaming_writer_waits_once_it_holds_its_share_of_full_blocks():
    """Full blocks of a sequential writer only wait for the store: past `stream_blocks` of
    them the writer waits, though the buffer has room, while overwrites of what it holds and
    other files' writes go on."""
    wb = WriteBack(BS, 64 * BS, 2.0, stream_blocks=3)
    fs, other = _file(wb, 1), _file(wb, 2)
    assert _write(wb, fs, 0, b"s" * (2 * BS)) == [0, 1]
    assert not wb.must_wait(fs, 2 * BS, BS)
    assert _write(wb, fs, 2 * BS, b"s" * BS) == [2]
    assert wb.must_wait(fs, 3 * BS, 1)  # a fourth block would exceed its share
    assert not wb.must_wait(fs, 0, BS)  # rewriting a block it holds adds nothing
    assert not wb.must_wait(other, 0, BS)
    fs.error = errno.EIO  # its store failed: a wait would end in a refusal, and the kernel drops refused pages
    assert not wb.must_wait(fs, 3 * BS, 1)
    fs.error = 0
    _stored(wb, [fs], only_full=True)  # the store took them
    assert not wb.must_wait(fs, 3 * BS, 1)


def test_the_count_of_sealed_blocks_follows_every_change_of_the_buffer():
    """`sealed_count` looks only at the blocks once sealed, not at every buffered block (random
    writes keep hundreds); whatever happens to those blocks, it counts what a full look would."""
    import random

    rng = random.Random(7)
    wb = WriteBack(BS, 1 << 20, 2.0, stream_blocks=3)
    fs = _file(wb, 1)
    for _ in range(400):
        op = rng.random()
        if op < 0.4:  # a sequential run that may fill blocks
            _write(wb, fs, rng.randrange(0, 40) * BS, b"s" * rng.choice([BS, 2 * BS, BS - 1]))
        elif op < 0.7:  # a small write anywhere
            _write(wb, fs, rng.randrange(0, 40 * BS), b"r" * rng.randrange(1, 5))
        elif op < 0.85:
            _stored(wb, [fs], only_full=True)
        else:
            _stored(wb, [fs])
        assert fs.sealed_count() == sum(blk.sealed for blk in fs.blocks.values())
        assert fs.maybe_sealed >= {b for b, blk in fs.blocks.items() if blk.sealed}
        assert wb.streaming_full(fs) == (fs.sealed_count() >= 3)


def test_the_flusher_takes_closed_files_then_full_blocks_then_the_largest_under_pressure():
    wb = _wb(limit=6 * BS)
    idle = _file(wb, 1)
    _write(wb, idle, 0, b"x" * 4)
    streaming = _file(wb, 2)
    _write(wb, streaming, 0, b"y" * (BS + 3))  # one full block and part of the next
    choice = wb.choose(mono=0.5)
    assert choice.batch == [streaming] and choice.only_full and not choice.commit_due
    assert wb.jobs(streaming, only_full=True) == [(0, streaming.blocks[0])]

    wb.released(idle, writer=False)  # the last close: store it soon
    assert idle.flush_requested
    choice = wb.choose(mono=0.5)
    assert choice.batch == [idle] and not choice.only_full

    big = _file(wb, 3)
    _write(wb, big, 0, b"z" * (BS - 1))  # not full, not closed, not idle: only pressure takes it
    idle.flush_requested, streaming.blocks[0].sealed, streaming.blocks[1].sealed = False, False, False
    assert wb.choose(mono=0.5).batch == []
    _write(wb, big, BS, b"z" * (BS - 2))
    assert wb.pressure()
    assert wb.choose(mono=0.5).batch == [big]  # the largest buffer

    assert set(map(id, wb.choose(mono=3.0).batch)) == {id(idle), id(streaming), id(big)}  # idle long enough


def test_a_long_queue_is_worked_off_in_batches_without_delay():
    wb = _wb(limit=1 << 30)
    for ino in range(1, FLUSH_BATCH + 3):
        fs = _file(wb, ino)
        _write(wb, fs, 0, b"d")
        wb.released(fs, writer=False)
    choice = wb.choose(mono=0.0)
    assert len(choice.batch) == FLUSH_BATCH and choice.backlog
    _stored(wb, choice.batch)
    choice = wb.choose(mono=0.0)
    assert len(choice.batch) == 2 and not choice.backlog


def test_a_block_written_while_in_flight_is_copied_and_stays_dirty():
    wb = _wb()
    fs = _file(wb, 1)
    _write(wb, fs, 0, b"a" * BS)
    (blockno, blk), = wb.jobs(fs, only_full=False)
    version = blk.version
    blk.inflight = True  # the flusher seals it from its own buffer
    _write(wb, fs, 0, b"b")
    copy = fs.blocks[0]
    assert copy is not blk and blk.superseded and bytes(copy.data) == b"b" + b"a" * (BS - 1)
    assert bytes(blk.data) == b"a" * BS  # what is being sealed did not change
    assert wb.dirty_bytes == 2 * BS  # both count until the store ends
    blk.inflight = False
    wb.finish_batch([fs], [(fs, 0, blk)], BatchResult({(1, 0): version}, {}), only_full=False)
    assert fs.blocks == {0: copy} and wb.dirty_bytes == BS  # the copy is still to be stored


def test_a_file_failing_on_its_own_backs_off_alone_and_recovers():
    wb = _wb()
    good, bad = _file(wb, 1), _file(wb, 2)
    for fs in (good, bad):
        _write(wb, fs, 0, b"q" * 3)
        wb.released(fs, writer=False)
    exc = S3fuseError("key withdrawn", errno.EKEYREVOKED)
    batch = wb.choose(mono=0.0).batch
    assert _stored(wb, batch, failed={2: exc}) == [good]
    assert wb.file_failed(bad, exc, mono=10.0)  # news: logged
    assert not good.dirty and bad.dirty and bad.error == errno.EKEYREVOKED
    assert bad.retry_at == 10.0 + RETRY_FIRST
    assert wb.failing() == [bad] and wb.choose(mono=10.5).retry == []  # not due yet
    choice = wb.choose(mono=10.0 + RETRY_FIRST)
    assert choice.retry == [bad] and choice.batch == []  # alone, never in a healthy batch
    assert not wb.file_failed(bad, exc, mono=20.0)  # the same failure again: not news
    assert bad.retry_delay == 2 * RETRY_FIRST
    for _ in range(10):
        wb.file_failed(bad, exc, mono=20.0)
    assert bad.retry_delay == RETRY_MAX
    assert wb.take_error(bad) == errno.EKEYREVOKED and bad.error == 0
    assert _stored(wb, [bad]) == [bad]
    assert bad.retry_delay == 0 and bad.failure == "" and not bad.dirty and wb.failing() == []


def test_a_shared_failure_keeps_every_files_data_and_is_news_once():
    wb = _wb()
    files = [_file(wb, i) for i in (1, 2)]
    for fs in files:
        _write(wb, fs, 0, b"w" * 5)
    exc = S3fuseError("sync failed", errno.EIO)
    assert wb.batch_failed(files, exc)
    assert not wb.batch_failed(files, exc)  # the retry failing alike is not logged again
    assert all(fs.dirty and fs.error == errno.EIO and fs.retry_delay == 0 for fs in files)
    assert wb.dirty_bytes == 10
    _stored(wb, files)
    assert wb.last_failure == "" and wb.dirty_bytes == 0 and all(fs.error == 0 for fs in files)


def test_deferred_blocks_are_read_from_pending_until_a_commit_covers_them():
    wb = _wb()
    fs = _file(wb, 1)
    _write(wb, fs, 0, b"s" * (2 * BS + 4))
    assert _stored(wb, [fs], only_full=True) == [fs]
    assert set(fs.blocks) == {2}  # the partial block is still buffered
    first = {(1, 0): _ref(1, 0, b"A" * 16), (1, 1): _ref(1, 1, b"B" * 16)}
    assert wb.defer([fs], first, mono=5.0) == []
    assert wb.pending_ref(1, 0) == (True, first[(1, 0)]) and wb.pending_ref(1, 2) == (False, None)
    assert wb.pending_size[1] == 2 * BS and wb.unsettled(fs)
    assert wb.pending_by_version(SSE_S3) == {1: 2} and wb.pending_by_version(SSE_C) == {}
    assert not wb.choose(mono=5.0 + COMMIT_DELAY / 2).commit_due
    fs.blocks.clear()
    fs.size = fs.db_size  # nothing else to store: only the deferred commit is left
    assert wb.choose(mono=5.0 + COMMIT_DELAY).commit_due

    # block 0 stored again before the commit: its first object is replaced (garbage)
    newer = _ref(1, 0, b"C" * 16)
    assert wb.defer([fs], {(1, 0): newer}, mono=6.0) == [b"A" * 16]
    deferred, sizes = wb.deferred()
    wb.defer([fs], {(1, 1): _ref(1, 1, b"D" * 16)}, mono=6.5)  # while the commit's sync ran
    wb.covered(deferred)
    assert wb.pending_ref(1, 0) == (False, None)  # committed
    assert wb.pending_ref(1, 1)[1].object_id == b"D" * 16  # newer than the commit: stays
    assert wb.pending_since == 5.0 and wb.unsettled(fs)
    wb.covered(wb.deferred()[0])
    assert wb.pending == {} and wb.pending_since == 0.0 and not wb.unsettled(fs)


def test_a_closed_clean_file_is_forgotten_and_its_grant_wiped():
    wb = _wb()
    fs = _file(wb, 1)
    grant = WriteGrant(Policy(SSE_C, "fp", "k"), bytearray(b"k" * 32), "fp")
    fs.set_writer(fs.writer, grant)
    _write(wb, fs, 0, b"e")
    wb.released(fs, writer=False)
    assert not wb.drop(fs)  # dirty
    _stored(wb, [fs])
    wb.defer([fs], {(1, 0): _ref(1, 0, b"E" * 16)}, mono=0.0)
    assert not wb.drop(fs)  # stored, not committed
    wb.covered(wb.deferred()[0])
    assert wb.committed(fs, 1, 5)  # st_blocks changed: the kernel is told
    assert not wb.committed(fs, 1, 5)
    assert wb.drop(fs) and wb.get(1) is None and grant.wiped and grant.customer is None


def test_the_last_writer_closing_wipes_the_grant_though_a_reader_stays_open():
    wb = _wb()
    fs = _file(wb, 1)  # the writer's handle
    fs.writers = 1
    fs.open_count += 1  # and a reader's
    grant = WriteGrant(Policy(SSE_C, "fp", "k"), bytearray(b"k" * 32), "fp")
    fs.set_writer(fs.writer, grant)
    _write(wb, fs, 0, b"e")
    wb.released(fs, writer=True)
    assert not wb.drop(fs) and not grant.wiped  # its data still needs the key
    _stored(wb, [fs])
    assert not wb.drop(fs)  # the reader's handle is open: the state stays
    assert wb.get(1) is fs and grant.wiped and grant.customer is None and fs.grant is None


def test_discarding_a_file_frees_its_buffers_and_names_its_deferred_objects():
    wb = _wb()
    fs = _file(wb, 1)
    _write(wb, fs, 0, b"g" * (BS + 1))
    wb.defer([fs], {(1, 0): _ref(1, 0, b"F" * 16), (1, 3): None}, mono=0.0)
    state, garbage = wb.discard(1)
    assert state is fs and [r.object_id for r in garbage] == [b"F" * 16]
    assert wb.dirty_bytes == 0 and wb.get(1) is None and wb.pending == {}


def test_a_write_waits_only_when_it_would_grow_the_buffers_past_the_limit():
    wb = _wb(limit=2 * BS)
    fs = _file(wb, 1)
    assert not wb.must_wait(fs, 0, 5 * BS)  # an empty buffer always takes a write
    _write(wb, fs, 0, b"h" * (2 * BS))
    assert not wb.must_wait(fs, 0, BS)  # an overwrite of buffered bytes
    assert wb.must_wait(fs, 2 * BS, 1)
    wb.truncate(fs, BS + 3, now_ns=7)
    assert wb.dirty_bytes == BS + 3 and fs.size == fs.db_size == BS + 3
    assert not wb.must_wait(fs, BS + 3, BS - 3)
