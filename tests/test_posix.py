"""POSIX behaviour of a mounted s3fuse, one behaviour at a time, with real syscalls.

Most tests share one module-scoped mount and work in their own subdirectory
(``subdir``); tests that count objects in the store, remount, or need special
mount options get their own mount.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from s3fuse.meta import INODE_CACHE

from .conftest import list_objects, py_as, run_as, wait_until

# every test here runs on the local and the S3 backend (conftest.py, "S3 backend")
BACKENDS = ("local", "s3")

MiB = 1 << 20
BLOCK = 4 * MiB

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(old, new, flags: int) -> None:
    r = _libc.renameat2(AT_FDCWD, os.fsencode(str(old)), AT_FDCWD, os.fsencode(str(new)),
                        ctypes.c_uint(flags))
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old))


def expect_errno(err: int, fn, *args, **kw):
    with pytest.raises(OSError) as ei:
        fn(*args, **kw)
    assert ei.value.errno == err, (
        f"{fn.__name__}{args}: expected {errno.errorcode[err]}, "
        f"got {errno.errorcode.get(ei.value.errno, ei.value.errno)} ({ei.value})")


def write_file(p, data: bytes, mode=0o644) -> None:
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    finally:
        os.close(fd)


def fsync_path(p) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(p) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def mknod_many(d, names, threads: int = 4) -> None:
    """Create empty regular files quickly: mknod from a few threads at once."""
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    errors = []

    def work(k):
        try:
            for name in names[k::threads]:
                os.mknod(name, 0o644 | stat.S_IFREG, dir_fd=dfd)
        except BaseException as e:  # reported below
            errors.append(e)

    try:
        ths = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
    finally:
        os.close(dfd)
    if errors:
        raise errors[0]


def wait_clock_past(ts_ns: int) -> None:
    """Bounded poll until the wall clock is clearly past ``ts_ns``, so that a
    timestamp set from now on is distinguishable from ``ts_ns`` even with a
    coarse (jiffy) clock."""
    target = ts_ns + 25_000_000
    deadline = time.monotonic() + 5
    while time.time_ns() <= target:
        assert time.monotonic() < deadline, "wall clock does not advance"
        time.sleep(0.002)


OLD_NS = 1_000_000_000_123_456_789  # 2001-09-09, with nanoseconds


# =========================================================================
# lookup / getattr / setattr
# =========================================================================

def test_lookup(subdir):
    (subdir / "File").write_bytes(b"upper")
    (subdir / "file").write_bytes(b"lower")
    assert read_file(subdir / "File") == b"upper"
    assert read_file(subdir / "file") == b"lower"
    expect_errno(errno.ENOENT, os.stat, subdir / "missing")
    expect_errno(errno.ENOENT, os.stat, subdir / "missing" / "deeper")
    expect_errno(errno.ENOTDIR, os.stat, subdir / "file" / "x")
    os.mkdir(subdir / "d")
    assert os.stat(subdir / "d" / "..").st_ino == os.stat(subdir).st_ino
    assert os.stat(subdir / "d" / ".").st_ino == os.stat(subdir / "d").st_ino
    odd = ["with space", "new\nline", "ünïcödé-名前", "-dash", ".hidden", "a" * 255, "x:y;z*?"]
    for n in odd:
        (subdir / n).write_bytes(n.encode())
    for n in odd:
        assert read_file(subdir / n) == n.encode()
    assert set(os.listdir(subdir)) == {"File", "file", "d", *odd}
    expect_errno(errno.ENAMETOOLONG, os.open, subdir / ("b" * 256), os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.ENAMETOOLONG, os.stat, subdir / ("b" * 256))


def test_getattr_new_file(subdir):
    t0 = time.time_ns()
    p = subdir / "f"
    write_file(p, b"x" * 1234, mode=0o640)
    st = os.stat(p)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o640 & ~current_umask()
    assert st.st_size == 1234
    assert st.st_nlink == 1
    assert st.st_uid == os.getuid() and st.st_gid == os.getgid()
    assert st.st_mtime_ns >= t0 - 1_000_000_000
    assert st.st_mtime_ns <= time.time_ns() + 1_000_000_000
    # inode numbers are distinct and stable
    write_file(subdir / "g", b"")
    assert os.stat(subdir / "g").st_ino != st.st_ino
    assert os.stat(p).st_ino == st.st_ino
    st_dir = os.stat(subdir)
    assert stat.S_ISDIR(st_dir.st_mode)


def current_umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_chmod(subdir):
    p = subdir / "f"
    write_file(p, b"data")
    for mode in (0o600, 0o755, 0o000, 0o4755, 0o2750, 0o1777, 0o7777, 0o644):
        os.chmod(p, mode)
        assert stat.S_IMODE(os.stat(p).st_mode) == mode, oct(mode)
        assert stat.S_ISREG(os.stat(p).st_mode)
    d = subdir / "d"
    os.mkdir(d)
    os.chmod(d, 0o3711)
    st = os.stat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o3711
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fchmod(fd, 0o640)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o640
    finally:
        os.close(fd)
    assert read_file(p) == b"data"


def test_chown(subdir):
    p = subdir / "f"
    write_file(p, b"data")
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(p, -1, 42)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 42)
    os.chown(p, 99, -1)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (99, 42)
    os.symlink("f", subdir / "l")
    os.lchown(subdir / "l", 7, 8)
    lst = os.lstat(subdir / "l")
    assert (lst.st_uid, lst.st_gid) == (7, 8)
    assert (os.stat(p).st_uid, os.stat(p).st_gid) == (99, 42)
    # chown by root of a setuid executable clears the setuid/setgid bits (as ext4)
    os.chmod(p, 0o6755)
    os.chown(p, 1000, 1000)
    assert stat.S_IMODE(os.stat(p).st_mode) & 0o6000 == 0


def test_truncate_down_and_up(subdir):
    rnd = random.Random(1)
    data = rnd.randbytes(BLOCK + 300_000)
    p = subdir / "f"
    write_file(p, data)
    os.truncate(p, 100)
    assert os.stat(p).st_size == 100
    assert read_file(p) == data[:100]
    os.truncate(p, BLOCK + 300_000)
    got = read_file(p)
    assert len(got) == BLOCK + 300_000
    assert got[:100] == data[:100]
    assert got[100:] == bytes(len(got) - 100), "stale data visible after truncate down + up"
    # truncate in the middle of the second block, then extend
    write_file(p, data)
    os.truncate(p, BLOCK + 1000)
    os.truncate(p, BLOCK + 200_000)
    got = read_file(p)
    assert got[:BLOCK + 1000] == data[:BLOCK + 1000]
    assert got[BLOCK + 1000:] == bytes(199_000)
    # extend an empty file
    q = subdir / "g"
    write_file(q, b"")
    os.truncate(q, 3 * MiB)
    assert read_file(q) == bytes(3 * MiB)
    # ftruncate through an fd and O_TRUNC
    fd = os.open(q, os.O_RDWR)
    try:
        os.pwrite(fd, b"abc", 10)
        os.ftruncate(fd, 11)
        assert os.fstat(fd).st_size == 11
        assert os.pread(fd, 100, 0) == bytes(10) + b"a"
    finally:
        os.close(fd)
    fd = os.open(q, os.O_RDWR | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        assert os.pread(fd, 100, 0) == b""
    finally:
        os.close(fd)


def test_o_trunc_then_write_past_old_data(subdir):
    """open(O_TRUNC) drops the old content: a later write at an offset leaves
    zeros (not the old bytes) before it."""
    p = subdir / "f"
    write_file(p, b"X" * 200_000)
    fd = os.open(p, os.O_RDWR | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.pwrite(fd, b"Y" * 100, 113_664)
        got = os.pread(fd, 200_000, 0)
    finally:
        os.close(fd)
    assert len(got) == 113_764
    assert got[113_664:] == b"Y" * 100
    stale = got[:113_664].count(b"X")
    assert stale == 0, f"{stale} bytes of the old content reappeared after O_TRUNC"
    assert read_file(p) == bytes(113_664) + b"Y" * 100


def test_truncate_errors(subdir):
    os.mkdir(subdir / "d")
    expect_errno(errno.EISDIR, os.truncate, subdir / "d", 0)
    expect_errno(errno.ENOENT, os.truncate, subdir / "nope", 0)
    write_file(subdir / "f", b"x")
    expect_errno(errno.EINVAL, os.truncate, subdir / "f", -1)


def test_utimens(subdir):
    p = subdir / "f"
    write_file(p, b"x")
    os.utime(p, ns=(1_234_567_890_123_456_789, 1_111_111_111_987_654_321))
    st = os.stat(p)
    assert st.st_atime_ns == 1_234_567_890_123_456_789
    assert st.st_mtime_ns == 1_111_111_111_987_654_321
    os.utime(p, (1_500_000_000, 1_400_000_000))
    st = os.stat(p)
    assert st.st_atime_ns == 1_500_000_000 * 10**9
    assert st.st_mtime_ns == 1_400_000_000 * 10**9
    # before 1970
    os.utime(p, ns=(-1_000_000_000, -86_400 * 10**9))
    assert os.stat(p).st_mtime_ns == -86_400 * 10**9
    # utime(None) sets both to now
    t0 = time.time_ns()
    os.utime(p)
    st = os.stat(p)
    assert abs(st.st_mtime_ns - t0) < 5 * 10**9
    assert abs(st.st_atime_ns - t0) < 5 * 10**9
    # directories and symlinks (without following)
    os.mkdir(subdir / "d")
    os.utime(subdir / "d", ns=(OLD_NS, OLD_NS))
    assert os.stat(subdir / "d").st_mtime_ns == OLD_NS
    os.symlink("f", subdir / "l")
    os.utime(subdir / "l", ns=(OLD_NS + 5, OLD_NS + 7), follow_symlinks=False)
    assert os.lstat(subdir / "l").st_mtime_ns == OLD_NS + 7
    assert os.stat(p).st_mtime_ns != OLD_NS + 7
    # futimens
    fd = os.open(p, os.O_RDONLY)
    try:
        os.utime(fd, ns=(OLD_NS, OLD_NS + 1))
        assert os.fstat(fd).st_mtime_ns == OLD_NS + 1
    finally:
        os.close(fd)


def test_touch_tool(subdir):
    p = subdir / "f"
    r = subprocess.run(["touch", "-d", "2003-04-05 06:07:08.123456789 UTC", str(p)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.stat(p).st_mtime_ns == 1049522828_123456789
    assert os.stat(p).st_size == 0


# =========================================================================
# directories
# =========================================================================

def test_mkdir_rmdir(subdir):
    d = subdir / "d"
    nl0 = os.stat(subdir).st_nlink
    os.mkdir(d, 0o750)
    st = os.stat(d)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o750 & ~current_umask()
    assert st.st_nlink == 2
    assert os.stat(subdir).st_nlink == nl0 + 1
    assert os.listdir(d) == []
    expect_errno(errno.EEXIST, os.mkdir, d)
    write_file(d / "f", b"x")
    expect_errno(errno.EEXIST, os.mkdir, d / "f")
    expect_errno(errno.ENOTEMPTY, os.rmdir, d)
    expect_errno(errno.ENOTDIR, os.rmdir, d / "f")
    expect_errno(errno.ENOENT, os.rmdir, subdir / "nope")
    expect_errno(errno.ENOENT, os.mkdir, subdir / "nope" / "x")
    os.mkdir(d / "sub")
    assert os.stat(d).st_nlink == 3
    expect_errno(errno.ENOTEMPTY, os.rmdir, d)
    os.rmdir(d / "sub")
    assert os.stat(d).st_nlink == 2
    os.unlink(d / "f")
    os.rmdir(d)
    expect_errno(errno.ENOENT, os.stat, d)
    assert os.stat(subdir).st_nlink == nl0
    # deep nesting
    p = subdir
    for i in range(40):
        p = p / f"n{i}"
        os.mkdir(p)
    write_file(p / "leaf", b"deep")
    assert read_file(p / "leaf") == b"deep"
    # makedirs / rm -r with real tools
    r = subprocess.run(["rm", "-r", str(subdir / "n0")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not (subdir / "n0").exists()
    assert os.listdir(subdir) == []


@pytest.mark.local_only  # entries in the metadata alone: no object, the backend plays no part
def test_readdir_large(subdir):
    d = subdir / "big"
    os.mkdir(d)
    n = 2 * INODE_CACHE  # more inodes than the daemon holds in memory: listing reads them back
    names = [f"entry-{i:06d}-{'x' * (i % 37)}" for i in range(n)]
    mknod_many(d, names)
    listed = os.listdir(d)
    assert len(listed) == n, f"listdir returned {len(listed)} entries, expected {n}"
    assert sorted(listed) == sorted(names)
    # scandir gives consistent types and inodes
    seen = {}
    with os.scandir(d) as it:
        for e in it:
            assert e.name not in seen, f"{e.name} listed twice"
            seen[e.name] = e.inode()
            assert e.is_file(follow_symlinks=False)
    assert len(seen) == n
    assert len(set(seen.values())) == n, "inode numbers are not unique"
    # spot-check lookups
    for name in random.Random(2).sample(names, 200):
        assert os.stat(d / name).st_ino == seen[name]


def test_readdir_concurrent_modification(subdir):
    d = subdir / "dir"
    os.mkdir(d)
    stable = [f"stable-{i:05d}" for i in range(4000)]
    victims = [f"victim-{i:05d}" for i in range(2000)]
    mknod_many(d, stable + victims)
    rnd = random.Random(3)
    rnd.shuffle(victims)
    added = []
    seen = []
    with os.scandir(d) as it:
        for k, e in enumerate(it):
            seen.append(e.name)
            if k % 10 == 0:
                nm = f"added-{k:06d}"
                os.mknod(d / nm, 0o644 | stat.S_IFREG)
                added.append(nm)
                if victims:
                    os.unlink(d / victims.pop())
    dup = {n for n in seen if seen.count(n) > 1} if len(seen) != len(set(seen)) else set()
    assert not dup, f"entries listed more than once during concurrent modification: {sorted(dup)[:10]}"
    missing = set(stable) - set(seen)
    assert not missing, f"{len(missing)} entries present for the whole iteration were not listed, " \
                        f"e.g. {sorted(missing)[:10]}"
    allowed = set(stable) | {f"victim-{i:05d}" for i in range(2000)} | set(added)
    junk = set(seen) - allowed
    assert not junk, f"scandir returned names that never existed: {sorted(junk)[:10]}"
    final = set(os.listdir(d))
    assert final == set(stable) | set(victims) | set(added)


def test_readdir_types(subdir):
    write_file(subdir / "f", b"")
    os.mkdir(subdir / "d")
    os.symlink("f", subdir / "l")
    os.mkfifo(subdir / "p")
    with os.scandir(subdir) as it:
        ents = {e.name: e for e in it}
    assert set(ents) == {"f", "d", "l", "p"}
    assert ents["f"].is_file(follow_symlinks=False)
    assert ents["d"].is_dir(follow_symlinks=False)
    assert ents["l"].is_symlink()
    assert stat.S_ISFIFO(ents["p"].stat(follow_symlinks=False).st_mode)


# =========================================================================
# data: create, read, write
# =========================================================================

def test_create_excl(subdir):
    p = subdir / "f"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    expect_errno(errno.EEXIST, os.open, p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    expect_errno(errno.ENOENT, os.open, subdir / "nope", os.O_RDONLY)
    os.mkdir(subdir / "d")
    expect_errno(errno.EISDIR, os.open, subdir / "d", os.O_WRONLY)
    expect_errno(errno.ENOTDIR, os.open, p, os.O_RDONLY | os.O_DIRECTORY)


def test_random_rw_against_model(subdir):
    rnd = random.Random(4)
    p = subdir / "f"
    model = bytearray()
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for i in range(400):
            r = rnd.random()
            if r < 0.55:
                # offsets cluster around segment (64 KiB) and block (4 MiB) boundaries
                base = rnd.choice([0, 65536, BLOCK, 2 * BLOCK, rnd.randrange(0, 3 * BLOCK)])
                off = max(0, base + rnd.randrange(-70000, 70000))
                ln = rnd.choice([1, 7, 4096, 65536, rnd.randrange(1, 300_000)])
                data = rnd.randbytes(ln)
                assert os.pwrite(fd, data, off) == ln
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off:off + ln] = data
            elif r < 0.9:
                off = rnd.randrange(0, len(model) + 10) if model else 0
                ln = rnd.randrange(0, 400_000)
                got = os.pread(fd, ln, off)
                assert got == bytes(model[off:off + ln]), f"op {i}: pread({ln}, {off}) mismatch"
            elif r < 0.95:
                size = rnd.randrange(0, len(model) + 100_000)
                os.ftruncate(fd, size)
                if size < len(model):
                    del model[size:]
                else:
                    model.extend(bytes(size - len(model)))
            else:
                assert os.fstat(fd).st_size == len(model), f"op {i}: st_size"
    finally:
        os.close(fd)
    assert os.stat(p).st_size == len(model)
    assert read_file(p) == bytes(model)


def test_read_write_remount(mounted):
    rnd = random.Random(5)
    data = bytearray(rnd.randbytes(9 * MiB + 12345))
    p = mounted.mnt / "f"
    write_file(p, bytes(data))
    fd = os.open(p, os.O_RDWR)
    try:
        for _ in range(50):
            off = rnd.randrange(0, len(data))
            chunk = rnd.randbytes(rnd.randrange(1, 200_000))
            os.pwrite(fd, chunk, off)
            end = off + len(chunk)
            if end > len(data):
                data.extend(bytes(end - len(data)))
            data[off:end] = chunk
    finally:
        os.close(fd)
    assert read_file(p) == bytes(data)
    mounted.remount()
    assert os.stat(p).st_size == len(data)
    assert read_file(p) == bytes(data)


def test_o_append(subdir):
    p = subdir / "f"
    write_file(p, b"start:")
    fd1 = os.open(p, os.O_WRONLY | os.O_APPEND)
    fd2 = os.open(p, os.O_WRONLY | os.O_APPEND)
    fd3 = os.open(p, os.O_RDWR)
    try:
        os.write(fd1, b"one,")
        os.write(fd2, b"two,")
        os.lseek(fd1, 0, os.SEEK_SET)
        os.write(fd1, b"three,")  # still appends
        os.pwrite(fd3, b"S", 0)  # non-append fd overwrites in place
        os.write(fd3, b"X")  # fd3's position is 0 -> overwrites 's'
        os.write(fd2, b"four")
        assert os.lseek(fd2, 0, os.SEEK_CUR) == len(b"start:one,two,three,four")
    finally:
        for fd in (fd1, fd2, fd3):
            os.close(fd)
    assert read_file(p) == b"Xtart:one,two,three,four"
    with open(p, "ab") as f:
        f.write(b"+" * 100_000)
    assert os.stat(p).st_size == len(b"Xtart:one,two,three,four") + 100_000


def test_sparse_file_objects(mount_factory):
    m = mount_factory()
    m.unmount()
    base = list_objects(m.store)
    m.start()
    p = m.mnt / "sparse"
    off = 100 * MiB
    payload = random.Random(6).randbytes(5000)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, payload, off)
        os.fsync(fd)
        st = os.fstat(fd)
        assert st.st_size == off + len(payload)
        assert os.pread(fd, 4096, 0) == bytes(4096)
        assert os.pread(fd, 4096, 50 * MiB + 17) == bytes(4096)
        assert os.pread(fd, len(payload) + 10, off) == payload
    finally:
        os.close(fd)
    m.remount()
    st = os.stat(p)
    assert st.st_size == off + len(payload)
    assert st.st_blocks * 512 < 1 * MiB, f"sparse file reports st_blocks={st.st_blocks}"
    with open(p, "rb") as f:
        pos = 0
        while pos < off:
            chunk = f.read(min(4 * MiB, off - pos))
            assert chunk == bytes(len(chunk)), f"hole at {pos} is not zero"
            assert chunk, "short file"
            pos += len(chunk)
        assert f.read() == payload
    # SEEK_DATA/SEEK_HOLE are optional; a write of zeros makes no object either
    q = m.mnt / "zeros"
    write_file(q, bytes(2 * BLOCK))
    assert read_file(q) == bytes(2 * BLOCK)
    m.unmount()
    new = list_objects(m.store) - base
    assert len(new) == 1, (f"a sparse file with data in one block and an all-zero file should "
                           f"add exactly one object, added {len(new)}")
    m.start()
    assert read_file(p)[off:] == payload


def test_ebadf_and_modes(subdir):
    p = subdir / "f"
    write_file(p, b"abc")
    fd = os.open(p, os.O_RDONLY)
    try:
        expect_errno(errno.EBADF, os.write, fd, b"x")
    finally:
        os.close(fd)
    fd = os.open(p, os.O_WRONLY)
    try:
        expect_errno(errno.EBADF, os.read, fd, 1)
    finally:
        os.close(fd)
    assert read_file(p) == b"abc"


# =========================================================================
# rename
# =========================================================================

def test_rename_file(subdir):
    write_file(subdir / "a", b"A")
    ino = os.stat(subdir / "a").st_ino
    os.rename(subdir / "a", subdir / "b")
    assert not (subdir / "a").exists()
    assert read_file(subdir / "b") == b"A"
    assert os.stat(subdir / "b").st_ino == ino
    os.mkdir(subdir / "d")
    os.rename(subdir / "b", subdir / "d" / "c")
    assert os.listdir(subdir / "d") == ["c"]
    assert read_file(subdir / "d" / "c") == b"A"
    os.rename(subdir / "d" / "c", subdir / "d" / "c")  # same name: no-op
    assert read_file(subdir / "d" / "c") == b"A"
    expect_errno(errno.ENOENT, os.rename, subdir / "nope", subdir / "x")


def test_rename_over_existing(subdir):
    write_file(subdir / "a", b"new content")
    write_file(subdir / "b", b"old content")
    fd = os.open(subdir / "b", os.O_RDONLY)
    try:
        os.rename(subdir / "a", subdir / "b")
        assert sorted(os.listdir(subdir)) == ["b"]
        assert read_file(subdir / "b") == b"new content"
        # the replaced inode stays readable through an open fd
        assert os.pread(fd, 100, 0) == b"old content"
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    # hard-linked target: only the name is replaced
    write_file(subdir / "x", b"X")
    os.link(subdir / "x", subdir / "x2")
    write_file(subdir / "y", b"Y")
    os.rename(subdir / "y", subdir / "x")
    assert read_file(subdir / "x") == b"Y"
    assert read_file(subdir / "x2") == b"X"
    assert os.stat(subdir / "x2").st_nlink == 1
    # rename between two links of the same inode: nothing happens
    os.link(subdir / "x2", subdir / "x3")
    os.rename(subdir / "x2", subdir / "x3")
    assert (subdir / "x2").exists() and (subdir / "x3").exists()
    assert os.stat(subdir / "x2").st_nlink == 2


def test_rename_directories(subdir):
    os.makedirs(subdir / "a" / "inner")
    write_file(subdir / "a" / "inner" / "f", b"F")
    os.rename(subdir / "a", subdir / "b")
    assert read_file(subdir / "b" / "inner" / "f") == b"F"
    assert os.stat(subdir / "b" / "inner" / "..").st_ino == os.stat(subdir / "b").st_ino
    # move into another directory: '..' and link counts follow
    os.mkdir(subdir / "other")
    nl_sub = os.stat(subdir).st_nlink
    os.rename(subdir / "b" / "inner", subdir / "other" / "inner")
    assert os.stat(subdir / "other" / "inner" / "..").st_ino == os.stat(subdir / "other").st_ino
    assert os.stat(subdir / "b").st_nlink == 2
    assert os.stat(subdir / "other").st_nlink == 3
    assert os.stat(subdir).st_nlink == nl_sub
    # over an empty directory: allowed
    os.mkdir(subdir / "empty")
    os.rename(subdir / "b", subdir / "empty")
    assert not (subdir / "b").exists()
    assert (subdir / "empty").is_dir()
    # over a non-empty directory: ENOTEMPTY (or EEXIST)
    os.mkdir(subdir / "c")
    with pytest.raises(OSError) as ei:
        os.rename(subdir / "c", subdir / "other")
    assert ei.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    # file over directory / directory over file
    write_file(subdir / "file", b"")
    expect_errno(errno.EISDIR, os.rename, subdir / "file", subdir / "c")
    expect_errno(errno.ENOTDIR, os.rename, subdir / "c", subdir / "file")
    # a directory into its own subtree
    os.makedirs(subdir / "p" / "q" / "r")
    expect_errno(errno.EINVAL, os.rename, subdir / "p", subdir / "p" / "q" / "r" / "p")
    expect_errno(errno.EINVAL, os.rename, subdir / "p", subdir / "p" / "x")
    assert (subdir / "p" / "q" / "r").is_dir()


def test_rename_noreplace(subdir):
    write_file(subdir / "a", b"A")
    write_file(subdir / "b", b"B")
    expect_errno(errno.EEXIST, renameat2, subdir / "a", subdir / "b", RENAME_NOREPLACE)
    assert read_file(subdir / "a") == b"A" and read_file(subdir / "b") == b"B"
    renameat2(subdir / "a", subdir / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(subdir)) == ["b", "c"]
    assert read_file(subdir / "c") == b"A"


def test_rename_exchange(subdir):
    write_file(subdir / "a", b"A")
    os.makedirs(subdir / "d" / "sub")
    write_file(subdir / "d" / "sub" / "f", b"F")
    ino_a = os.stat(subdir / "a").st_ino
    ino_d = os.stat(subdir / "d").st_ino
    renameat2(subdir / "a", subdir / "d", RENAME_EXCHANGE)
    assert os.stat(subdir / "a").st_ino == ino_d
    assert os.stat(subdir / "d").st_ino == ino_a
    assert read_file(subdir / "d") == b"A"
    assert read_file(subdir / "a" / "sub" / "f") == b"F"
    os.mkdir(subdir / "x")
    write_file(subdir / "x" / "g", b"G")
    renameat2(subdir / "x" / "g", subdir / "d", RENAME_EXCHANGE)
    assert read_file(subdir / "d") == b"G"
    assert read_file(subdir / "x" / "g") == b"A"
    expect_errno(errno.ENOENT, renameat2, subdir / "d", subdir / "missing", RENAME_EXCHANGE)
    expect_errno(errno.EINVAL, renameat2, subdir / "a", subdir / "d",
                 RENAME_EXCHANGE | RENAME_NOREPLACE)


# =========================================================================
# unlink / rmdir while open, object reclamation
# =========================================================================

def test_unlink_while_open_reclaims_objects(mount_factory):
    m = mount_factory()
    m.unmount()
    base = list_objects(m.store)
    m.start()
    data = random.Random(7).randbytes(9 * MiB)
    write_file(m.mnt / "f", data)
    write_file(m.mnt / "keep", b"keep me" * 1000)
    m.unmount()
    with_file = list_objects(m.store)
    assert len(with_file - base) >= 3, "a 9 MiB file should be stored as 3 objects"
    m.start()
    fd = os.open(m.mnt / "f", os.O_RDWR)
    try:
        os.unlink(m.mnt / "f")
        assert not (m.mnt / "f").exists()
        assert sorted(os.listdir(m.mnt)) == ["keep"]
        st = os.fstat(fd)
        assert st.st_nlink == 0 and st.st_size == len(data)
        assert os.pread(fd, len(data), 0) == data
        # still writable while unlinked
        os.pwrite(fd, b"zz", 5)
        assert os.pread(fd, 10, 0) == data[:5] + b"zz" + data[7:10]
        # a new file with the same name is a different file
        write_file(m.mnt / "f", b"new")
        assert os.pread(fd, 3, 0) == data[:3]
        assert read_file(m.mnt / "f") == b"new"
        os.unlink(m.mnt / "f")
    finally:
        os.close(fd)
    m.unmount()
    after = list_objects(m.store)
    created = with_file - base
    assert len(created) == 4, (
        f"a 9 MiB file and a 7 KB file should add 4 objects, added {len(created)}")
    leftover = after - base
    # only the small file "keep" still has an object; those of the 9 MiB file
    # (and of the rewritten block and of the second "f") are reclaimed
    assert len(leftover) == 1 and leftover <= created, (
        f"{len(leftover)} objects left after unlink+close+unmount (expected 1: 'keep')")
    m.start()
    assert read_file(m.mnt / "keep") == b"keep me" * 1000


def test_unlink_while_open_survives_remount_of_name(subdir):
    p = subdir / "f"
    write_file(p, b"hello world")
    fd = os.open(p, os.O_RDONLY)
    try:
        os.unlink(p)
        expect_errno(errno.ENOENT, os.stat, p)
        assert os.read(fd, 100) == b"hello world"
    finally:
        os.close(fd)
    assert os.listdir(subdir) == []


def test_rmdir_while_open(subdir):
    d = subdir / "d"
    os.mkdir(d)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(d)
        assert not d.exists()
        st = os.fstat(dfd)
        assert stat.S_ISDIR(st.st_mode)
        assert os.listdir(dfd) == []
        expect_errno(errno.ENOENT, os.open, "newfile", os.O_CREAT | os.O_WRONLY, 0o644,
                     dir_fd=dfd)
    finally:
        os.close(dfd)
    assert os.listdir(subdir) == []


# =========================================================================
# links
# =========================================================================

def test_hard_links(subdir):
    p = subdir / "f"
    write_file(p, b"shared")
    os.mkdir(subdir / "d")
    os.link(p, subdir / "d" / "g")
    assert os.stat(p).st_nlink == 2
    assert os.stat(subdir / "d" / "g").st_nlink == 2
    assert os.stat(p).st_ino == os.stat(subdir / "d" / "g").st_ino
    os.link(p, subdir / "h")
    assert os.stat(p).st_nlink == 3
    with open(subdir / "d" / "g", "r+b") as f:
        f.write(b"SH")
    assert read_file(p) == b"SHared"
    assert read_file(subdir / "h") == b"SHared"
    os.unlink(p)
    assert os.stat(subdir / "h").st_nlink == 2
    os.unlink(subdir / "h")
    assert os.stat(subdir / "d" / "g").st_nlink == 1
    assert read_file(subdir / "d" / "g") == b"SHared"
    expect_errno(errno.EEXIST, os.link, subdir / "d" / "g", subdir / "d" / "g")
    expect_errno(errno.ENOENT, os.link, subdir / "nope", subdir / "x")
    expect_errno(errno.EPERM, os.link, subdir / "d", subdir / "dlink")
    # nlink via fstat on an open fd
    fd = os.open(subdir / "d" / "g", os.O_RDONLY)
    try:
        os.link(subdir / "d" / "g", subdir / "again")
        assert os.fstat(fd).st_nlink == 2
    finally:
        os.close(fd)


def test_symlinks(subdir):
    write_file(subdir / "target", b"T")
    os.symlink("target", subdir / "rel")
    os.symlink(str(subdir / "target"), subdir / "abs")
    os.symlink("does/not/exist", subdir / "dangling")
    long_target = "/".join(["component"] * 400)[:3000]
    os.symlink(long_target, subdir / "long")
    assert os.readlink(subdir / "rel") == "target"
    assert os.readlink(subdir / "abs") == str(subdir / "target")
    assert os.readlink(subdir / "dangling") == "does/not/exist"
    assert os.readlink(subdir / "long") == long_target
    for name, tgt in (("rel", "target"), ("dangling", "does/not/exist"), ("long", long_target)):
        lst = os.lstat(subdir / name)
        assert stat.S_ISLNK(lst.st_mode)
        assert lst.st_size == len(tgt.encode())
    assert read_file(subdir / "rel") == b"T"
    assert read_file(subdir / "abs") == b"T"
    assert os.stat(subdir / "rel").st_ino == os.stat(subdir / "target").st_ino
    expect_errno(errno.ENOENT, os.stat, subdir / "dangling")
    expect_errno(errno.EEXIST, os.symlink, "x", subdir / "rel")
    expect_errno(errno.EINVAL, os.readlink, subdir / "target")
    os.mkdir(subdir / "d")
    os.symlink("d", subdir / "dl")
    write_file(subdir / "dl" / "inside", b"I")
    assert read_file(subdir / "d" / "inside") == b"I"
    # unlink removes the link, not the target
    os.unlink(subdir / "rel")
    assert read_file(subdir / "target") == b"T"
    # symlink loop
    os.symlink("loop2", subdir / "loop1")
    os.symlink("loop1", subdir / "loop2")
    expect_errno(errno.ELOOP, os.stat, subdir / "loop1")


# =========================================================================
# statfs, fsync
# =========================================================================

def test_statfs(module_mount):
    sv = os.statvfs(module_mount.mnt)
    assert sv.f_bsize > 0
    assert sv.f_frsize > 0
    assert sv.f_namemax == 255
    assert sv.f_blocks >= sv.f_bfree >= sv.f_bavail
    assert sv.f_blocks > 0
    r = subprocess.run(["df", "-P", str(module_mount.mnt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_fsync_and_fsyncdir(subdir):
    p = subdir / "f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 100_000)
        os.fsync(fd)
        os.fdatasync(fd)
        assert os.fstat(fd).st_size == 100_000
    finally:
        os.close(fd)
    dfd = os.open(subdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    rfd = os.open(module_root(subdir), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(rfd)
    finally:
        os.close(rfd)
    assert read_file(p) == b"x" * 100_000
    r = subprocess.run(["sync", "-f", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def module_root(p: Path) -> Path:
    while not os.path.ismount(p):
        p = p.parent
    return p


# =========================================================================
# xattrs
# =========================================================================

def test_xattrs(subdir):
    p = subdir / "f"
    write_file(p, b"x")
    assert [a for a in os.listxattr(p) if a.startswith("user.")] == []
    expect_errno(errno.ENODATA, os.getxattr, p, "user.missing")
    os.setxattr(p, "user.a", b"alpha")
    os.setxattr(p, "user.bin", bytes(range(256)))
    os.setxattr(p, "user.empty", b"")
    os.setxattr(p, "user.big", b"v" * 1500)
    assert os.getxattr(p, "user.a") == b"alpha"
    assert os.getxattr(p, "user.bin") == bytes(range(256))
    assert os.getxattr(p, "user.empty") == b""
    assert os.getxattr(p, "user.big") == b"v" * 1500
    assert sorted(a for a in os.listxattr(p) if a.startswith("user.")) == \
        ["user.a", "user.big", "user.bin", "user.empty"]
    expect_errno(errno.EEXIST, os.setxattr, p, "user.a", b"x", os.XATTR_CREATE)
    assert os.getxattr(p, "user.a") == b"alpha"
    expect_errno(errno.ENODATA, os.setxattr, p, "user.nope", b"x", os.XATTR_REPLACE)
    expect_errno(errno.ENODATA, os.getxattr, p, "user.nope")
    os.setxattr(p, "user.a", b"replaced", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.a") == b"replaced"
    os.setxattr(p, "user.new", b"created", os.XATTR_CREATE)
    assert os.getxattr(p, "user.new") == b"created"
    os.removexattr(p, "user.a")
    expect_errno(errno.ENODATA, os.getxattr, p, "user.a")
    expect_errno(errno.ENODATA, os.removexattr, p, "user.a")
    assert sorted(a for a in os.listxattr(p) if a.startswith("user.")) == \
        ["user.big", "user.bin", "user.empty", "user.new"]
    # xattrs do not touch the data
    assert read_file(p) == b"x"
    # on directories, through fds, and with the attr tools
    os.mkdir(subdir / "d")
    os.setxattr(subdir / "d", "user.dir", b"D")
    assert os.getxattr(subdir / "d", "user.dir") == b"D"
    fd = os.open(p, os.O_RDONLY)
    try:
        os.setxattr(fd, "user.viafd", b"F")
        assert os.getxattr(fd, "user.viafd") == b"F"
    finally:
        os.close(fd)
    r = subprocess.run(["setfattr", "-n", "user.tool", "-v", "0x6869", str(p)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.getxattr(p, "user.tool") == b"hi"
    r = subprocess.run(["getfattr", "-d", "--absolute-names", "-e", "hex", str(p)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "user.tool=0x6869\n" in r.stdout, r.stdout
    assert f"user.new=0x{b'created'.hex()}\n" in r.stdout, r.stdout
    r = subprocess.run(["setfattr", "-x", "user.tool", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    expect_errno(errno.ENODATA, os.getxattr, p, "user.tool")
    # xattrs follow the inode across rename and hard links
    os.rename(p, subdir / "g")
    os.link(subdir / "g", subdir / "h")
    assert os.getxattr(subdir / "h", "user.new") == b"created"
    # too-large values / names are refused cleanly
    with pytest.raises(OSError) as ei:
        os.setxattr(subdir / "g", "user." + "n" * 300, b"x")
    assert ei.value.errno == errno.ERANGE


def test_posix_acl_xattr_matches_mode(subdir):
    """cp -a and rsync -A copy modes by writing system.posix_acl_access; a filesystem
    must either refuse it (EOPNOTSUPP) or apply it, as ext4 does -- never accept
    it and ignore it."""
    p = subdir / "f"
    write_file(p, b"x")
    os.chmod(p, 0o600)
    # ACL version 2: USER_OBJ rw-, GROUP_OBJ r--, OTHER r--  (= mode 0644)
    acl = (b"\x02\x00\x00\x00" + b"\x01\x00\x06\x00\xff\xff\xff\xff"
           + b"\x04\x00\x04\x00\xff\xff\xff\xff" + b"\x20\x00\x04\x00\xff\xff\xff\xff")
    try:
        os.setxattr(p, "system.posix_acl_access", acl)
    except OSError as e:
        assert e.errno == errno.EOPNOTSUPP, f"unexpected {errno.errorcode.get(e.errno)}"
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
        return
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644, (
        "system.posix_acl_access was accepted but the mode does not reflect it")


def test_xattr_persist(mounted):
    p = mounted.mnt / "f"
    write_file(p, b"x")
    os.setxattr(p, "user.k", b"v1")
    os.setxattr(mounted.mnt, "user.root", b"r")
    mounted.remount()
    assert os.getxattr(p, "user.k") == b"v1"
    assert os.getxattr(mounted.mnt, "user.root") == b"r"


# =========================================================================
# ownership and permissions (other users, --allow-other)
# =========================================================================

@pytest.fixture(scope="module")
def allow_other_mount(module_mount_factory):
    m = module_mount_factory(extra_args=["--allow-other"])
    os.chmod(m.mnt, 0o755)
    yield m
    if m.proc is not None and m.proc.poll() is None and os.path.ismount(m.mnt):
        m.unmount()


@pytest.fixture
def shared_dir(allow_other_mount, request):
    d = allow_other_mount.mnt / request.node.name
    os.mkdir(d)
    os.chmod(d, 0o777)
    return d


def test_new_files_owned_by_caller(shared_dir):
    ok, _ = py_as(1000, 1000, "create", shared_dir / "f1000", 0o644)
    assert ok == "ok"
    ok, _ = py_as(1001, 2002, "create", shared_dir / "f1001", 0o600)
    assert ok == "ok"
    ok, _ = py_as(1001, 2002, "mkdir", shared_dir / "d1001", 0o755)
    assert ok == "ok"
    st = os.stat(shared_dir / "f1000")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    st = os.stat(shared_dir / "f1001")
    assert (st.st_uid, st.st_gid) == (1001, 2002)
    st = os.stat(shared_dir / "d1001")
    assert (st.st_uid, st.st_gid) == (1001, 2002)
    write_file(shared_dir / "root", b"")
    st = os.stat(shared_dir / "root")
    assert (st.st_uid, st.st_gid) == (0, 0)
    # symlinks too
    r = run_as(1000, 1000, ["ln", "-s", "x", str(shared_dir / "sl")])
    assert r.returncode == 0, r.stderr
    assert (os.lstat(shared_dir / "sl").st_uid, os.lstat(shared_dir / "sl").st_gid) == (1000, 1000)


def test_permission_checks(shared_dir):
    f = shared_dir / "private"
    assert py_as(1000, 1000, "write", f, b"secret".hex()) == ("ok", None)
    assert py_as(1000, 1000, "chmod", f, 0o600) == ("ok", None)
    assert py_as(1000, 1000, "read", f) == ("ok", b"secret".hex())
    assert py_as(1001, 1001, "read", f) == ("errno", errno.EACCES)
    assert py_as(1001, 1001, "write", f, b"x".hex()) == ("errno", errno.EACCES)
    assert py_as(1001, 1001, "chmod", f, 0o666) == ("errno", errno.EPERM)
    assert py_as(1001, 1001, "chown", f, 1001, 1001) == ("errno", errno.EPERM)
    assert py_as(1000, 1000, "chown", f, 1001, -1) == ("errno", errno.EPERM)
    assert py_as(1001, 1001, "utime", f, OLD_NS) == ("errno", errno.EPERM)
    # group read
    assert py_as(1000, 1000, "chmod", f, 0o640) == ("ok", None)
    assert py_as(1001, 1000, "read", f) == ("ok", b"secret".hex())
    assert py_as(1001, 1001, "read", f) == ("errno", errno.EACCES)
    # root can read anything
    assert read_file(f) == b"secret"
    # 0755 directory owned by 1000 is not writable by others
    d = shared_dir / "d"
    assert py_as(1000, 1000, "mkdir", d, 0o755) == ("ok", None)
    assert py_as(1001, 1001, "create", d / "x", 0o644) == ("errno", errno.EACCES)
    assert py_as(1001, 1001, "mkdir", d / "y", 0o755) == ("errno", errno.EACCES)
    assert py_as(1000, 1000, "create", d / "mine", 0o644) == ("ok", None)
    assert py_as(1001, 1001, "unlink", d / "mine") == ("errno", errno.EACCES)
    assert py_as(1001, 1001, "rename", d / "mine", shared_dir / "stolen") == ("errno", errno.EACCES)
    assert py_as(1001, 1001, "listdir", d) == ("ok", ["mine"])
    # 0700: no traversal, no listing
    assert py_as(1000, 1000, "chmod", d, 0o700) == ("ok", None)
    assert py_as(1001, 1001, "stat", d / "mine") == ("errno", errno.EACCES)
    assert py_as(1001, 1001, "listdir", d) == ("errno", errno.EACCES)
    assert py_as(1000, 1000, "stat", d / "mine")[0] == "ok"
    # 0711: traversal without listing
    assert py_as(1000, 1000, "chmod", d, 0o711) == ("ok", None)
    assert py_as(1001, 1001, "stat", d / "mine")[0] == "ok"
    assert py_as(1001, 1001, "listdir", d) == ("errno", errno.EACCES)
    # sticky directory: others cannot remove my files
    sd = shared_dir / "sticky"
    os.mkdir(sd)
    os.chmod(sd, 0o1777)
    assert py_as(1000, 1000, "create", sd / "mine", 0o666) == ("ok", None)
    assert py_as(1001, 1001, "unlink", sd / "mine") == ("errno", errno.EPERM)
    assert py_as(1000, 1000, "unlink", sd / "mine") == ("ok", None)
    # execute permission
    exe = shared_dir / "script"
    write_file(exe, b"#!/bin/sh\necho ran\n", mode=0o744)
    os.chmod(exe, 0o744)
    r = run_as(1000, 1000, ["/bin/sh", "-c", f"exec '{exe}'"])
    assert r.returncode != 0 and "ermission denied" in r.stderr, (r.returncode, r.stderr)
    os.chmod(exe, 0o755)
    r = run_as(1000, 1000, ["/bin/sh", "-c", f"exec '{exe}'"])
    assert r.returncode == 0 and r.stdout == "ran\n", r.stderr
    # access()
    assert py_as(1001, 1001, "access", f, os.R_OK) == ("ok", False)
    assert py_as(1000, 1000, "access", f, os.R_OK | os.W_OK) == ("ok", True)


def test_setgid_directory(shared_dir):
    d = shared_dir / "sg"
    os.mkdir(d)
    os.chown(d, 0, 3000)
    os.chmod(d, 0o2777)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o2777
    assert py_as(1000, 1000, "create", d / "f", 0o644) == ("ok", None)
    assert py_as(1000, 1000, "mkdir", d / "sub", 0o755) == ("ok", None)
    st = os.stat(d / "f")
    assert (st.st_uid, st.st_gid) == (1000, 3000), "new file did not inherit the setgid group"
    st = os.stat(d / "sub")
    assert (st.st_uid, st.st_gid) == (1000, 3000), "new subdir did not inherit the setgid group"
    assert st.st_mode & stat.S_ISGID, "new subdir lost the setgid bit"
    # and recursively
    assert py_as(1000, 1000, "create", d / "sub" / "g", 0o644) == ("ok", None)
    assert os.stat(d / "sub" / "g").st_gid == 3000
    # root too
    write_file(d / "rootfile", b"")
    assert os.stat(d / "rootfile").st_gid == 3000
    # without setgid: the caller's gid
    os.chmod(d, 0o777)
    assert py_as(1000, 1000, "create", d / "plain", 0o644) == ("ok", None)
    assert os.stat(d / "plain").st_gid == 1000


# =========================================================================
# special files
# =========================================================================

def test_fifo_and_socket(subdir):
    os.mkfifo(subdir / "fifo", 0o640)
    st = os.lstat(subdir / "fifo")
    assert stat.S_ISFIFO(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o640 & ~current_umask()
    rfd = os.open(subdir / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    wfd = os.open(subdir / "fifo", os.O_WRONLY)
    try:
        os.write(wfd, b"through the pipe")
        assert os.read(rfd, 100) == b"through the pipe"
    finally:
        os.close(wfd)
        os.close(rfd)
    os.mknod(subdir / "sock", stat.S_IFSOCK | 0o600)
    assert stat.S_ISSOCK(os.lstat(subdir / "sock").st_mode)
    # a real unix socket bound inside the mount
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(subdir / "bound"))
        assert stat.S_ISSOCK(os.lstat(subdir / "bound").st_mode)
    finally:
        s.close()
    os.mknod(subdir / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    st = os.lstat(subdir / "chr")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert sorted(os.listdir(subdir)) == ["bound", "chr", "fifo", "sock"]
    for n in ("bound", "chr", "fifo", "sock"):
        os.unlink(subdir / n)
    assert os.listdir(subdir) == []


def test_special_files_persist(mounted):
    os.mkfifo(mounted.mnt / "fifo")
    os.mknod(mounted.mnt / "sock", stat.S_IFSOCK | 0o644)
    mounted.remount()
    assert stat.S_ISFIFO(os.lstat(mounted.mnt / "fifo").st_mode)
    assert stat.S_ISSOCK(os.lstat(mounted.mnt / "sock").st_mode)


# =========================================================================
# timestamps (as ext4)
# =========================================================================

def test_write_updates_mtime_ctime(subdir):
    p = subdir / "f"
    write_file(p, b"abc")
    os.utime(p, ns=(OLD_NS, OLD_NS))
    c0 = os.stat(p).st_ctime_ns
    wait_clock_past(c0)
    t0 = time.time_ns()
    fd = os.open(p, os.O_WRONLY)
    try:
        os.pwrite(fd, b"X", 1)
        st = os.fstat(fd)  # while still open
        assert st.st_mtime_ns > OLD_NS and st.st_mtime_ns >= t0 - 50_000_000
        assert st.st_ctime_ns > c0
    finally:
        os.close(fd)
    st = os.stat(p)
    assert st.st_mtime_ns >= t0 - 50_000_000
    assert st.st_ctime_ns > c0
    assert st.st_atime_ns == OLD_NS or st.st_atime_ns >= t0 - 50_000_000


def test_truncate_updates_mtime_ctime(subdir):
    p = subdir / "f"
    write_file(p, b"abc")
    os.utime(p, ns=(OLD_NS, OLD_NS))
    c0 = os.stat(p).st_ctime_ns
    wait_clock_past(c0)
    os.truncate(p, 1)
    st = os.stat(p)
    assert st.st_mtime_ns > OLD_NS
    assert st.st_ctime_ns > c0


def test_chmod_updates_ctime_not_mtime(subdir):
    p = subdir / "f"
    write_file(p, b"abc")
    os.utime(p, ns=(OLD_NS, OLD_NS))
    c0 = os.stat(p).st_ctime_ns
    wait_clock_past(c0)
    os.chmod(p, 0o600)
    st = os.stat(p)
    assert st.st_mtime_ns == OLD_NS, "chmod changed mtime"
    assert st.st_atime_ns == OLD_NS, "chmod changed atime"
    assert st.st_ctime_ns > c0, "chmod did not update ctime"
    c1 = st.st_ctime_ns
    wait_clock_past(c1)
    os.chown(p, 5, 6)
    st = os.stat(p)
    assert st.st_mtime_ns == OLD_NS and st.st_ctime_ns > c1
    c2 = st.st_ctime_ns
    wait_clock_past(c2)
    os.setxattr(p, "user.x", b"1")
    st = os.stat(p)
    assert st.st_mtime_ns == OLD_NS and st.st_ctime_ns > c2, "setxattr should update ctime only"
    c3 = st.st_ctime_ns
    wait_clock_past(c3)
    os.utime(p, ns=(OLD_NS + 1, OLD_NS + 2))
    assert os.stat(p).st_ctime_ns > c3, "utime should update ctime"


def test_rename_updates_times(subdir):
    src = subdir / "src"
    dst = subdir / "dst"
    os.mkdir(src)
    os.mkdir(dst)
    write_file(src / "f", b"x")
    for p in (src, dst, src / "f"):
        os.utime(p, ns=(OLD_NS, OLD_NS))
    c_f = os.stat(src / "f").st_ctime_ns
    c_src = os.stat(src).st_ctime_ns
    c_dst = os.stat(dst).st_ctime_ns
    wait_clock_past(max(c_f, c_src, c_dst))
    os.rename(src / "f", dst / "f")
    st_f = os.stat(dst / "f")
    st_src = os.stat(src)
    st_dst = os.stat(dst)
    assert st_f.st_mtime_ns == OLD_NS, "rename changed the moved file's mtime"
    assert st_f.st_ctime_ns > c_f, "rename did not update the moved inode's ctime"
    assert st_src.st_mtime_ns > OLD_NS and st_src.st_ctime_ns > c_src, "source dir times"
    assert st_dst.st_mtime_ns > OLD_NS and st_dst.st_ctime_ns > c_dst, "target dir times"


def test_link_unlink_update_times(subdir):
    p = subdir / "f"
    write_file(p, b"x")
    os.mkdir(subdir / "d")
    os.utime(p, ns=(OLD_NS, OLD_NS))
    os.utime(subdir / "d", ns=(OLD_NS, OLD_NS))
    c_f = os.stat(p).st_ctime_ns
    c_d = os.stat(subdir / "d").st_ctime_ns
    wait_clock_past(max(c_f, c_d))
    os.link(p, subdir / "d" / "g")
    st = os.stat(p)
    assert st.st_ctime_ns > c_f, "link did not update ctime"
    assert st.st_mtime_ns == OLD_NS, "link changed mtime"
    st_d = os.stat(subdir / "d")
    assert st_d.st_mtime_ns > OLD_NS and st_d.st_ctime_ns > c_d, "link: parent dir times"
    os.utime(subdir / "d", ns=(OLD_NS, OLD_NS))
    c_f = os.stat(p).st_ctime_ns
    c_d = os.stat(subdir / "d").st_ctime_ns
    wait_clock_past(max(c_f, c_d))
    os.unlink(subdir / "d" / "g")
    assert os.stat(p).st_ctime_ns > c_f, "unlink did not update the remaining link's ctime"
    st_d = os.stat(subdir / "d")
    assert st_d.st_mtime_ns > OLD_NS and st_d.st_ctime_ns > c_d, "unlink: parent dir times"


def test_create_mkdir_update_parent_times(subdir):
    d = subdir / "d"
    os.mkdir(d)
    os.utime(d, ns=(OLD_NS, OLD_NS))
    c0 = os.stat(d).st_ctime_ns
    wait_clock_past(c0)
    write_file(d / "f", b"")
    st = os.stat(d)
    assert st.st_mtime_ns > OLD_NS and st.st_ctime_ns > c0, "create: parent dir times"
    os.utime(d, ns=(OLD_NS, OLD_NS))
    c1 = os.stat(d).st_ctime_ns
    wait_clock_past(c1)
    os.mkdir(d / "sub")
    st = os.stat(d)
    assert st.st_mtime_ns > OLD_NS and st.st_ctime_ns > c1, "mkdir: parent dir times"
    # a new file's three times are equal and recent
    t0 = time.time_ns()
    write_file(d / "new", b"")
    st = os.stat(d / "new")
    assert st.st_mtime_ns == st.st_ctime_ns
    assert st.st_mtime_ns >= t0 - 50_000_000


def test_times_persist(mounted):
    p = mounted.mnt / "f"
    write_file(p, b"x")
    os.utime(p, ns=(OLD_NS, OLD_NS + 99))
    ctime = os.stat(p).st_ctime_ns
    mounted.remount()
    st = os.stat(p)
    assert st.st_mtime_ns == OLD_NS + 99
    assert st.st_atime_ns == OLD_NS
    assert st.st_ctime_ns == ctime


# =========================================================================
# sizes and blocks
# =========================================================================

def test_blocks_follow_the_stored_data(subdir):
    """The kernel keeps attributes for minutes (fs.ATTR_TIMEOUT), so st_blocks reported while
    data was unflushed must be corrected once the flush stores it: an overwritten block is
    counted twice until then, and only once after."""
    p = subdir / "f"
    write_file(p, random.Random(3).randbytes(MiB))
    fsync_path(p)
    assert os.stat(p).st_blocks == MiB // 512
    reader = os.open(p, os.O_RDONLY)  # the kernel drops st_blocks at each close: none below
    try:
        fd = os.open(p, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 65536, 0)
        finally:
            os.close(fd)
        dirty = os.stat(p).st_blocks  # the old object and the rewritten block, both
        assert dirty > MiB // 512
        os.fsync(reader)  # stores the block: the old object is gone
        wait_until(lambda: os.stat(p).st_blocks == MiB // 512, 10, "st_blocks to drop back to 1 MiB")
    finally:
        os.close(reader)
    assert os.stat(p).st_size == MiB


def test_size_and_blocks(subdir):
    p = subdir / "f"
    data = random.Random(8).randbytes(10 * MiB + 17)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data[:12345])
        assert os.fstat(fd).st_size == 12345
        os.write(fd, data[12345:])
        assert os.fstat(fd).st_size == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    st = os.stat(p)
    assert st.st_size == len(data)
    assert st.st_blocks * 512 >= len(data), f"st_blocks {st.st_blocks} too small for {len(data)}"
    assert st.st_blksize > 0
    write_file(subdir / "empty", b"")
    assert os.stat(subdir / "empty").st_size == 0
    r = subprocess.run(["du", "-k", str(p)], capture_output=True, text=True)
    assert r.returncode == 0 and int(r.stdout.split()[0]) * 1024 >= len(data)


# =========================================================================
# mmap
# =========================================================================

def test_mmap_shared(mounted):
    p = mounted.mnt / "f"
    rnd = random.Random(9)
    data = bytearray(rnd.randbytes(BLOCK + 100_000))
    write_file(p, bytes(data))
    fd = os.open(p, os.O_RDWR)
    try:
        with mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            assert mm[:1000] == data[:1000]
            assert mm[BLOCK - 10:BLOCK + 10] == data[BLOCK - 10:BLOCK + 10]
            for off in (0, 4095, 65536, BLOCK - 3, BLOCK + 99_000):
                patch = rnd.randbytes(500)
                end = min(off + 500, len(data))
                mm[off:end] = patch[:end - off]
                data[off:end] = patch[:end - off]
            mm.flush()
            assert os.pread(fd, len(data), 0) == bytes(data)
    finally:
        os.close(fd)
    # a write through the fd is visible in a new map
    fd = os.open(p, os.O_RDWR)
    try:
        os.pwrite(fd, b"FROMFD", 777)
        data[777:783] = b"FROMFD"
        with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
            assert mm[770:790] == data[770:790]
    finally:
        os.close(fd)
    # extend with ftruncate and write through a new map
    fd = os.open(p, os.O_RDWR)
    try:
        newlen = len(data) + 50_000
        os.ftruncate(fd, newlen)
        data.extend(bytes(50_000))
        with mmap.mmap(fd, newlen) as mm:
            mm[newlen - 6:newlen] = b"ENDEND"
            data[newlen - 6:] = b"ENDEND"
            mm.flush()
    finally:
        os.close(fd)
    assert read_file(p) == bytes(data)
    mounted.remount()
    assert read_file(p) == bytes(data)
