"""Small writes into stored blocks, kept as patches (docs/ARCHITECTURE.md, "Small writes into
stored blocks"): the data path driven directly against a model of the file, then the mounted
filesystem on both backends, fsck, and kill -9."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import time

import pytest
import trio

from s3fuse import format as fmt
from s3fuse.crypto import SYSTEM
from s3fuse.data import flush, merger
from s3fuse.data.writeback import Runs
from s3fuse.errors import S3fuseError
from s3fuse.policy import DEFAULT

from .conftest import run_cli, wait_until, write_file
from .faultd import MERGE_IDLE_ENV
from .faulty import FAULT_ENV
from .test_datapath import BLOCK, _store

BACKENDS = ("local", "s3")
MiB = 1 << 20


def test_runs_match_a_byte_model():
    rnd = random.Random(5)
    for _ in range(200):
        size = rnd.choice([64, 300, 4096])
        model, written = bytearray(size), [False] * size
        runs = Runs()
        for _ in range(rnd.randint(1, 40)):
            off = rnd.randrange(size)
            chunk = rnd.randbytes(rnd.randint(1, min(50, size - off)))
            runs.write(off, chunk)
            model[off : off + len(chunk)] = chunk
            written[off : off + len(chunk)] = [True] * len(chunk)
            if rnd.random() < 0.1:
                cut = rnd.randrange(size)
                runs.truncate(cut)
                model[cut:] = bytes(size - cut)
                written[cut:] = [False] * (size - cut)
            pairs = runs.items()
            assert all(a + len(d) < b for (a, d), (b, _) in zip(pairs, pairs[1:]))  # disjoint, not touching
            assert runs.nbytes == sum(written)
            got = bytearray(size)
            runs.apply(got)
            assert got == model
            base = rnd.randrange(size)
            part = bytearray(rnd.randrange(size - base + 1))
            runs.apply(part, base)
            assert part == got[base : base + len(part)]


def test_a_patch_round_trips_and_malformed_ones_are_refused():
    runs = [(0, b"ab"), (10, b"xyz"), (BLOCK - 1, b"!")]
    plain = fmt.encode_patch(runs)
    assert [(o, bytes(d)) for o, d in fmt.decode_patch(plain, BLOCK)] == runs
    for bad in (plain[:-1], plain + b"x", fmt.encode_patch([(10, b"xyz"), (0, b"ab")]),
                fmt.encode_patch([(0, b"abc"), (2, b"x")]), fmt.encode_patch([(BLOCK - 1, b"ab")]), b"\0\0"):
        try:
            fmt.decode_patch(bad, BLOCK)
        except fmt.FormatError:
            continue
        raise AssertionError(f"accepted {bad!r}")


def _file_with_model(tmp_path, seed: int, size: int):
    """A store with room for many patches, a file in it, a seeded random source and `size`
    random bytes to write: -> (meta, data, ino, rnd, model)."""
    meta, data, ino = _store(tmp_path, dirty_limit=64 * BLOCK)
    rnd = random.Random(seed)
    return meta, data, ino, rnd, bytearray(rnd.randbytes(size))


async def _read_all(data, ino: int, size: int) -> bytes:
    return await data.read(ino, 0, size + 10)


def test_small_writes_into_stored_blocks_become_patches_and_read_back(tmp_path):
    """Random small writes over several flushes: patches, then merges once a block has enough;
    every read (buffered, after each flush, after a truncate into a patched block and an
    extension, after re-encryption) equals the model, and no block is loaded for a write."""
    meta, data, ino, rnd, model = _file_with_model(tmp_path, 7, 6 * BLOCK + 100)
    size = len(model)

    async def main():
        await data.write(ino, 0, bytes(model))
        await data.flush(ino, durable=True)
        for _round in range(2 * flush.MAX_PATCHES):
            for _ in range(rnd.randint(1, 12)):
                off = rnd.randrange(size)
                chunk = rnd.randbytes(rnd.choice([1, 100, 4096]))[: size - off]
                await data.write(ino, off, chunk)
                model[off : off + len(chunk)] = chunk
            assert await _read_all(data, ino, size) == model  # buffered runs over stored bytes
            await data.flush(ino, durable=False)
            assert await _read_all(data, ino, size) == model
            data.reads.cache.clear()
            data.codec.forget_all()
            assert await _read_all(data, ino, size) == model  # fetched, authenticated afresh
        assert data.stats["patches_put"] > 0
        assert data.stats["patch_merges"] > 0
        assert data.stats["read_fetches"] > 0
        # patched blocks have rows of their own, numbered above every data block
        rows = meta.db.execute("SELECT blockno FROM blocks WHERE inode=? AND blockno >= ?",
                               (ino, fmt.PATCH_BASE)).fetchall()
        assert rows and all(fmt.patched_block(r[0]) < 7 for r in rows)
        assert all(len(meta.patches_of(ino, b)) < flush.MAX_PATCHES for b in range(7))
        # a truncate into a patched block keeps what is before the cut; an extension reads zeros
        patched = next(b for b in range(6) if meta.patches_of(ino, b))
        cut = patched * BLOCK + BLOCK // 2
        await data.truncate(ino, cut)
        del model[cut:]
        assert await _read_all(data, ino, cut) == model
        await data.write(ino, cut + 1000, b"tail")
        model.extend(bytes(1000) + b"tail")
        await data.flush(ino, durable=False)
        assert await _read_all(data, ino, len(model)) == model
        assert not meta.patches_of(ino, patched)  # the extension rewrote the block whole
        # re-encryption writes whole blocks: the patches go
        await data.reencrypt(ino, DEFAULT, SYSTEM)
        assert not meta.db.execute("SELECT 1 FROM blocks WHERE inode=? AND blockno >= ?",
                                   (ino, fmt.PATCH_BASE)).fetchall()
        data.reads.cache.clear()
        assert await _read_all(data, ino, len(model)) == model
        assert meta.stored_bytes_of(ino) == len(model)

    trio.run(main)


def test_a_patch_whose_block_changed_before_its_commit_is_not_committed(tmp_path):
    """A patch applies to the object it was made for; the commit refuses it otherwise, and the
    data stays dirty and is stored again (as a merge) at the next flush."""
    meta, data, ino = _store(tmp_path)
    rnd = random.Random(3)
    model = bytearray(rnd.randbytes(BLOCK))

    async def main():
        await data.write(ino, 0, bytes(model))
        await data.flush(ino, durable=False)
        await data.write(ino, 100, b"x" * 10)
        model[100:110] = b"x" * 10
        real_commit = data.flushing.commit

        async def moved(*args, **kw):
            # as if the block had got another object after the patch was made for it
            for oid in data.flushing._bases:
                data.flushing._bases[oid] = os.urandom(16)
            return await real_commit(*args, **kw)

        data.flushing.commit = moved
        try:
            with pytest.raises(S3fuseError):
                await data.flush(ino, durable=False)
        finally:
            del data.flushing.commit
        assert not meta.patches_of(ino, 0)
        assert data.has_unstored(ino)
        data.wb.get(ino).retry_delay = 0.0
        await data.flush(ino, durable=False)
        data.reads.cache.clear()
        assert await _read_all(data, ino, BLOCK) == model

    trio.run(main)


def _hold_fetch(data) -> tuple[dict, trio.Event, trio.Event]:
    """Hold back the next fetch of the object named by `held["key"]` (set it later): `reached`
    is set when that fetch starts, and it goes on once `go` is set."""
    held = {"key": None}
    reached, go = trio.Event(), trio.Event()
    real_get_ranges = data.backend.get_ranges

    async def gated_get_ranges(key, ranges):
        if key == held["key"]:
            held["key"] = None
            reached.set()
            await go.wait()
        return await real_get_ranges(key, ranges)

    data.backend.get_ranges = gated_get_ranges
    return held, reached, go


@pytest.mark.parametrize("patched", [True, False])
def test_a_read_keeps_the_objects_it_looked_up_until_it_has_fetched_them(tmp_path, patched):
    """A read looks up a block's object and patches, then fetches them. If meanwhile the block
    is stored anew (a merge, or a whole rewrite) and the collector runs, the objects it looked
    up must still be there: the collector leaves them until the read is done."""
    meta, data, ino = _store(tmp_path)
    rnd = random.Random(19)
    model = bytearray(rnd.randbytes(BLOCK))
    held, reached, go = _hold_fetch(data)

    async def main():
        await data.write(ino, 0, bytes(model))
        await data.flush(ino, durable=True)
        if patched:
            await data.write(ino, 100, b"x" * 10)
            model[100:110] = b"x" * 10
            await data.flush(ino, durable=True)
        base = meta.block(ino, 0)
        patches = meta.patches_of(ino, 0)
        assert len(patches) == (1 if patched else 0)
        old = [base.object_id] + [p.object_id for p in patches]
        data.reads.cache.clear()
        data.codec.forget_all()  # the read fetches headers too: through `get_ranges`
        held["key"] = old[-1].hex()  # the first object the read fetches
        got = []

        async def reader():
            got.append(await data.read(ino, 0, BLOCK))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await reached.wait()  # the read has its rows and waits for its first fetch
            await data.write(ino, 0, rnd.randbytes(BLOCK))  # the block stored anew, whole
            await data.flush(ino, durable=True)
            assert meta.block(ino, 0).object_id not in old and not meta.patches_of(ino, 0)
            collected = await data.collect_garbage()
            go.set()
        assert got == [bytes(model)]  # the state the read looked up, not EIO
        assert collected == 0  # the read held them
        assert await data.collect_garbage() == len(old)
        for oid in old:
            assert await data.backend.head(oid.hex()) is None

    trio.run(main)


async def _patch_blocks(data, ino: int, model: bytearray, rnd: random.Random, rounds: int) -> None:
    """Small writes into the stored blocks of `ino`, flushed after each round: patches."""
    for _ in range(rounds):
        for _ in range(rnd.randint(1, 6)):
            off = rnd.randrange(len(model))
            chunk = rnd.randbytes(rnd.choice([1, 100, 4096]))[: len(model) - off]
            await data.write(ino, off, chunk)
            model[off : off + len(chunk)] = chunk
        await data.flush(ino, durable=False)


def test_the_background_merge_stores_patched_blocks_whole(tmp_path):
    """Once writes pause, every patched block is stored as one object again: no patch rows
    are left, the content is the same, the old objects are garbage, and the counters say so."""
    meta, data, ino, rnd, model = _file_with_model(tmp_path, 23, 5 * BLOCK + 100)
    size = len(model)

    async def main():
        await data.write(ino, 0, bytes(model))
        await data.flush(ino, durable=True)
        await _patch_blocks(data, ino, model, rnd, 6)
        patched = sum(bool(meta.patches_of(ino, b)) for b in range(6))
        patches = meta.db.execute("SELECT count(*) FROM blocks WHERE blockno >= ?", (fmt.PATCH_BASE,)).fetchone()[0]
        assert patched >= 2
        await data.collect_garbage()  # what the flushes replaced
        assert await data.merging.merge_while_idle() == 0  # just written: not idle
        data.merging.last_write = time.monotonic() - merger.MERGE_IDLE
        assert await data.merging.merge_while_idle() == patched
        assert meta.patched_blocks(100) == []
        assert data.stats["background_merges"] == patched
        assert data.stats["background_merged_patches"] == patches
        assert await data.collect_garbage() == patched + patches
        data.reads.cache.clear()
        data.codec.forget_all()
        assert await _read_all(data, ino, size) == model
        assert meta.stored_bytes_of(ino) == size
        # and small writes after it become patches of the merged objects again
        await _patch_blocks(data, ino, model, rnd, 2)
        data.reads.cache.clear()
        assert await _read_all(data, ino, size) == model

    trio.run(main)


def test_a_write_during_a_background_merge_is_kept(tmp_path):
    """A small write into the block being merged (its load held back) goes to the buffer as
    runs; the merge commits, the write is stored as a patch of the merged object, and the
    merge stops for the other blocks until writes pause again."""
    meta, data, ino, rnd, model = _file_with_model(tmp_path, 29, 3 * BLOCK)
    size = len(model)
    held, reached, go = _hold_fetch(data)

    async def main():
        await data.write(ino, 0, bytes(model))
        await data.flush(ino, durable=True)
        for b in range(3):
            await data.write(ino, b * BLOCK + 10, b"p" * 10)
            model[b * BLOCK + 10 : b * BLOCK + 20] = b"p" * 10
        await data.flush(ino, durable=False)
        assert [len(meta.patches_of(ino, b)) for b in range(3)] == [1, 1, 1]
        data.reads.cache.clear()
        data.codec.forget_all()
        held["key"] = meta.block(ino, 0).object_id.hex()  # the merge's load of block 0
        data.merging.last_write = time.monotonic() - merger.MERGE_IDLE
        merged = []

        async def merge():
            merged.append(await data.merging.merge_while_idle())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(merge)
            await reached.wait()
            await data.write(ino, 1000, b"w" * 50)  # into the block being merged
            model[1000:1050] = b"w" * 50
            go.set()
        assert merged == [1]  # block 0; the write stopped it before the others
        assert not meta.patches_of(ino, 0) and meta.patches_of(ino, 1)
        assert await _read_all(data, ino, size) == model  # the runs over the merged block
        await data.flush(ino, durable=False)
        assert len(meta.patches_of(ino, 0)) == 1  # the write, a patch of the merged object
        await data.collect_garbage()
        data.reads.cache.clear()
        assert await _read_all(data, ino, size) == model
        data.merging.last_write = time.monotonic() - merger.MERGE_IDLE
        assert await data.merging.merge_while_idle() == 3
        data.reads.cache.clear()
        assert await _read_all(data, ino, size) == model

    trio.run(main)


def _random_writes(path, size: int, model: bytearray, rnd: random.Random, count: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(count):
            off = rnd.randrange(size // 4096) * 4096 + rnd.choice([0, 0, 7])
            chunk = rnd.randbytes(min(rnd.choice([4096, 4096, 300]), size - off))
            os.pwrite(fd, chunk, off)
            model[off : off + len(chunk)] = chunk
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_caches() -> None:
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)


def _patch_rows(store_meta) -> int:
    db = sqlite3.connect(store_meta)
    try:
        return db.execute("SELECT count(*) FROM blocks WHERE blockno >= ?", (fmt.PATCH_BASE,)).fetchone()[0]
    finally:
        db.close()


def test_random_small_writes_on_the_mount_read_back_and_pass_fsck(mount_factory, monkeypatch):
    monkeypatch.setenv(MERGE_IDLE_ENV, "inf")  # the patches stay, for the reads and fsck below
    mounted = mount_factory()
    m = mounted.mnt
    rnd = random.Random(11)
    size = 3 * 4 * MiB + 5000
    model = bytearray(rnd.randbytes(size))
    write_file(m / "f", bytes(model), fsync=True)
    for _ in range(3):
        _random_writes(m / "f", size, model, rnd, 300)
        _drop_caches()
        assert (m / "f").read_bytes() == model
    # random reads hand what they fetched around them to the kernel's page cache: the
    # patches applied (a later read of those pages never reaches the daemon)
    _drop_caches()
    fd = os.open(m / "f", os.O_RDONLY)
    try:
        for _ in range(200):
            off = rnd.randrange(size // 4096) * 4096
            assert os.pread(fd, 4096, off) == model[off : off + 4096]
        assert os.pread(fd, size, 0) == model
    finally:
        os.close(fd)
    status = run_cli("status", "--json", m)
    assert '"patches_put": 0' not in status.stdout, status.stdout
    mounted.unmount()
    assert _patch_rows(mounted.store / "meta.db") > 0
    r = run_cli("fsck", mounted.store)
    assert r.returncode == 0, r.stdout + r.stderr
    mounted.start()
    assert (m / "f").read_bytes() == model


def test_patches_survive_kill9_after_fsync(mounted):
    """What fsync covered is there after kill -9: the patches' objects were synced before
    their rows committed; writes after the fsync may be lost, never half applied to a block."""
    m = mounted.mnt
    rnd = random.Random(13)
    size = 2 * 4 * MiB
    model = bytearray(rnd.randbytes(size))
    write_file(m / "f", bytes(model), fsync=True)
    _random_writes(m / "f", size, model, rnd, 200)
    synced = bytes(model)
    # unsynced writes, one per 4 KiB page, each of a single repeated byte
    fd = os.open(m / "f", os.O_RDWR)
    try:
        pages = rnd.sample(range(size // 4096), 50)
        for p in pages:
            os.pwrite(fd, bytes([p % 251 + 1]) * 4096, p * 4096)
    finally:
        os.close(fd)
    mounted.kill9()
    mounted.start()
    got = (m / "f").read_bytes()
    assert len(got) == size
    for p in range(size // 4096):
        page = got[p * 4096 : (p + 1) * 4096]
        if p in pages and page != synced[p * 4096 : (p + 1) * 4096]:
            assert page == bytes([p % 251 + 1]) * 4096  # the write whole, or not at all
        else:
            assert page == synced[p * 4096 : (p + 1) * 4096]
    mounted.unmount()
    r = run_cli("fsck", mounted.store)
    assert r.returncode == 0 and " 0 damage" in r.stdout, r.stdout + r.stderr


@pytest.mark.local_only
def test_fsck_checks_patches_and_repairs_those_of_a_missing_block(mount_factory, monkeypatch):
    """fsck authenticates patch objects like block objects (a flipped bit is damage), and
    patch rows whose block has no row are `stray-patch`, dropped by --repair."""
    from .conftest import object_path
    from .test_fsck import EXIT_DAMAGED, check_damaged_then_repair, db, fsck, inode_of, kinds

    monkeypatch.setenv(MERGE_IDLE_ENV, "inf")
    m = mount_factory()
    rnd = random.Random(17)
    size = 2 * 4 * MiB
    model = bytearray(rnd.randbytes(size))
    write_file(m.mnt / "f", bytes(model), fsync=True)
    _random_writes(m.mnt / "f", size, model, rnd, 40)
    m.unmount()
    code, report = fsck(m.store)
    assert code == 0, report
    ino = inode_of(m.store, "f")
    con = db(m.store)
    patches = con.execute("SELECT blockno, object_id FROM blocks WHERE inode=? AND blockno >= ? ORDER BY blockno",
                          (ino, fmt.PATCH_BASE)).fetchall()
    con.close()
    assert patches
    # a flipped bit in a patch object
    path = object_path(m.store, patches[0][1].hex())
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 1
    path.write_bytes(bytes(raw))
    code, report = fsck(m.store)
    assert code == EXIT_DAMAGED and "corrupt-object" in kinds(report), report
    raw[-5] ^= 1
    path.write_bytes(bytes(raw))
    # the block a patch applies to loses its row
    block = fmt.patched_block(patches[0][0])
    con = db(m.store)
    con.execute("DELETE FROM blocks WHERE inode=? AND blockno=?", (ino, block))
    con.close()
    fixed = check_damaged_then_repair(m.store, {"stray-patch"})
    assert "corrupt-object" not in kinds(fixed)
    con = db(m.store)
    left = con.execute("SELECT count(*) FROM blocks WHERE inode=? AND blockno BETWEEN ? AND ?",
                       (ino, fmt.patch_number(block, 0), fmt.patch_number(block, fmt.PATCH_SEQS - 1))).fetchone()[0]
    con.close()
    assert left == 0
    m.start()
    expect = bytearray(model)
    expect[block * 4 * MiB : (block + 1) * 4 * MiB] = bytes(4 * MiB)  # its row is gone: a hole
    assert (m.mnt / "f").read_bytes() == expect


def _status(m) -> dict:
    r = run_cli("status", "--json", m)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _counter(status: dict, name: str) -> int:
    """A data-path counter of `s3fuse status --json`, wherever the report nests it."""
    if name in status:
        return status[name]
    for value in status.values():
        if isinstance(value, dict):
            found = _counter(value, name)
            if found is not None:
                return found
    return None


def test_patched_blocks_are_merged_in_the_background_once_writes_pause(mounted):
    m = mounted.mnt
    rnd = random.Random(31)
    size = 3 * 4 * MiB + 5000
    model = bytearray(rnd.randbytes(size))
    write_file(m / "f", bytes(model), fsync=True)
    _random_writes(m / "f", size, model, rnd, 300)
    wait_until(lambda: _patch_rows(mounted.store / "meta.db") == 0, 60, "the patched blocks to be merged",
               interval=0.2)
    status = _status(m)
    assert _counter(status, "background_merges") >= 1, status
    assert _counter(status, "background_merged_patches") >= _counter(status, "background_merges"), status
    _drop_caches()
    assert (m / "f").read_bytes() == model
    mounted.unmount()
    r = run_cli("fsck", mounted.store)
    assert r.returncode == 0 and " 0 damage" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("stage", ["put", "sync"])
def test_kill9_during_a_background_merge_loses_nothing(mount_factory, tmp_path, monkeypatch, stage):
    """The daemon is killed while a merge's object is being put, or synced before its commit:
    the block reads as it was (its object and patches), fsck finds no damage, and the next
    mount merges it."""
    plan = tmp_path / "plan.json"
    plan.write_text("")
    monkeypatch.setenv(FAULT_ENV, str(plan))
    mounted = mount_factory()
    m = mounted.mnt
    rnd = random.Random(37)
    size = 2 * 4 * MiB
    model = bytearray(rnd.randbytes(size))
    write_file(m / "f", bytes(model), fsync=True)
    _random_writes(m / "f", size, model, rnd, 100)  # fsynced: only the merge puts from here on
    assert _patch_rows(mounted.store / "meta.db") > 0
    # a merge's object is a whole block; patches are at most half a block
    rule = {"op": "put", "min_size": 3 * MiB, "hang": True} if stage == "put" else {"op": "sync", "hang": True}
    tmp = plan.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rules": [rule]}))
    os.replace(tmp, plan)
    hits = plan.with_name(plan.name + ".hits")
    wait_until(lambda: hits.exists() and f"{stage} " in hits.read_text(), 60, f"a merge's {stage} to hang",
               interval=0.1)
    mounted.kill9()
    plan.write_text("")
    assert _patch_rows(mounted.store / "meta.db") > 0  # nothing of the merge committed
    mounted.start()
    assert (m / "f").read_bytes() == model
    wait_until(lambda: _patch_rows(mounted.store / "meta.db") == 0, 60, "the patched blocks to be merged",
               interval=0.2)
    _drop_caches()
    assert (m / "f").read_bytes() == model
    mounted.unmount()
    r = run_cli("fsck", mounted.store)
    assert r.returncode == 0 and " 0 damage" in r.stdout, r.stdout + r.stderr
