"""Durability: fsync'd data survives kill -9 of the daemon; clean stops (umount,
SIGTERM, SIGINT) flush everything; after kill -9 at a random moment during
appends, every file is a prefix of what was written and at least as long as
what was fsynced."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys

import pytest

from .conftest import count_objects, write_file

# every test here runs on the local and the S3 backend (conftest.py, "S3 backend")
BACKENDS = ("local", "s3")

MiB = 1 << 20


def fsync_dir(p) -> None:
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(p) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def test_fsync_survives_kill9(mounted):
    m = mounted.mnt
    rnd = random.Random(21)
    small = rnd.randbytes(100)
    big = rnd.randbytes(9 * MiB + 7)
    os.makedirs(m / "d" / "e" / "f")
    write_file(m / "d" / "e" / "f" / "small", small, fsync=True)
    write_file(m / "big", big, fsync=True)
    # overwrite in place inside the second block, then fsync
    fd = os.open(m / "big", os.O_RDWR)
    try:
        os.pwrite(fd, b"PATCH" * 1000, 4 * MiB + 1000)
        os.fsync(fd)
    finally:
        os.close(fd)
    big = big[:4 * MiB + 1000] + b"PATCH" * 1000 + big[4 * MiB + 6000:]
    # metadata changes made durable with fsync / fsyncdir
    write_file(m / "renamed-src", b"renamed", fsync=True)
    os.rename(m / "renamed-src", m / "renamed")
    os.link(m / "big", m / "d" / "biglink")
    write_file(m / "attrs", b"a")
    os.chmod(m / "attrs", 0o640)
    os.setxattr(m / "attrs", "user.k", b"value")
    os.utime(m / "attrs", ns=(1_000_000_000_000_000_001, 1_000_000_000_000_000_002))
    fd = os.open(m / "attrs", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    write_file(m / "shrunk", b"x" * 100_000, fsync=True)
    os.truncate(m / "shrunk", 10)
    fd = os.open(m / "shrunk", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    write_file(m / "gone", b"bye", fsync=True)
    os.unlink(m / "gone")
    os.symlink("big", m / "sym")
    for d in (m / "d" / "e" / "f", m / "d" / "e", m / "d", m):
        fsync_dir(d)

    mounted.kill9()
    mounted.start()

    assert read_file(m / "d" / "e" / "f" / "small") == small
    assert read_file(m / "big") == big
    assert read_file(m / "renamed") == b"renamed"
    assert not (m / "renamed-src").exists()
    assert os.stat(m / "d" / "biglink").st_ino == os.stat(m / "big").st_ino
    assert os.stat(m / "big").st_nlink == 2
    st = os.stat(m / "attrs")
    assert oct(st.st_mode & 0o7777) == oct(0o640)
    assert os.getxattr(m / "attrs", "user.k") == b"value"
    assert st.st_mtime_ns == 1_000_000_000_000_000_002
    assert read_file(m / "shrunk") == b"x" * 10
    assert not (m / "gone").exists()
    assert os.readlink(m / "sym") == "big"


def _write_unsynced(m, rnd):
    """Writes without any fsync; returns the expected {name: bytes}."""
    expected = {}
    for i in range(20):
        data = rnd.randbytes(rnd.choice([0, 1, 5000, 70_000, 300_000]))
        write_file(m / f"f{i}", data)
        expected[f"f{i}"] = data
    big = rnd.randbytes(9 * MiB + 5)
    write_file(m / "big", big)
    expected["big"] = big
    # partial overwrite and extension of an existing file, through an open fd kept open
    fd = os.open(m / "f3", os.O_RDWR)
    os.pwrite(fd, b"Z" * 10, 2)
    os.pwrite(fd, b"tail", 500_000)
    os.close(fd)
    e = bytearray(expected["f3"])
    e.extend(bytes(max(0, 500_004 - len(e))))
    e[2:12] = b"Z" * 10
    e[500_000:500_004] = b"tail"
    expected["f3"] = bytes(e)
    os.rename(m / "f4", m / "f4-renamed")
    expected["f4-renamed"] = expected.pop("f4")
    os.unlink(m / "f5")
    del expected["f5"]
    os.mkdir(m / "dir")
    write_file(m / "dir" / "inner", b"inner")
    expected["dir/inner"] = b"inner"
    return expected


def _check(m, expected):
    names = set()
    for dirpath, _dirs, files in os.walk(m):
        for f in files:
            names.add(os.path.relpath(os.path.join(dirpath, f), m))
    assert names == set(expected), f"missing {set(expected) - names}, extra {names - set(expected)}"
    for name, data in expected.items():
        got = read_file(m / name)
        assert got == data, f"{name}: {len(got)} bytes, expected {len(data)} (content differs)"


def test_namespace_changes_commit_within_moments_without_fsync(mounted):
    """The FUSE requests' namespace changes are committed in groups (core.COMMIT_DELAY): a
    kill -9 a moment later keeps them, fsync or not, and an unlink's inode deletion too."""
    import time

    m = mounted.mnt
    os.mkdir(m / "dir")
    (m / "dir" / "empty").touch()
    os.symlink("empty", m / "dir" / "sym")
    write_file(m / "gone", b"bye", fsync=True)
    os.unlink(m / "gone")
    time.sleep(1)
    mounted.kill9()
    mounted.start()
    assert sorted(os.listdir(m / "dir")) == ["empty", "sym"]
    assert os.readlink(m / "dir" / "sym") == "empty"
    assert not (m / "gone").exists()
    db = sqlite3.connect(mounted.store / "meta.db")
    try:
        assert db.execute("SELECT count(*) FROM inodes WHERE nlink=0").fetchone()[0] == 0
    finally:
        db.close()


def test_clean_umount_flushes(mounted):
    expected = _write_unsynced(mounted.mnt, random.Random(22))
    mounted.unmount()
    mounted.start()
    _check(mounted.mnt, expected)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_and_flushes(mounted, sig):
    expected = _write_unsynced(mounted.mnt, random.Random(23))
    mounted.proc.send_signal(sig)
    try:
        mounted.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"daemon did not exit within 120 s of {sig.name}")

    def gone():
        try:
            os.stat(mounted.mnt)
        except OSError:
            return False  # a dead mount: the daemon exited without unmounting
        return not os.path.ismount(mounted.mnt)
    unmounted = gone()
    if not unmounted:
        mounted.clear_dead_mount()
    assert unmounted, f"the daemon exited on {sig.name} but left {mounted.mnt} mounted or dead"
    mounted.start()
    _check(mounted.mnt, expected)


# ---------------------------------------------------------------------------
# crash consistency under kill -9 during appends
# ---------------------------------------------------------------------------

RECORD_SRC = r'''
import random as _random

def record(seed, cycle, k, j):
    r = _random.Random(f"{seed}-{cycle}-{k}-{j}")
    size = r.choice([10, 100, 1000, 5000, 70_000, 300_000])
    return f"<{cycle}:{k}:{j}:".encode() + r.randbytes(size) + b">"
'''

WRITER_SRC = RECORD_SRC + r'''
import os, sys
mnt, side, seed, cycle, nfiles, maxrec = sys.argv[1:7]
seed, cycle, nfiles, maxrec = int(seed), int(cycle), int(nfiles), int(maxrec)
rnd = _random.Random(f"{seed}-{cycle}-writer")
fds = [os.open(os.path.join(mnt, f"c{cycle}-f{k}"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
       for k in range(nfiles)]
dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
os.fsync(dfd)
os.close(dfd)
sfd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
os.write(sfd, b"created\n")
os.fsync(sfd)
counts = [0] * nfiles
lens = [0] * nfiles
for i in range(maxrec):
    k = rnd.randrange(nfiles)
    rec = memoryview(record(seed, cycle, k, counts[k]))
    while rec:
        rec = rec[os.write(fds[k], rec):]
    counts[k] += 1
    lens[k] += len(record(seed, cycle, k, counts[k] - 1))
    if rnd.random() < 0.25:
        os.fsync(fds[k])
        os.write(sfd, f"{k} {lens[k]}\n".encode())
        os.fsync(sfd)
    sys.stdout.write(f"{i}\n")
    sys.stdout.flush()
'''

_ns: dict = {}
exec(RECORD_SRC, _ns)
record = _ns["record"]


def expected_stream(seed, cycle, k, length):
    out = bytearray()
    j = 0
    while len(out) < length:
        out += record(seed, cycle, k, j)
        j += 1
    return bytes(out)


def test_crash_consistency_kill9_during_appends(mounted, workdir):
    seed = int(os.environ.get("S3FUSE_TEST_SEED") or random.SystemRandom().randrange(2**32))
    rnd = random.Random(seed)
    nfiles = 4
    side_dir = workdir("side")
    verified: dict[str, str] = {}  # file -> sha256 after its crash

    for cycle in range(3):
        kill_at = rnd.randrange(20, 300)
        side = side_dir / f"cycle{cycle}.log"
        errf = side_dir / f"writer{cycle}.stderr"
        with open(errf, "wb") as err:
            writer = subprocess.Popen(
                [sys.executable, "-c", WRITER_SRC, str(mounted.mnt), str(side), str(seed),
                 str(cycle), str(nfiles), "100000"],
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        reported = 0
        try:
            for _line in writer.stdout:
                reported += 1
                if reported >= kill_at:
                    os.kill(mounted.pid, signal.SIGKILL)
                    break
        finally:
            # the daemon is dead (or the writer failed): stop the writer too
            if writer.poll() is None:
                writer.kill()
            writer.wait()
            writer.stdout.close()
        assert reported >= kill_at, (
            f"seed={seed} cycle={cycle}: writer stopped after {reported} records before the kill "
            f"at {kill_at}:\n{errf.read_text()}\n{mounted.describe_logs()}")
        mounted.kill9()
        mounted.start()

        fsynced = [0] * nfiles
        side_lines = side.read_text().splitlines()
        assert side_lines and side_lines[0] == "created"
        for line in side_lines[1:]:
            k, n = map(int, line.split())
            fsynced[k] = max(fsynced[k], n)
        for k in range(nfiles):
            name = f"c{cycle}-f{k}"
            p = mounted.mnt / name
            assert p.exists(), f"seed={seed} cycle={cycle}: {name} (created and dir-fsynced) is gone"
            content = read_file(p)
            assert os.stat(p).st_size == len(content)
            exp = expected_stream(seed, cycle, k, len(content))
            if content != exp[:len(content)]:
                bad = next(i for i in range(len(content)) if content[i] != exp[i])
                raise AssertionError(
                    f"seed={seed} cycle={cycle} kill_at={kill_at}: {name} is not a prefix of what "
                    f"was written: first wrong byte at {bad} of {len(content)}")
            assert len(content) >= fsynced[k], (
                f"seed={seed} cycle={cycle} kill_at={kill_at}: {name} has {len(content)} bytes, "
                f"but {fsynced[k]} were fsynced")
            verified[name] = hashlib.sha256(content).hexdigest()
        # files of earlier cycles are exactly as they were verified
        for name, h in verified.items():
            assert hashlib.sha256(read_file(mounted.mnt / name)).hexdigest() == h, (
                f"seed={seed} cycle={cycle}: {name} changed after a later crash")

    mounted.remount()
    for name, h in verified.items():
        assert hashlib.sha256(read_file(mounted.mnt / name)).hexdigest() == h, (
            f"seed={seed}: {name} changed across a clean remount")


def test_streamed_blocks_and_kill9(mounted):
    """A long sequential write stores finished blocks before their metadata commit
    (one sync and one commit for many blocks). Killed at that point, the file must read
    back as a prefix of what was written; fsynced, it must be whole; and the objects of
    uncommitted blocks must be collected at the next mount."""
    m = mounted.mnt
    rnd = random.Random(7)
    synced = rnd.randbytes(13 * MiB + 5)
    unsynced = rnd.randbytes(17 * MiB + 3)
    write_file(m / "synced", synced, fsync=True)
    fd = os.open(m / "unsynced", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        view = memoryview(unsynced)
        while view:
            view = view[os.write(fd, view):]
        # kill the daemon while blocks may be stored but not yet committed
        mounted.kill9()
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # the daemon is gone: close may fail
    mounted.clear_dead_mount()
    mounted.start()
    assert (m / "synced").read_bytes() == synced
    if (m / "unsynced").exists():
        got = (m / "unsynced").read_bytes()
        assert unsynced.startswith(got), (
            f"after kill -9 the streamed file holds {len(got)} bytes that are not a prefix of what was written")
    # no object is left that the metadata does not reference
    mounted.unmount()
    db = sqlite3.connect(f"file:{mounted.store / 'meta.db'}?mode=ro", uri=True)
    try:
        referenced = db.execute("SELECT count(*) FROM blocks").fetchone()[0]
    finally:
        db.close()
    assert count_objects(mounted.store) == referenced
    mounted.start()
