"""No accepted write is lost (issue 17): a failure stays with its file, a stop keeps what it
cannot store, and a key withdrawn after a file was opened for writing does not lose its data.

Real mounts throughout; failures come from the fault plan (s3fuse/backends/faulty.py), a
small tmpfs, or keys removed and disabled through the CLI."""

from __future__ import annotations

import errno
import os
import random

from .conftest import run_cli, wait_until
from .conftest import write_file as write
from .test_faults import Plan, fsync, plan  # noqa: F401 - the fixture

BIG = 100_000  # the bad file's size: the fault rule singles out objects at least this large


def test_one_files_put_failure_does_not_hold_back_the_others(plan, mount_factory):  # noqa: F811
    m = mount_factory()
    mnt = m.mnt
    rnd = random.Random(17)
    plan.set([{"op": "put", "error": "EIO", "min_size": BIG}])
    bad = rnd.randbytes(BIG + 1000)
    good = {f"g{i}": rnd.randbytes(1000 + i) for i in range(8)}
    # written together, closed together: one flush batch
    write(mnt / "bad", bad)
    for name, data in good.items():
        write(mnt / name, data)
    ino = os.stat(mnt / "bad").st_ino
    wait_until(lambda: f"storing inode {ino} (/bad) failed" in m.log_text(), 30,
               "the store of the bad file to fail")
    # an unrelated file's fsync succeeds; the bad file's reports the error
    assert fsync(mnt / "g0") == 0
    assert fsync(mnt / "bad") == errno.EIO
    assert (mnt / "bad").read_bytes() == bad  # kept in memory meanwhile
    assert "flush of inode(s)" not in m.log_text()  # no batch failure: only the bad file's own
    r = run_cli("status", mnt)
    assert r.returncode == 0 and m.proc.poll() is None
    # the good files were committed although the bad one failed: they survive kill -9
    m.kill9()
    plan.set([])
    m.start()
    for name, data in good.items():
        assert (mnt / name).read_bytes() == data, name
    assert os.stat(mnt / "bad").st_size in (0, len(bad))  # not fsync'd: may be lost by kill -9


def test_failing_file_is_retried_alone_and_stored_once_the_fault_ends(plan, mount_factory):  # noqa: F811
    m = mount_factory()
    mnt = m.mnt
    rnd = random.Random(18)
    plan.set([{"op": "put", "error": "EIO", "min_size": BIG}])
    big = rnd.randbytes(5_000_000)  # several blocks, stored by tasks of their own
    write(mnt / "big", big)
    ino = os.stat(mnt / "big").st_ino
    wait_until(lambda: f"storing inode {ino} (/big) failed" in m.log_text(), 30, "the big file to fail")
    # files written meanwhile are stored on their own schedule, not held up by the retries
    for i in range(5):
        data = rnd.randbytes(500)
        write(mnt / f"s{i}", data)
        assert fsync(mnt / f"s{i}") == 0
    plan.set([])
    wait_until(lambda: f"inode {ino} is stored now" in m.log_text(), 60, "the retry to store the big file")
    assert fsync(mnt / "big") == 0
    m.remount()
    assert (mnt / "big").read_bytes() == big
