"""The data path (s3fuse/data/) driven directly, without a mount: interleavings of the flusher, truncate and
the collector that a mounted test can only hit by chance. Real SQLite, real objects on disk,
real crypto."""

from __future__ import annotations

import errno
import os
import stat
import time

import trio

from s3fuse.backends.local import LocalBackend
from s3fuse.crypto import SYSTEM, KeyManager
from s3fuse.data import DataStore
from s3fuse.keys.keyring import Keyring
from s3fuse.meta import ROOT_INODE, Meta

BLOCK = 64 * 1024
SEGMENT = 16 * 1024


def _file(meta: Meta, name: bytes) -> int:
    with meta.transaction():
        row = meta.create_inode(stat.S_IFREG | 0o644, 0, 0, 1, time.time_ns())
        meta.add_entry(ROOT_INODE, name, row.id)
    return row.id


def _store(tmp_path, block: int = BLOCK, **limits) -> tuple[Meta, DataStore, int]:
    objects = tmp_path / "objects"
    LocalBackend.create(str(objects))
    meta = Meta.create(str(tmp_path / "meta.db"), 0, 0, time.time_ns())
    store_id = os.urandom(16)
    data = DataStore(meta, LocalBackend(str(objects)), KeyManager(store_id, Keyring.new()), store_id,
                     block, SEGMENT, **limits)
    return meta, data, _file(meta, b"f")


def test_a_deferred_block_superseded_by_a_flush_is_not_committed_later(tmp_path):
    """A streaming writer's full block is stored and its commit deferred; the block is written
    again and a truncate flushes it, so the deferred object becomes garbage and is deleted. A
    later commit must not point the block map back at that deleted object."""

    async def main():
        meta, data, ino = _store(tmp_path)
        data.opened(ino, writer=SYSTEM)
        first, second = os.urandom(BLOCK), os.urandom(4096)
        await data.write(ino, 0, first)  # a whole block: sealed, as a sequential writer leaves it
        await data.store_full_blocks(ino)  # what the flusher does with sealed blocks
        assert meta.block(ino, 0) is None  # stored, commit deferred
        deferred = data.block_ref(ino, 0).object_id

        await data.write(ino, 0, second)
        await data.truncate(ino, BLOCK)  # flushes block 0 again: the deferred object is garbage
        assert data.block_ref(ino, 0) == meta.block(ino, 0) != None  # noqa: E711 - nothing pending
        assert await data.collect_garbage() >= 1
        assert await data.backend.head(deferred.hex()) is None

        await data.write(ino, BLOCK, b"tail")
        await data.flush(ino, durable=True)  # commits everything still pending
        assert meta.block(ino, 0).object_id != deferred
        data.forget_cached_keys()  # read from the objects, not from memory
        assert await data.read(ino, 0, BLOCK + 4) == second + first[4096:] + b"tail"
        assert data.stats["integrity_errors"] == 0

    trio.run(main)


def test_the_local_store_keeps_exact_bytes_of_objects_written_directly_or_not(tmp_path):
    """Large objects are written with O_DIRECT (padded to whole blocks, then cut to size),
    small ones the usual way; both read back byte for byte, at sizes on and off block
    boundaries, whole and in ranges, and a failed direct write leaves no partial object."""
    import random

    from s3fuse.backends.direct import DIRECT_BUFFER
    from s3fuse.backends.local import DIRECT_MIN

    root = str(tmp_path / "objects")
    LocalBackend.create(root)
    backend = LocalBackend(root)
    rng = random.Random(11)
    sizes = [[1], [4096], [DIRECT_MIN - 1], [DIRECT_MIN], [1 << 20, 4113], [4 << 20, 64 * 17],
             [DIRECT_BUFFER], [DIRECT_BUFFER, 1]]
    objects = {f"{i:02x}" + "ab" * 15: [rng.randbytes(n) for n in parts] for i, parts in enumerate(sizes)}
    large = sum(1 for parts in objects.values() if DIRECT_MIN <= sum(map(len, parts)) <= DIRECT_BUFFER)

    async def main():
        for key, parts in objects.items():
            await backend.put(key, parts)
        for key, parts in objects.items():
            whole = b"".join(parts)
            assert await backend.head(key) == len(whole)
            assert await backend.get(key) == whole
            mid = len(whole) // 2
            assert await backend.get_ranges(key, [(mid, len(whole) - mid), (0, 1)]) == [whole[mid:], whole[:1]]

    trio.run(main)
    # every large object went directly unless this filesystem refuses O_DIRECT (then none did)
    assert backend.stats["direct_puts"] == (large if backend._direct.ok else 0)
    assert large == 4
    assert os.listdir(os.path.join(root, ".tmp")) == []


def test_a_large_object_is_written_from_the_buffer_the_store_gave_for_it(tmp_path):
    """`LocalBackend.buffer` gives a large object page-aligned memory of its own, which the
    put writes with O_DIRECT as it is (no DirectWriter buffer taken); the object reads back
    byte for byte, and a small object's buffer is a plain bytearray."""
    from s3fuse.backends.local import DIRECT_MIN

    root = str(tmp_path / "objects")
    LocalBackend.create(root)
    backend = LocalBackend(root)
    assert isinstance(backend.buffer(DIRECT_MIN - 1), bytearray)
    size = (4 << 20) + 1234
    body = os.urandom(size)
    buf = backend.buffer(size)
    buf[:] = body
    taken = []
    backend._direct.write = lambda *args: taken.append(args) or False  # the copying path

    async def main():
        await backend.put("ab" * 16, buf)
        assert await backend.get("ab" * 16) == body

    trio.run(main)
    # unless this filesystem refuses O_DIRECT (then the put wrote the usual way)
    assert (not taken and backend.stats["direct_puts"] == 1) or not backend._direct.ok


def test_deleted_objects_are_recycled_for_later_puts(tmp_path, monkeypatch):
    """A deleted object's file leaves the object namespace at once and is emptied (no
    ciphertext stays behind); a later put writes into that same inode instead of allocating
    one and reads back byte for byte. The kept files are bounded, never listed as objects,
    and a new backend on the same directory finds them again, emptying any that a crash
    left with contents."""
    import pytest

    from s3fuse.backends import local
    from s3fuse.backends.base import NoSuchObject

    root = str(tmp_path / "objects")
    LocalBackend.create(root)
    backend = LocalBackend(root)
    free = os.path.join(root, ".free")
    key = lambda i: f"{i:02x}" + "cd" * 15  # noqa: E731 - object keys like the real ones
    body = {i: os.urandom(4096 + i) for i in range(8)}
    body[7] = os.urandom(local.DIRECT_MIN + 1)  # a large one is emptied too
    ino = lambda i: os.stat(os.path.join(root, key(i)[:2], key(i))).st_ino  # noqa: E731

    async def main():
        for i in (0, 1, 2, 7):
            await backend.put(key(i), body[i])
        freed = {ino(0), ino(1), ino(7)}
        for i in (0, 1, 7):
            await backend.delete(key(i))
            assert await backend.head(key(i)) is None
            with pytest.raises(NoSuchObject):
                await backend.get(key(i))
        assert backend.stats["objects_recycled"] == 3
        assert sorted(os.listdir(free)) == sorted(key(i) for i in (0, 1, 7))
        assert all(os.path.getsize(os.path.join(free, n)) == 0 for n in os.listdir(free))
        assert [k async for k in backend.list()] == [key(2)]

        for i in (3, 4, 5):
            await backend.put(key(i), [body[i][:100], body[i][100:]])
        assert {ino(3), ino(4), ino(5)} == freed  # the same inodes, written anew
        assert backend.stats["puts_recycled"] == 3 and os.listdir(free) == []
        for i in (2, 3, 4, 5):
            assert await backend.get(key(i)) == body[i]
        await backend.put(key(6), body[6])  # nothing left to reuse: a new file
        assert ino(6) not in freed and await backend.get(key(6)) == body[6]

        monkeypatch.setattr(local, "RECYCLE_MAX", 1)
        await backend.delete_many([key(3), key(4), key(9)])  # key(4) is over the bound: unlinked
        assert os.listdir(free) == [key(3)]
        assert sorted([k async for k in backend.list()]) == [key(2), key(5), key(6)]

    trio.run(main)
    # a crash between moving an object into .free/ and emptying it leaves its ciphertext there
    with open(os.path.join(free, key(10)), "wb") as f:
        f.write(os.urandom(3 * 4096))
    again = LocalBackend(root)
    assert all(os.path.getsize(os.path.join(free, n)) == 0 for n in os.listdir(free))
    kept = {os.stat(os.path.join(free, n)).st_ino for n in (key(3), key(10))}

    async def reuse():
        await again.put(key(8), body[2])
        await again.put(key(11), body[1])
        assert {ino(8), ino(11)} == kept
        assert await again.get(key(8)) == body[2] and await again.get(key(11)) == body[1]

    trio.run(reuse)


def test_a_writer_waiting_for_buffer_space_shrinks_the_segment_cache(tmp_path):
    """When writes outrun the store, the decrypted segments kept for readers give way (down
    to a quarter of their limit), so that both are not at their limits at once; the data
    written is all stored and reads back."""

    async def main():
        meta, data, ino = _store(tmp_path, dirty_limit=2 * BLOCK, cache_limit=8 * SEGMENT)
        other = _file(meta, b"g")  # read once: its 8 segments fill the cache
        data.opened(other, writer=SYSTEM)
        await data.write(other, 0, os.urandom(2 * BLOCK))
        await data.flush(other, durable=True)
        data.released(other)
        data.forget_cached_keys()
        for off in (0, BLOCK):  # reads below readcache.STREAM_READ: their segments are kept
            await data.read(other, off, BLOCK)
        assert data.status()["cache_bytes"] == 8 * SEGMENT
        data.opened(ino, writer=SYSTEM)
        payload = os.urandom(6 * BLOCK)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(data.flusher)
            for off in range(0, len(payload), BLOCK // 2):
                await data.write(ino, off, payload[off:off + BLOCK // 2])
            await data.flush(ino, durable=True)
            nursery.cancel_scope.cancel()
        assert data.status()["cache_bytes"] <= 8 * SEGMENT // 4
        assert await data.read(ino, 0, len(payload)) == payload

    trio.run(main)


def test_segments_a_large_read_took_whole_are_not_kept_in_the_cache(tmp_path):
    """The kernel keeps what a large read returned in its page cache: the decrypted segments
    such a read took whole leave the segment cache, so that streaming a file through it does
    not fill the cache. Small reads still find theirs there."""
    from s3fuse.data.readcache import STREAM_READ

    async def main():
        meta, data, ino = _store(tmp_path)
        body = os.urandom(8 * BLOCK)
        data.opened(ino, writer=SYSTEM)
        await data.write(ino, 0, body)
        await data.flush(ino, durable=True)
        data.forget_cached_keys()
        for off in range(0, len(body), STREAM_READ):
            assert await data.read(ino, off, STREAM_READ) == body[off:off + STREAM_READ]
        assert data.reads.cache.used == 0
        assert await data.read(ino, 100, 10) == body[100:110]
        assert data.reads.cache.used == SEGMENT

    trio.run(main)


BIG = 512 * 1024  # blocks above codec.THREAD_THRESHOLD: each is stored on its own


async def _until(check, what: str) -> None:
    with trio.fail_after(10):
        while not check():
            await trio.sleep(0.01)


def test_a_streaming_writers_blocks_leave_the_buffer_as_they_are_stored_in_block_order(tmp_path):
    """A batch of a sequential writer's full blocks frees each block once it and every block
    before it are stored, not when the whole batch is done: the writer waiting for room goes on
    at once. A block stored ahead of one still being stored stays until that one is."""

    async def main():
        meta, data, ino = _store(tmp_path, block=BIG)
        data.opened(ino, writer=SYSTEM)
        body = os.urandom(3 * BIG)
        await data.write(ino, 0, body)  # three full blocks
        fs = data.wb.get(ino)
        gate = trio.Event()
        store = data.flushing.store_snapshot

        async def held(ino_, blockno, *args):
            if blockno == 1:
                await gate.wait()
            return await store(ino_, blockno, *args)

        data.flushing.store_snapshot = held
        async with trio.open_nursery() as nursery:
            nursery.start_soon(data.store_full_blocks, ino)
            await _until(lambda: 0 not in fs.blocks, "block 0 to leave the buffer")
            assert data.wb.pending_ref(ino, 0)[0] and data.dirty_bytes == 2 * BIG
            await _until(lambda: data.stats["objects_put"] == 2, "block 2 to be stored")
            assert set(fs.blocks) == {1, 2}  # block 2 waits for block 1
            gate.set()
        assert not fs.blocks and data.dirty_bytes == 0
        await data.flush(ino, durable=True)
        data.forget_cached_keys()
        assert await data.read(ino, 0, len(body)) == body

    trio.run(main)


def test_a_block_released_early_survives_the_failure_of_a_later_block_of_its_batch(tmp_path):
    """Block 1 of a streaming batch fails to store: block 0, released already, stays stored
    and pending (not garbage), blocks 1 and 2 stay in memory, and once stored the file reads
    back whole."""
    from s3fuse.errors import BackendError

    async def main():
        meta, data, ino = _store(tmp_path, block=BIG)
        data.opened(ino, writer=SYSTEM)
        body = os.urandom(3 * BIG)
        await data.write(ino, 0, body)
        fs = data.wb.get(ino)
        store = data.flushing.store_snapshot
        first_done = trio.Event()

        async def failing(ino_, blockno, *args):
            if blockno == 0:
                ref = await store(ino_, blockno, *args)
                first_done.set()
                return ref
            await first_done.wait()
            await trio.sleep(0.05)  # block 0 is released by now
            if blockno == 1:
                raise BackendError("injected", errno.EIO)
            return await store(ino_, blockno, *args)

        data.flushing.store_snapshot = failing
        try:
            await data.store_full_blocks(ino)
            raise AssertionError("the failure of block 1 was not reported")
        except BackendError:
            pass
        assert set(fs.blocks) == {1, 2} and data.wb.pending_ref(ino, 0)[0]
        data.flushing.store_snapshot = store
        await data.collect_garbage()  # block 2's object is garbage; block 0's is not
        await data.flush(ino, durable=True)
        data.forget_cached_keys()
        assert await data.read(ino, 0, len(body)) == body
        assert data.stats["integrity_errors"] == 0

    trio.run(main)


def test_a_flush_commits_the_size_its_blocks_make_up_not_the_size_at_commit(tmp_path):
    """An append that lands while a batch's objects are being put grows the file; the batch
    commits the size its stored blocks make up. Committing the grown size with the older
    block would expose, after a crash before the next flush, zeros that were never written."""

    async def main():
        meta, data, ino = _store(tmp_path)
        data.opened(ino, writer=SYSTEM)
        first, appended = os.urandom(4096), os.urandom(8192)
        await data.write(ino, 0, first)
        gate, putting = trio.Event(), trio.Event()
        put_many = data.backend.put_many

        async def held(items, sync=False):
            putting.set()
            await gate.wait()
            return await put_many(items, sync)

        data.backend.put_many = held
        async with trio.open_nursery() as nursery:
            nursery.start_soon(data.flush_all, False)
            await putting.wait()
            await data.write(ino, len(first), appended)  # while block 0 is being put
            gate.set()
        stored = meta.block(ino, 0)
        assert stored is not None and meta.inode(ino).size == len(first)
        assert await data.backend.head(stored.object_id.hex()) is not None
        data.backend.put_many = put_many
        await data.flush(ino, durable=True)  # the next flush commits the append
        assert meta.inode(ino).size == len(first) + len(appended)
        data.forget_cached_keys()
        assert await data.read(ino, 0, len(first) + len(appended)) == first + appended

    trio.run(main)


def test_a_local_store_keeps_the_objects_it_read_open_up_to_its_limit(tmp_path):
    """A read hands the loop the descriptor its worker thread opened, so a later read of
    the same object is served from the page cache on the loop (`try_get_ranges`); at most
    `open_files` stay open, the ones let go of are closed, and a read that a deletion overtook
    keeps nothing (the deleted object's file may be recycled for another)."""
    root = str(tmp_path / "objects")
    LocalBackend.create(root)
    backend = LocalBackend(root, open_files=4)
    keys = [f"{i:02x}" + "cd" * 15 for i in range(10)]
    blobs = {k: os.urandom(5000) for k in keys}

    def open_here() -> list[str]:
        found = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except FileNotFoundError:  # the listing's own descriptor
                continue
            if target.startswith(root):
                found.append(target)
        return found

    async def main():
        for k, blob in blobs.items():
            await backend.put(k, blob)
        assert backend.try_get_ranges(keys[0], [(0, 10)]) is None  # never read: not open
        for k in keys:
            assert await backend.get_ranges(k, [(0, 100), (100, 4900)]) == [blobs[k][:100], blobs[k][100:]]
            assert backend.try_get_ranges(k, [(7, 9)]) == [blobs[k][7:16]]
        assert await backend.get_ranges_and(keys[0], [(1, 3)], lambda bufs: bytes(bufs[0]) * 2) == blobs[keys[0]][1:4] * 2
        # the four read last are open (and the ones let go of wait for the next read's thread)
        assert all(backend.try_get_ranges(k, [(0, 1)]) is not None for k in [keys[0], *keys[-3:]])
        assert backend.try_get_ranges(keys[1], [(0, 1)]) is None
        await backend.get_ranges(keys[-1], [(0, 1)])
        assert len(open_here()) == 4

        # a deletion while the read is in its thread: the read's descriptor is not kept
        victim = keys[5]
        reading = trio.Event()

        async def read():
            reading.set()
            assert await backend.get_ranges(victim, [(0, 50)]) == [blobs[victim][:50]]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await reading.wait()
            backend.forget_fd(victim)  # what `delete` does on the loop before its thread
        assert backend.try_get_ranges(victim, [(0, 1)]) is None

        # a read cancelled before its hand-off gives back the descriptors it was to close
        await backend.get_ranges(keys[6], [(0, 1)])  # a fifth kept: the oldest is let go of
        assert len(open_here()) == 5
        with trio.CancelScope() as scope:
            scope.cancel()
            await backend.get_ranges(keys[7], [(0, 1)])
        assert scope.cancelled_caught and len(open_here()) == 5
        await backend.get_ranges(keys[8], [(0, 1)])  # its thread closes the one let go of
        assert len(open_here()) == 4
        await backend.close()
        assert open_here() == []

    trio.run(main)
