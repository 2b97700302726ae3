"""s3fuse/data.py driven directly, without a mount: interleavings of the flusher, truncate and
the collector that a mounted test can only hit by chance. Real SQLite, real objects on disk,
real crypto."""

from __future__ import annotations

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


def _store(tmp_path) -> tuple[Meta, DataStore, int]:
    objects = tmp_path / "objects"
    LocalBackend.create(str(objects))
    meta = Meta.create(str(tmp_path / "meta.db"), 0, 0, time.time_ns())
    store_id = os.urandom(16)
    data = DataStore(meta, LocalBackend(str(objects)), KeyManager(store_id, Keyring.new()), store_id,
                     BLOCK, SEGMENT)
    with meta.transaction():
        row = meta.create_inode(stat.S_IFREG | 0o644, 0, 0, 1, time.time_ns())
        meta.add_entry(ROOT_INODE, b"f", row.id)
    return meta, data, row.id


def test_a_deferred_block_superseded_by_a_flush_is_not_committed_later(tmp_path):
    """A streaming writer's full block is stored and its commit deferred; the block is written
    again and a truncate flushes it, so the deferred object becomes garbage and is deleted. A
    later commit must not point the block map back at that deleted object."""

    async def main():
        meta, data, ino = _store(tmp_path)
        data.opened(ino, writer=SYSTEM)
        first, second = os.urandom(BLOCK), os.urandom(4096)
        await data.write(ino, 0, first)  # a whole block: sealed, as a sequential writer leaves it
        fs = data.files[ino]
        async with data._flush_lock:  # what the flusher does with sealed blocks
            await data._flush_locked([fs], durable=False, only_full=True)
        assert ino in data.pending and meta.block(ino, 0) is None  # stored, commit deferred
        deferred = data.pending[ino][0].object_id

        await data.write(ino, 0, second)
        await data.truncate(ino, BLOCK)  # flushes block 0 again: the deferred object is garbage
        assert ino not in data.pending
        assert await data.collect_garbage() >= 1
        assert await data.backend.head(deferred.hex()) is None

        await data.write(ino, BLOCK, b"tail")
        await data.flush(ino, durable=True)  # commits everything still pending
        assert meta.block(ino, 0).object_id != deferred
        data.cache.__init__(data.cache.limit)  # read from the objects, not from memory
        data._objects.clear()
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


def test_a_writer_waiting_for_buffer_space_shrinks_the_segment_cache(tmp_path):
    """When writes outrun the store, the decrypted segments kept for readers give way (down
    to a quarter of their limit), so that both are not at their limits at once; the data
    written is all stored and reads back."""

    async def main():
        meta, data, ino = _store(tmp_path)
        data.dirty_limit = 2 * BLOCK
        data.cache.limit = 8 * SEGMENT
        for i in range(8):
            data.cache.put(((b"o" * 16, 99, i), 0), os.urandom(SEGMENT))
        assert data.cache.used == 8 * SEGMENT
        data.opened(ino, writer=SYSTEM)
        payload = os.urandom(6 * BLOCK)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(data.flusher)
            for off in range(0, len(payload), BLOCK // 2):
                await data.write(ino, off, payload[off:off + BLOCK // 2])
            await data.flush(ino, durable=True)
            nursery.cancel_scope.cancel()
        assert data.cache.used <= data.cache.limit // 4
        assert await data.read(ino, 0, len(payload)) == payload

    trio.run(main)
