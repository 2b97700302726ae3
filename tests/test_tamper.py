"""Tampering with the object store: a flipped byte, a truncated object, two
objects swapped, an object deleted, or an older generation restored must give
EIO for the affected block's range (never wrong bytes), leave every other block
and file readable, and log a line naming the object id."""

from __future__ import annotations

import errno
import os
import random
import shutil

import pytest

from .conftest import list_objects, object_path

MiB = 1 << 20
BLOCK = 4 * MiB
CHUNK = 64 * 1024


def _pwrite_all(path, data: bytes, off: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, off)
            view, off = view[n:], off + n
    finally:
        os.close(fd)


class Prepared:
    """A store holding files A and B (9 MiB: 3 blocks each) and C (one block,
    rewritten once), with the object id of every block."""

    def __init__(self):
        self.store = None
        self.data: dict[str, bytes] = {}
        self.oids: dict[str, list[str]] = {}
        self.c_old_bytes = b""
        self.c_old_oid = ""


@pytest.fixture(scope="module")
def prepared(module_mount_factory) -> Prepared:
    rnd = random.Random(31)
    m = module_mount_factory(start=False)
    prep = Prepared()
    prep.store = m.store
    m.start()
    m.unmount()
    known = list_objects(m.store)
    for name in ("A", "B"):
        content = rnd.randbytes(9 * MiB)
        prep.data[name] = content
        prep.oids[name] = []
        for b in range(3):
            # one block per mount session, so each new object is that block's
            m.start()
            _pwrite_all(m.mnt / name, content[b * BLOCK:(b + 1) * BLOCK], b * BLOCK)
            m.unmount()
            now = list_objects(m.store)
            assert known <= now, f"writing block {b} of {name} deleted objects {known - now}"
            new = now - known
            assert len(new) == 1, f"block {b} of {name} should add one object, added {len(new)}"
            prep.oids[name].append(new.pop())
            known = now
    # C: one block, then rewritten in place (a new generation with a new object id)
    c = rnd.randbytes(BLOCK)
    m.start()
    _pwrite_all(m.mnt / "C", c, 0)
    m.unmount()
    now = list_objects(m.store)
    new = now - known
    assert len(new) == 1
    prep.c_old_oid = new.pop()
    prep.c_old_bytes = object_path(m.store, prep.c_old_oid).read_bytes()
    known = now
    m.start()
    patch = rnd.randbytes(100)
    # the whole block written again: a small write alone would be stored as a patch of the
    # old object (docs/FORMAT.md, "Patches"), which stays
    _pwrite_all(m.mnt / "C", c[:MiB] + patch + c[MiB + 100:], 0)
    m.unmount()
    now = list_objects(m.store)
    assert prep.c_old_oid not in now, "the rewritten block's old object was not deleted"
    new = now - known
    assert len(new) == 1, f"rewriting C's block should add one object, added {len(new)}"
    prep.oids["C"] = [new.pop()]
    prep.data["C"] = c[:MiB] + patch + c[MiB + 100:]
    return prep


@pytest.fixture
def store_copy(prepared, workdir):
    dst = workdir("tampered") / "store"
    shutil.copytree(prepared.store, dst, symlinks=True)
    return dst


def read_range(path, start: int, end: int):
    """[(offset, bytes or errno)] for CHUNK-sized preads over [start, end)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in range(start, end, CHUNK):
            n = min(CHUNK, end - off)
            try:
                out.append((off, os.pread(fd, n, off)))
            except OSError as e:
                out.append((off, e.errno))
    finally:
        os.close(fd)
    return out


def assert_block_ok(path, data: bytes, b: int) -> None:
    start, end = b * BLOCK, min((b + 1) * BLOCK, len(data))
    for off, got in read_range(path, start, end):
        assert not isinstance(got, int), (
            f"{path.name} block {b}: pread at {off} failed with "
            f"{errno.errorcode.get(got, got)}, but that block was not tampered with")
        assert got == data[off:off + len(got)] and len(got) == min(CHUNK, end - off), (
            f"{path.name} block {b}: wrong bytes at {off}")


def assert_block_eio(path, data: bytes, b: int) -> None:
    start, end = b * BLOCK, min((b + 1) * BLOCK, len(data))
    n_eio = 0
    for off, got in read_range(path, start, end):
        if isinstance(got, int):
            assert got == errno.EIO, (
                f"{path.name} block {b}: pread at {off} gave {errno.errorcode.get(got, got)}, "
                f"expected EIO")
            n_eio += 1
        else:
            assert got == data[off:off + len(got)], (
                f"{path.name} block {b}: tampered block returned WRONG BYTES at {off} "
                f"({len(got)} bytes) instead of EIO")
    assert n_eio > 0, f"{path.name} block {b}: tampered block read without any error"


def check_files(m, prepared, bad: dict[str, set[int]]) -> None:
    """Tampered blocks give EIO; all other blocks of all files read correctly."""
    for name, data in prepared.data.items():
        nblocks = (len(data) + BLOCK - 1) // BLOCK
        assert os.stat(m.mnt / name).st_size == len(data)
        for b in range(nblocks):  # good blocks first
            if b not in bad.get(name, set()):
                assert_block_ok(m.mnt / name, data, b)
    for name, blocks in bad.items():
        for b in sorted(blocks):
            assert_block_eio(m.mnt / name, prepared.data[name], b)
    # the filesystem keeps working: a new file can be written and read back
    (m.mnt / "after-tamper").write_bytes(b"still works" * 1000)
    assert (m.mnt / "after-tamper").read_bytes() == b"still works" * 1000
    assert m.proc.poll() is None, "the daemon died"


def assert_logged(m, oids) -> None:
    log = m.log_text()
    for oid in oids:
        assert oid in log, f"the daemon log names no object {oid}:\n{log[-3000:]}"


def test_untampered_copy_reads(prepared, store_copy, mount_factory):
    m = mount_factory(store=store_copy)
    check_files(m, prepared, {})
    assert sorted(os.listdir(m.mnt)) == ["A", "B", "C", "after-tamper"]


def test_flipped_byte(prepared, store_copy, mount_factory):
    oid = prepared.oids["A"][1]
    p = object_path(store_copy, oid)
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    p.write_bytes(bytes(raw))
    m = mount_factory(store=store_copy)
    check_files(m, prepared, {"A": {1}})
    m.unmount()
    assert_logged(m, [oid])


def test_flipped_byte_in_each_segment_position(prepared, store_copy, mount_factory):
    """Flip a byte near the start (header) of B's first object and near the end
    (last tag) of B's last object."""
    first, last = prepared.oids["B"][0], prepared.oids["B"][2]
    for oid, pos in ((first, 5), (last, -3)):
        p = object_path(store_copy, oid)
        raw = bytearray(p.read_bytes())
        raw[pos] ^= 0x80
        p.write_bytes(bytes(raw))
    m = mount_factory(store=store_copy)
    check_files(m, prepared, {"B": {0, 2}})
    m.unmount()
    assert_logged(m, [first, last])


@pytest.mark.parametrize("how", ["empty", "half", "minus-one"])
def test_truncated_object(prepared, store_copy, mount_factory, how):
    oid = prepared.oids["B"][0]
    p = object_path(store_copy, oid)
    size = p.stat().st_size
    new_size = {"empty": 0, "half": size // 2, "minus-one": size - 1}[how]
    os.truncate(p, new_size)
    m = mount_factory(store=store_copy)
    check_files(m, prepared, {"B": {0}})
    m.unmount()
    assert_logged(m, [oid])


def test_objects_swapped_between_files(prepared, store_copy, mount_factory):
    a, b = prepared.oids["A"][1], prepared.oids["B"][1]
    pa, pb = object_path(store_copy, a), object_path(store_copy, b)
    ra, rb = pa.read_bytes(), pb.read_bytes()
    pa.write_bytes(rb)
    pb.write_bytes(ra)
    m = mount_factory(store=store_copy)
    check_files(m, prepared, {"A": {1}, "B": {1}})
    m.unmount()
    assert_logged(m, [a, b])


def test_objects_swapped_within_file(prepared, store_copy, mount_factory):
    a0, a1 = prepared.oids["A"][0], prepared.oids["A"][1]
    p0, p1 = object_path(store_copy, a0), object_path(store_copy, a1)
    r0, r1 = p0.read_bytes(), p1.read_bytes()
    p0.write_bytes(r1)
    p1.write_bytes(r0)
    m = mount_factory(store=store_copy)
    check_files(m, prepared, {"A": {0, 1}})
    m.unmount()
    assert_logged(m, [a0, a1])


def test_older_generation_restored(prepared, store_copy, mount_factory):
    new_oid = prepared.oids["C"][0]
    p = object_path(store_copy, new_oid)
    assert p.read_bytes() != prepared.c_old_bytes
    p.write_bytes(prepared.c_old_bytes)
    m = mount_factory(store=store_copy)
    check_files(m, prepared, {"C": {0}})
    m.unmount()
    assert_logged(m, [new_oid])


def test_object_deleted(prepared, store_copy, mount_factory):
    oid = prepared.oids["A"][2]
    os.unlink(object_path(store_copy, oid))
    m = mount_factory(store=store_copy)
    check_files(m, prepared, {"A": {2}})
    m.unmount()
    assert_logged(m, [oid])


def test_tampered_block_stays_eio_after_rewrite_elsewhere(prepared, store_copy, mount_factory):
    """Writing to a good block of a file with a bad block works, and the bad block
    stays EIO (no wrong bytes) across a remount."""
    oid = prepared.oids["B"][1]
    p = object_path(store_copy, oid)
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    p.write_bytes(bytes(raw))
    m = mount_factory(store=store_copy)
    fd = os.open(m.mnt / "B", os.O_WRONLY)
    try:
        os.pwrite(fd, b"new data", 100)
    finally:
        os.close(fd)
    data = bytearray(prepared.data["B"])
    data[100:108] = b"new data"
    m.remount()
    assert_block_ok(m.mnt / "B", bytes(data), 0)
    assert_block_ok(m.mnt / "B", bytes(data), 2)
    assert_block_eio(m.mnt / "B", bytes(data), 1)
    m.unmount()
    assert_logged(m, [oid])


def test_a_damaged_segment_costs_its_neighbours_nothing(prepared, store_copy, mount_factory):
    """A random read fetches the 256 KiB around it for the page cache; a damaged segment
    there must fail only its own range, not the intact segment the read asked for."""
    from s3fuse import format as fmt

    oid = prepared.oids["A"][1]
    p = object_path(store_copy, oid)
    raw = bytearray(p.read_bytes())
    start = fmt.header_length(bytes(raw)) + 1 * (CHUNK + fmt.SEGMENT_OVERHEAD)  # segment 1
    raw[start + 100] ^= 0x01
    p.write_bytes(bytes(raw))
    m = mount_factory(store=store_copy)
    data, base = prepared.data["A"], BLOCK
    fd = os.open(m.mnt / "A", os.O_RDONLY)
    try:
        for seg in (2, 0, 3):  # random reads: each first one in its 256 KiB fetches all four
            off = base + seg * CHUNK + 4096
            assert os.pread(fd, 4096, off) == data[off:off + 4096], f"segment {seg}"
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, base + CHUNK + 4096)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    m.unmount()
    assert_logged(m, [oid])
