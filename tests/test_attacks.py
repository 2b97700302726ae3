"""The attack suite: an attacker who controls the object store (and, in some tests, the
metadata database) edits what s3fuse stored; an attacker who can reach the interfaces sends
malformed requests. Every test asserts that no unauthenticated byte reaches a reader: a read
of an attacked block returns the right bytes or EIO, never other bytes; every other block and
file still reads correctly; the daemon logs a line naming the object and keeps serving.

Complements tests/test_tamper.py (flipped byte, truncation, objects swapped or deleted, an
older generation restored) and the control-socket fuzz in tests/test_sse.py.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import socket
import sqlite3
import struct
from pathlib import Path

import msgpack
import pytest

from s3fuse import format as fmt
from s3fuse.control import protocol

from .conftest import object_path, resign_metadata, run_cli, wait_until

KiB = 1024
BS = 256 * KiB  # block size of the prepared store
SEG = 64 * KiB  # segment size: 4 segments per block
STRIDE = SEG + fmt.SEGMENT_OVERHEAD
CHUNK = 16 * KiB


class Prepared:
    store: Path
    data: dict[str, bytes]
    c_old: bytes  # the object of C's block 0 before C was rewritten


def _db(store: Path) -> sqlite3.Connection:
    return sqlite3.connect(store / "meta.db", isolation_level=None)


def _ino(store: Path, name: str) -> int:
    con = _db(store)
    (ino,) = con.execute("SELECT inode FROM dentries WHERE parent=1 AND name=?", (name.encode(),)).fetchone()
    con.close()
    return ino


def _row(store: Path, name: str, blockno: int) -> dict:
    con = _db(store)
    con.row_factory = sqlite3.Row
    row = dict(con.execute("SELECT * FROM blocks WHERE inode=? AND blockno=?", (_ino(store, name), blockno)).fetchone())
    con.close()
    return row


def _oid(store: Path, name: str, blockno: int) -> str:
    return _row(store, name, blockno)["object_id"].hex()


@pytest.fixture(scope="module")
def prepared(module_mount_factory, _dirs) -> Prepared:
    store = _dirs("attack-store") / "store"
    r = run_cli("init", store, "--block-size-kib", BS // KiB, "--segment-size-kib", SEG // KiB)
    assert r.returncode == 0, r.stderr
    rnd = random.Random(77)
    prep = Prepared()
    prep.store = store
    prep.data = {"A": rnd.randbytes(3 * BS), "B": rnd.randbytes(3 * BS), "C": rnd.randbytes(BS - 100)}
    m = module_mount_factory(store=store)
    for name, data in prep.data.items():
        (m.mnt / name).write_bytes(data)
    m.unmount()
    prep.c_old = object_path(store, _oid(store, "C", 0)).read_bytes()
    m.start()
    with open(m.mnt / "C", "r+b") as f:
        f.seek(1000)
        f.write(b"second generation")
    m.unmount()
    c = bytearray(prep.data["C"])
    c[1000:1017] = b"second generation"
    prep.data["C"] = bytes(c)
    return prep


@pytest.fixture
def store(prepared, workdir) -> Path:
    dst = workdir("attacked") / "store"
    shutil.copytree(prepared.store, dst, symlinks=True)
    return dst


def _reads(path: Path, start: int, end: int) -> list[tuple[int, bytes | int]]:
    """CHUNK-sized preads over [start, end), each the bytes or the errno."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in range(start, end, CHUNK):
            try:
                out.append((off, os.pread(fd, min(CHUNK, end - off), off)))
            except OSError as e:
                out.append((off, e.errno))
    finally:
        os.close(fd)
    return out


def check(m, prepared: Prepared, bad: dict[str, set[int]], oids: list[str]) -> None:
    """Blocks in `bad` give EIO (and never wrong bytes); everything else reads correctly;
    the log names each attacked object; the daemon still serves."""
    for name, data in prepared.data.items():
        for b in range(-(-len(data) // BS)):
            start, end = b * BS, min((b + 1) * BS, len(data))
            if b in bad.get(name, ()):
                continue
            for off, got in _reads(m.mnt / name, start, end):
                assert not isinstance(got, int), f"{name}@{off}: {errno.errorcode[got]} in an untouched block"
                assert got == data[off:off + len(got)] and got, f"{name}@{off}: wrong bytes in an untouched block"
    for name, blocks in bad.items():
        data = prepared.data[name]
        for b in blocks:
            start, end = b * BS, min((b + 1) * BS, len(data))
            results = _reads(m.mnt / name, start, end)
            for off, got in results:
                if isinstance(got, int):
                    assert got == errno.EIO, f"{name}@{off}: {errno.errorcode[got]}, expected EIO"
                else:
                    assert got == data[off:off + len(got)], f"{name}@{off}: UNAUTHENTICATED BYTES reached the reader"
            assert any(isinstance(g, int) for _, g in results), f"{name} block {b}: the attack went unnoticed"
    (m.mnt / "after").write_bytes(b"still serving")
    assert (m.mnt / "after").read_bytes() == b"still serving"
    assert m.proc.poll() is None
    m.unmount()
    lines = [ln for ln in m.log_text().splitlines() if "integrity error" in ln]
    for oid in oids:
        assert any(oid in ln for ln in lines), f"no log line names object {oid}:\n" + "\n".join(lines[-10:])
    assert all("object " in ln and "(inode " in ln for ln in lines), lines


def _edit(store: Path, name: str, blockno: int, fn) -> str:
    """Apply fn(bytearray, row) -> bytes to the object of a block; returns its id."""
    row = _row(store, name, blockno)
    oid = row["object_id"].hex()
    p = object_path(store, oid)
    p.write_bytes(fn(bytearray(p.read_bytes()), row))
    return oid


def _flip(pos_fn):
    def fn(raw: bytearray, row: dict) -> bytes:
        raw[pos_fn(row)] ^= 0x10
        return bytes(raw)
    return fn


# -------------------------------------------------------------------- bit flips


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag", "header-inode", "header-length", "header-mac"])
def test_flipped_bit(prepared, store, mount_factory, where):
    def header_field(row, key: bytes) -> int:
        # the byte right after the msgpack key string is the field's value
        raw = object_path(store, row["object_id"].hex()).read_bytes()
        return raw.index(key, 7) + len(key)

    positions = {
        "nonce": lambda row: row["hdr_len"] + 2 * STRIDE + 3,  # segment 2's nonce
        "ciphertext": lambda row: row["hdr_len"] + STRIDE + 12 + 5000,
        "tag": lambda row: row["hdr_len"] + 2 * STRIDE - 1,  # last byte of segment 1's tag
        "header-inode": lambda row: header_field(row, b"\xa3ino"),
        "header-length": lambda row: header_field(row, b"\xa3len") + 1,
        "header-mac": lambda row: row["hdr_len"] - 1,
    }
    oid = _edit(store, "A", 1, _flip(positions[where]))
    check(mount_factory(store=store), prepared, {"A": {1}}, [oid])


# -------------------------------------------------------------------- segments


def _segments(raw: bytes, row: dict) -> tuple[bytes, list[bytes]]:
    h = row["hdr_len"]
    body = raw[h:]
    return raw[:h], [body[i:i + STRIDE] for i in range(0, len(body), STRIDE)]


def test_segments_reordered(prepared, store, mount_factory):
    def swap(raw, row):
        head, segs = _segments(bytes(raw), row)
        segs[1], segs[2] = segs[2], segs[1]
        return head + b"".join(segs)
    oid = _edit(store, "A", 0, swap)
    check(mount_factory(store=store), prepared, {"A": {0}}, [oid])


def test_segment_from_another_object(prepared, store, mount_factory):
    donor = object_path(store, _oid(store, "B", 1)).read_bytes()
    donor_row = _row(store, "B", 1)

    def transplant(raw, row):
        head, segs = _segments(bytes(raw), row)
        segs[1] = _segments(donor, donor_row)[1][1]  # same index, other object
        return head + b"".join(segs)
    oid = _edit(store, "A", 2, transplant)
    check(mount_factory(store=store), prepared, {"A": {2}}, [oid])


def test_whole_object_body_from_another_object(prepared, store, mount_factory):
    """The header stays, every segment comes from another file's object."""
    donor = object_path(store, _oid(store, "B", 0)).read_bytes()
    donor_row = _row(store, "B", 0)
    oid = _edit(store, "A", 0, lambda raw, row: bytes(raw[:row["hdr_len"]]) + donor[donor_row["hdr_len"]:])
    check(mount_factory(store=store), prepared, {"A": {0}}, [oid])


@pytest.mark.parametrize("cut", ["at-boundary", "inside-segment", "final-segment-removed"])
def test_truncation(prepared, store, mount_factory, cut):
    def truncate(raw, row):
        h = row["hdr_len"]
        end = {"at-boundary": h + 2 * STRIDE, "inside-segment": h + 2 * STRIDE + 777,
               "final-segment-removed": h + 3 * STRIDE}[cut]
        return bytes(raw[:end])
    oid = _edit(store, "B", 1, truncate)
    check(mount_factory(store=store), prepared, {"B": {1}}, [oid])


def test_appended_segment_is_never_read(prepared, store, mount_factory):
    """A segment appended after the final one: reads never fetch it (each segment's place
    and final flag come from the authenticated header), so every byte is still right; fsck
    reports the object's wrong size."""
    oid = _edit(store, "B", 2, lambda raw, row: bytes(raw) + bytes(raw[-STRIDE:]))
    m = mount_factory(store=store)
    assert (m.mnt / "B").read_bytes() == prepared.data["B"]
    m.unmount()
    r = run_cli("fsck", store)
    assert r.returncode == 4 and "corrupt-object" in r.stdout and oid in r.stdout, r.stdout


def test_segment_duplicated_in_place_of_the_final_one(prepared, store, mount_factory):
    def dup(raw, row):
        head, segs = _segments(bytes(raw), row)
        segs[3] = segs[2]  # the right length, the wrong index and final flag
        return head + b"".join(segs)
    oid = _edit(store, "A", 1, dup)
    check(mount_factory(store=store), prepared, {"A": {1}}, [oid])


# -------------------------------------------------------------------- whole objects


def test_rolled_back_to_an_older_generation(prepared, store, mount_factory):
    oid = _oid(store, "C", 0)
    object_path(store, oid).write_bytes(prepared.c_old)
    check(mount_factory(store=store), prepared, {"C": {0}}, [oid])


def test_foreign_object_injected(prepared, store, mount_factory):
    """An object well formed in every way (right id, store, inode, block, lengths) but sealed
    with the attacker's own data key, put in place of a real one; and a stray extra object."""
    row = _row(store, "B", 0)
    oid = row["object_id"]
    sid = bytes.fromhex(__import__("json").loads((store / "store.json").read_text())["store_id"])
    header = fmt.ObjectHeader(oid, sid, row["inode"], 0, row["mode"], row["key_ref"], SEG, row["obj_length"])
    forged = fmt.encrypt_object(header, os.urandom(32), b"A" * row["obj_length"])
    assert len(forged) == len(object_path(store, oid.hex()).read_bytes())
    object_path(store, oid.hex()).write_bytes(forged)
    extra = os.urandom(16).hex()
    (store / "objects" / extra[:2] / extra).write_bytes(forged)
    check(mount_factory(store=store), prepared, {"B": {0}}, [oid.hex()])
    r = run_cli("fsck", store)
    assert "unreferenced-object" in r.stdout and extra in r.stdout


def test_wrapped_key_copied_from_another_object(prepared, store, mount_factory):
    """blocks.key_slot of A's block 1 replaced by B's block 1 slot (same master key)."""
    slot = _row(store, "B", 1)["key_slot"]
    con = _db(store)
    con.execute("UPDATE blocks SET key_slot=? WHERE inode=? AND blockno=1", (slot, _ino(store, "A")))
    con.close()
    # signed again: the row's MAC would catch the edit first (tests/test_meta_tamper.py); this
    # shows that the key slot's own binding holds even for a row that authenticates
    resign_metadata(store)
    check(mount_factory(store=store), prepared, {"A": {1}}, [_oid(store, "A", 1)])


@pytest.mark.parametrize("what", ["object-id", "whole-row"])
def test_database_points_a_file_at_another_files_object(prepared, store, mount_factory, what):
    """A's block 2 row edited to name B's block 2 object (alone, or with B's key slot and
    lengths too): the key slot and header are bound to (object, inode, block), so it does not
    open, and B still reads."""
    b = _row(store, "B", 2)
    con = _db(store)
    con.execute("DROP INDEX blocks_by_object")  # the attacker edits the database at will
    if what == "object-id":
        con.execute("UPDATE blocks SET object_id=? WHERE inode=? AND blockno=2", (b["object_id"], _ino(store, "A")))
    else:
        con.execute("UPDATE blocks SET object_id=?, key_slot=?, length=?, obj_length=?, hdr_len=?"
                    " WHERE inode=? AND blockno=2",
                    (b["object_id"], b["key_slot"], b["length"], b["obj_length"], b["hdr_len"], _ino(store, "A")))
    con.close()
    resign_metadata(store)  # as above: the object's binding, past the row's MAC
    check(mount_factory(store=store), prepared, {"A": {2}}, [b["object_id"].hex()])


# -------------------------------------------------------------------- interfaces


@pytest.fixture(scope="module")
def served(module_mount_factory):
    m = module_mount_factory()
    (m.mnt / "sentinel").write_bytes(b"sentinel")
    return m


def alive(m) -> None:
    assert m.proc.poll() is None, "the daemon died"
    assert (m.mnt / "sentinel").read_bytes() == b"sentinel"
    r = run_cli("status", m.mnt)
    assert r.returncode == 0, r.stderr


def _errno(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


def test_xattr_limits(served):
    f = served.mnt / "xattrs"
    f.write_bytes(b"x")
    name255 = "user." + "n" * 250
    os.setxattr(f, name255, b"v")
    assert os.getxattr(f, name255) == b"v"
    assert _errno(os.setxattr, f, "user." + "n" * 251, b"v") == errno.ERANGE  # 256 bytes
    assert _errno(os.getxattr, f, "user." + "n" * 251) == errno.ERANGE
    os.setxattr(f, "user.big", b"\xff" * 65536)
    assert os.getxattr(f, "user.big") == b"\xff" * 65536
    assert _errno(os.setxattr, f, "user.big", b"v" * 65537) == errno.E2BIG
    assert os.getxattr(f, "user.big") == b"\xff" * 65536  # the failed set changed nothing
    assert _errno(os.setxattr, f, "", b"v") == errno.ERANGE
    assert _errno(os.setxattr, f, "nonamespace", b"v") == errno.EOPNOTSUPP
    weird = "user.\udcff\n\t name"  # a non-UTF-8 byte and control characters
    os.setxattr(f, weird, b"\0\x01binary\0")
    assert os.getxattr(f, weird) == b"\0\x01binary\0"
    assert weird in os.listxattr(f)
    # a list longer than the caller's buffer is ERANGE, not a crash (the kernel asks for the size)
    for i in range(300):
        os.setxattr(f, f"user.{i:03d}" + "x" * 200, b"")
    names = os.listxattr(f)
    assert len(names) == 303
    assert _errno(os.getxattr, f, "user.missing") == errno.ENODATA
    for n in names:
        os.removexattr(f, n)
    assert os.listxattr(f) == []
    alive(served)


def test_name_limits_and_odd_bytes(served):
    d = served.mnt / "names"
    d.mkdir()
    bd = os.fsencode(d)
    ok255 = b"n" * 255
    (d / os.fsdecode(ok255)).write_bytes(b"255")
    assert (d / os.fsdecode(ok255)).read_bytes() == b"255"
    too_long = bd + b"/" + b"n" * 256
    assert _errno(os.open, too_long, os.O_CREAT | os.O_WRONLY, 0o644) == errno.ENAMETOOLONG
    assert _errno(os.mkdir, too_long) == errno.ENAMETOOLONG
    assert _errno(os.stat, too_long) == errno.ENAMETOOLONG
    assert _errno(os.rename, bd + b"/" + ok255, too_long) == errno.ENAMETOOLONG
    assert _errno(os.symlink, b"target", too_long) == errno.ENAMETOOLONG
    odd = [b"\xff\xfe non-utf8", b"new\nline", b"tab\tand\rcr", b" leading space", b"\x01\x7f", "é ü".encode()]
    for name in odd:
        p = bd + b"/" + name
        with open(p, "wb") as fh:
            fh.write(name)
        assert open(p, "rb").read() == name
    assert set(os.listdir(bd)) == set(odd) | {ok255}
    os.rename(bd + b"/" + odd[0], bd + b"/" + odd[1] + b"\xc0")
    assert open(bd + b"/" + odd[1] + b"\xc0", "rb").read() == odd[0]
    os.unlink(bd + b"/" + odd[1])
    assert _errno(os.mkdir, bd + b"/" + b".") == errno.EEXIST
    alive(served)
    # the store stays consistent with such names (fsck prints them escaped, on one line each)


def test_paths_at_path_max(served):
    base = os.fsencode(served.mnt / "deep")
    os.mkdir(base)
    path = base
    comp = b"d" * 200
    while len(path) + 1 + len(comp) < 4000:
        path += b"/" + comp
        os.mkdir(path)
    last = 4095 - len(path) - 1  # PATH_MAX is 4096 with its NUL
    assert 0 < last <= 255
    full = path + b"/" + b"f" * last
    assert len(full) == 4095
    with open(full, "wb") as fh:
        fh.write(b"at PATH_MAX")
    assert open(full, "rb").read() == b"at PATH_MAX"
    assert _errno(os.open, full + b"x", os.O_CREAT | os.O_WRONLY, 0o644) == errno.ENAMETOOLONG
    # deeper than PATH_MAX through directory descriptors: the filesystem has no depth limit
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(5):
            os.mkdir(comp, dir_fd=fd)
            nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        wfd = os.open(b"leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        os.write(wfd, b"deeper")
        os.close(wfd)
        rfd = os.open(b"leaf", os.O_RDONLY, dir_fd=fd)
        assert os.read(rfd, 100) == b"deeper"
        os.close(rfd)
    finally:
        os.close(fd)
    alive(served)


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)  # blocking: a full backlog waits for the daemon to accept
    s.settimeout(20)
    return s


def _call(path: str, frame: bytes) -> dict:
    with _connect(path) as s:
        s.sendall(frame)
        (n,) = struct.unpack(">I", _recv(s, 4))
        return msgpack.unpackb(_recv(s, n), raw=False)


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "the daemon closed the connection without a reply"
        buf += chunk
    return buf


def test_control_socket_thousands_of_dropped_connections(served):
    path = protocol.socket_path(str(served.mnt))
    status = protocol.encode(protocol.request("status"))
    rng = random.Random(5)
    # a client that sends half a frame and stalls does not hold up anyone else
    staller = _connect(path)
    staller.sendall(struct.pack(">I", 1000) + b"\x80")
    for batch in range(20):
        socks = []
        for i in range(100):
            s = _connect(path)
            kind = rng.randrange(4)
            if kind == 1:
                s.sendall(status[: rng.randrange(1, len(status))])  # a truncated frame
            elif kind == 2:
                s.sendall(status)  # a whole request, gone before the reply
            elif kind == 3:  # reset rather than close
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            socks.append(s)
        for s in socks:
            s.close()
        # between batches, the daemon answers (EBUSY while it still holds 64 dropped ones)
        reply = wait_until(lambda: (lambda r: r if r["ok"] else None)(_call(path, status)), 30,
                           "a status reply after dropped connections")
        assert reply["result"]["pid"] == served.pid
    # malformed structure inside a well-formed frame: deep nesting, a huge map, odd types
    deep = b"\x91" * 5000 + b"\xc0"  # an array nested 5000 deep
    for body in (deep, msgpack.packb({"v": 1, "op": "status", "args": {str(i): i for i in range(50_000)}}),
                 msgpack.packb({"v": 1, "op": "key.add", "args": {"name": "x" * 100_000, "key": b"\0" * 32}}),
                 msgpack.packb({"v": 1.0, "op": "status"}), msgpack.packb({"v": True, "op": "status"})):
        reply = _call(path, struct.pack(">I", len(body)) + body)
        assert reply["v"] == 1 and isinstance(reply["ok"], bool), reply
        if not reply["ok"]:
            assert reply["errno"] in (errno.EBADMSG, errno.EINVAL, errno.EPROTO), reply
    staller.close()
    alive(served)
    served.check_log()
