"""Small files are fetched before their first read: the one being opened, and the next ones of a
directory whose files a reader opens in readdir order (core._read_ahead_names). What is
fetched ahead must be exactly what a read returns, also when the file changed in between, and
files whose keys are audited per use (SSE-KMS) are never fetched ahead of their own open."""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest

from .conftest import run_cli, write_file

BACKENDS = ("local", "s3")

KiB = 1 << 10


def status(m) -> dict:
    r = run_cli("status", m.mnt, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def make_files(d, n: int, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    os.mkdir(d)
    files = {}
    for i in range(n):
        name = f"f{i:03d}"  # created in this order: readdir order is creation order
        files[name] = rng.randbytes(rng.choice([1, 3000, 4096, 70 * KiB, 256 * KiB]))
        write_file(d / name, files[name])
    return files


def read_in_order(d, names) -> dict[str, bytes]:
    out = {}
    for name in names:
        with open(d / name, "rb") as f:
            out[name] = f.read()
    return out


def write_then_read_fresh(mounted, d, files: dict[str, bytes]) -> tuple[dict, dict]:
    """Write `files` into the directory `d`, remount (nothing cached), read them back in name
    order (their readdir order here) and check them. -> the status before and after the reads."""
    for name, data in files.items():
        write_file(d / name, data)
    mounted.remount()
    before = status(mounted)
    assert read_in_order(d, sorted(files)) == files
    return before, status(mounted)


def test_files_read_in_directory_order_are_fetched_ahead(mounted):
    files = make_files(mounted.mnt / "d", 60, seed=1)
    mounted.remount()  # nothing cached
    names = os.listdir(mounted.mnt / "d")
    assert names == sorted(files), "readdir order should be creation order here"
    before = status(mounted)
    assert read_in_order(mounted.mnt / "d", names) == files
    after = status(mounted)
    ahead = after["prefetches_ahead"] - before["prefetches_ahead"]
    assert ahead >= 40, f"only {ahead} of 60 files were fetched ahead of the reader"
    # nearly every read found its file fetched already, or waited for that fetch
    assert after["read_fetches"] - before["read_fetches"] <= 5
    # tar reads a tree in the same order, with the same bytes
    tar = subprocess.run(["tar", "-cf", "-", "-C", str(mounted.mnt), "d"], capture_output=True, check=True)
    assert len(tar.stdout) > sum(len(v) for v in files.values())


def test_a_directory_walk_reads_each_entry_from_the_database_once(mounted):
    """The walk reads the next entries 16 at a time; when fetches are at their limit it keeps
    the ones it could not fetch yet for later, rather than reading them again at each open."""
    d = mounted.mnt / "d"
    os.mkdir(d)
    rng = random.Random(5)
    before, after = write_then_read_fresh(mounted, d, {f"f{i:03d}": rng.randbytes(4096) for i in range(320)})
    assert after["prefetches_ahead"] - before["prefetches_ahead"] >= 200
    queries = after["walk_queries"] - before["walk_queries"]
    assert 320 // 16 - 1 <= queries <= 320 // 16 + 1, f"{queries} queries for 20 pages of 16 entries"


def test_a_file_changed_after_it_was_fetched_ahead_reads_new(mounted):
    files = make_files(mounted.mnt / "d", 40, seed=2)
    mounted.remount()
    d = mounted.mnt / "d"
    names = sorted(files)
    # open the first few in order: the next ones are fetched ahead
    assert read_in_order(d, names[:4]) == {n: files[n] for n in names[:4]}
    # change files that were fetched ahead (rewrite, truncate, append, replace by rename)
    files[names[5]] = b"rewritten"
    write_file(d / names[5], files[names[5]])
    os.truncate(d / names[6], 10)
    files[names[6]] = files[names[6]][:10] + bytes(max(0, 10 - len(files[names[6]])))
    with open(d / names[7], "ab") as f:
        f.write(b"more")
    files[names[7]] += b"more"
    write_file(d / "new", b"replacement")
    os.rename(d / "new", d / names[8])
    files[names[8]] = b"replacement"
    assert read_in_order(d, names[4:]) == {n: files[n] for n in names[4:]}
    mounted.remount()
    assert read_in_order(d, names) == files


def test_kms_files_are_not_fetched_ahead(mounted):
    d = mounted.mnt / "kms"
    os.mkdir(d)
    r = subprocess.run(["setfattr", "-n", "user.s3fuse.sse", "-v", "aws:kms", str(d)], capture_output=True, check=False)
    assert r.returncode == 0, r.stderr
    rng = random.Random(3)
    before, after = write_then_read_fresh(mounted, d, {f"f{i:03d}": rng.randbytes(2000) for i in range(20)})
    assert after["prefetches_ahead"] == before["prefetches_ahead"]
    # each file was still fetched at its own open (or read), once
    assert after["prefetches"] - before["prefetches"] + after["read_fetches"] - before["read_fetches"] >= 20


def test_a_sequential_reader_has_the_next_blocks_read_ahead(mounted):
    """Entering a block, a sequential reader has the next blocks' objects read ahead (over S3
    into the object cache, from a local store into the kernel's page cache) and the next block
    decrypted into the segment cache; what it reads is the file."""
    data = random.Random(4).randbytes(5 * (4 << 20) + 123)
    write_file(mounted.mnt / "big", data)
    mounted.remount()
    before = status(mounted)
    got = bytearray()
    with open(mounted.mnt / "big", "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            got += chunk
    assert got == data
    after = status(mounted)
    key = "objects_read_ahead" if "objects_read_ahead" in after else "s3_prefetches"
    assert after[key] - before.get(key, 0) >= 3, (key, after[key])
    if "s3_prefetch_handoffs" in after:  # over S3, prefetched objects reach the read from memory
        assert after["s3_prefetch_handoffs"] - before["s3_prefetch_handoffs"] >= 3, after
    # and the next block was fetched and authenticated ahead of the reader (the read cache decrypts ahead)
    assert after["blocks_read_ahead"] - before["blocks_read_ahead"] >= 3, after["blocks_read_ahead"]
    # a second pass over the file, through the same handle (it went back) and through a new
    # one, is read ahead again: what the first pass asked for is not taken as done
    with open(mounted.mnt / "big", "rb", buffering=0) as f:
        assert f.read(len(data)) == data
        second_pass(mounted, f, data)
    with open(mounted.mnt / "big", "rb", buffering=0) as f:
        second_pass(mounted, f, data)


def second_pass(m, f, data: bytes) -> None:
    """Read `f` again from its start, with the kernel's cached pages of it dropped first, and
    check that it was read ahead."""
    f.seek(0)
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the kernel reads it from us again
    before = status(m)
    got = bytearray()
    while chunk := f.read(1 << 20):
        got += chunk
    assert got == data
    after = status(m)
    assert after["blocks_read_ahead"] - before["blocks_read_ahead"] >= 3, after["blocks_read_ahead"]


@pytest.mark.local_only
@pytest.mark.parametrize("segment_kib", [512, 1024])
def test_a_store_with_segments_larger_than_the_read_around_reads_its_files(mount_factory, workdir, segment_kib):
    """`s3fuse init --segment-size-kib` allows segments up to the block size. A random reader's
    miss is served with the aligned READ_AROUND (256 KiB) around it: with larger segments that
    is the one segment missed (it divided by zero, and every first read of a file was EIO)."""
    store = workdir("big-segments") / "store"
    r = run_cli("init", store, "--block-size-kib", 1024, "--segment-size-kib", segment_kib)
    assert r.returncode == 0, r.stderr
    m = mount_factory(store=store)
    data = random.Random(segment_kib).randbytes(3 * (1 << 20) + 777)
    write_file(m.mnt / "f", data)
    m.remount()
    rng = random.Random(1)
    with open(m.mnt / "f", "rb", buffering=0) as f:
        for _ in range(40):  # random reads first: each a miss the read-around serves
            off = rng.randrange(len(data))
            assert os.pread(f.fileno(), 4096, off) == data[off:off + 4096], off
    m.remount()
    with open(m.mnt / "f", "rb", buffering=0) as f:  # and a sequential pass, from a cold cache
        got = bytearray()
        while chunk := f.read(1 << 20):
            got += chunk
    assert got == data
    assert status(m)["integrity_errors"] == 0


def test_files_fetched_ahead_are_read_without_a_read_request(mounted):
    """A small file whose plaintext was fetched ahead is handed to the kernel's page cache at
    its open (the read cache pushes it at open): the reader's read is answered by the kernel, and is the file."""
    files = make_files(mounted.mnt / "d", 60, seed=5)
    mounted.remount()
    d = mounted.mnt / "d"
    before = status(mounted)
    assert read_in_order(d, sorted(files)) == files
    after = status(mounted)
    served = after["pagecache_opens_served"] - before["pagecache_opens_served"]
    reads = after["reads"] - before["reads"]
    assert served >= 40, f"only {served} of 60 opens found their file fetched ahead"
    assert reads <= 60 - served + 5, f"{reads} READ requests although {served} files were in the page cache"


def test_an_open_never_hands_over_data_older_than_another_handle_wrote(mounted):
    """The data handed to the kernel at an open are the stored ones; a handle open for writing
    may hold newer ones in the kernel's page cache (not yet written back). With another handle
    open nothing is handed over, so a reader sees the writer's bytes."""
    files = make_files(mounted.mnt / "d", 30, seed=6)
    mounted.remount()
    d = mounted.mnt / "d"
    names = sorted(files)
    assert read_in_order(d, names[:3]) == {n: files[n] for n in names[:3]}  # the rest: fetched ahead
    for name in names[3:20]:
        with open(d / name, "r+b", buffering=0) as w:
            w.write(b"NEW")  # in the kernel's page cache, dirty
            with open(d / name, "rb") as r:
                got = r.read()
            assert got[:3] == b"NEW" and got[3:] == files[name][3:], name
        files[name] = b"NEW" + files[name][3:]
    # after the writers closed, opens may hand data over again: still the new bytes
    assert read_in_order(d, names) == files
