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
