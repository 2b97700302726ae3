"""Reads hand the rest of what they fetched to the kernel's page cache (s3fuse/pagecache.py).

What is pushed must be exactly what a read would return, and must never land over data the
kernel holds that is newer: these tests check both, with writers, truncates and readers
racing on one file.
"""

from __future__ import annotations

import json
import os
import random
import threading

from .conftest import run_cli, wait_until, write_file

BACKENDS = ("local", "s3")

KiB, MiB = 1 << 10, 1 << 20
SEGMENT = 64 * KiB
READ_AROUND = 256 * KiB  # data.READ_AROUND
BLOCK = 4 * MiB
PAGE = 4 * KiB


def status(m) -> dict:
    r = run_cli("status", m.mnt, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def pushes_settled(m) -> dict:
    """Status once no push is queued or under way (polled, with a deadline)."""
    seen = {}

    def settled() -> bool:
        seen.update(status(m))
        return seen["pagecache_pushes_pending"] == 0

    wait_until(settled, 30, "queued page-cache pushes to finish")
    return seen


def test_a_random_read_leaves_what_it_fetched_in_the_page_cache(mounted):
    """A miss fetches an aligned 256 KiB (over S3: the whole object); the rest of it goes to
    the kernel, so later reads of it never reach the daemon. Another block's pages do."""
    data = random.Random(1).randbytes(BLOCK + MiB)
    write_file(mounted.mnt / "f", data, fsync=True)
    mounted.remount()  # a cold kernel page cache and an empty segment cache

    fd = os.open(mounted.mnt / "f", os.O_RDONLY)
    try:
        seg = 3 * SEGMENT
        assert os.pread(fd, PAGE, seg + 2 * PAGE) == data[seg + 2 * PAGE : seg + 3 * PAGE]
        before = pushes_settled(mounted)
        assert before["pagecache_bytes_pushed"] >= READ_AROUND - PAGE
        # every other page around it now comes from the kernel, with the right bytes
        for off in range(0, READ_AROUND, PAGE):
            assert os.pread(fd, PAGE, off) == data[off : off + PAGE], f"page at {off}"
        after = status(mounted)
        assert after["reads"] == before["reads"], "reads of pushed pages reached the daemon"
        # a page of the next block was not pushed: it is read from the daemon
        assert os.pread(fd, PAGE, BLOCK + SEGMENT) == data[BLOCK + SEGMENT : BLOCK + SEGMENT + PAGE]
        assert status(mounted)["reads"] == after["reads"] + 1
    finally:
        os.close(fd)


def test_a_write_after_a_push_is_what_later_reads_see(mounted):
    rng = random.Random(2)
    data = bytearray(rng.randbytes(2 * MiB + 1234))  # a partial last page too
    path = mounted.mnt / "f"
    write_file(path, bytes(data), fsync=True)
    mounted.remount()

    reader = os.open(path, os.O_RDONLY)
    try:
        for off in range(PAGE, len(data), SEGMENT):  # one page per segment: pushes the rest
            os.pread(reader, PAGE, off)
        pushes_settled(mounted)
        writer = os.open(path, os.O_RDWR)
        patch = rng.randbytes(3 * SEGMENT)
        os.pwrite(writer, patch, 5 * SEGMENT + 100)
        data[5 * SEGMENT + 100 : 5 * SEGMENT + 100 + len(patch)] = patch
        # reading while the writer is open: its pages, never a push over them
        for off in range(0, len(data), SEGMENT // 2):
            assert os.pread(reader, PAGE, off) == bytes(data[off : off + PAGE]), f"at {off}"
        os.close(writer)
        os.truncate(path, MiB + 5)  # a truncate without an open handle
        del data[MiB + 5 :]
        assert os.fstat(reader).st_size == len(data)
        for off in range(0, len(data) + SEGMENT, PAGE * 7):
            assert os.pread(reader, PAGE, off) == bytes(data[off : off + PAGE]), f"at {off}"
        pushes_settled(mounted)
        assert os.fstat(reader).st_size == len(data), "a push extended the file"
    finally:
        os.close(reader)
    mounted.remount()
    assert path.read_bytes() == bytes(data)


def test_pushes_never_go_over_newer_data(mounted):
    """Random readers race with writers that open, write, truncate and close, over and over.
    A push of stale data would show in the page cache afterwards, or after a remount."""
    rng = random.Random(3)
    path = mounted.mnt / "f"
    model = bytearray(rng.randbytes(MiB))
    write_file(path, bytes(model), fsync=True)
    stop = threading.Event()
    failures: list[BaseException] = []

    def read_randomly(seed: int) -> None:
        r = random.Random(seed)
        try:
            while not stop.is_set():
                fd = os.open(path, os.O_RDONLY)
                try:
                    for _ in range(50):
                        os.pread(fd, PAGE, r.randrange(0, 2 * MiB, PAGE))
                finally:
                    os.close(fd)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    readers = [threading.Thread(target=read_randomly, args=(seed,)) for seed in (10, 11)]
    for t in readers:
        t.start()
    try:
        for round_ in range(150):
            fd = os.open(path, os.O_RDWR)
            try:
                for _ in range(rng.randrange(1, 4)):
                    off, n = rng.randrange(0, 2 * MiB), rng.randrange(1, 3 * SEGMENT)
                    chunk = rng.randbytes(n)
                    os.pwrite(fd, chunk, off)
                    if off > len(model):
                        model.extend(bytes(off - len(model)))
                    model[off : off + n] = chunk
                if round_ % 5 == 0:
                    size = rng.randrange(0, 2 * MiB)
                    os.ftruncate(fd, size)
                    del model[size:]
                    model.extend(bytes(size - len(model)))
            finally:
                os.close(fd)
            if round_ % 7 == 0:  # a truncate through the path, with no handle open for writing
                size = rng.randrange(0, 2 * MiB)
                os.truncate(path, size)
                del model[size:]
                model.extend(bytes(size - len(model)))
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not failures, failures
    st = pushes_settled(mounted)
    assert st["pagecache_bytes_pushed"] > 0, "the readers never caused a push: the test tests nothing"
    assert os.stat(path).st_size == len(model)
    assert path.read_bytes() == bytes(model), "the kernel's page cache holds stale data"
    mounted.remount()
    assert path.read_bytes() == bytes(model), "the store holds stale data"
