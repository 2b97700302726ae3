"""Fault tests: the S3 server stops during a write workload and comes back.

Fsynced data is never lost, the daemon stays up, calls fail with EIO (only after the
retry budget, here shortened to 2 s through the store's backend settings), and the
mount recovers by itself once the server is back. The test runs its own SeaweedFS
(the session's server is shared by other tests)."""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
import threading

import pytest

from .conftest import TRACEBACK, run_cli, s3_set_backend_options, wait_until
from .s3server import SeaweedServer

BACKENDS = ("s3",)


@pytest.fixture
def own_server():
    base = tempfile.mkdtemp(prefix="s3fuse-weed-fault-", dir="/tmp")
    srv = SeaweedServer(base).start()
    os.environ.update(srv.env())
    srv.create_bucket("faults")
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


def _write_synced(path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class Writer(threading.Thread):
    """Writes and fsyncs new files until told to stop; remembers what was fsynced."""

    def __init__(self, mnt):
        super().__init__(daemon=True)
        self.mnt = mnt
        self.synced: dict[str, bytes] = {}
        self.errors: list[int] = []
        self.stop = threading.Event()
        self.rnd = random.Random(5)

    def run(self):
        i = 0
        while not self.stop.is_set():
            name = f"w{i:05d}"
            data = self.rnd.randbytes(self.rnd.choice([3000, 70_000, 300_000, 1_500_000]))
            try:
                _write_synced(self.mnt / name, data)
                self.synced[name] = data
            except OSError as exc:
                self.errors.append(exc.errno)
            i += 1


def test_server_stops_during_writes_and_comes_back(own_server, workdir, mount_factory, store_backend):
    state = workdir("store") / "store"
    r = run_cli("init", "s3://faults/fs", "--endpoint-url", own_server.endpoint, "--state-dir", state)
    assert r.returncode == 0, r.stderr
    s3_set_backend_options(state, retry_budget=2, cache_mib=0)
    m = mount_factory(state)
    before = {f"b{i}": os.urandom(200_000) for i in range(5)}
    for name, data in before.items():
        _write_synced(m.mnt / name, data)

    w = Writer(m.mnt)
    w.start()
    wait_until(lambda: len(w.synced) >= 5, 60, "the writer to fsync some files")
    own_server.stop()
    wait_until(lambda: len(w.errors) >= 2, 120, "fsync to fail while the server is down")
    # the daemon is up and serves what does not need the server
    assert m.proc.poll() is None
    assert {"b0", "b1"} <= set(os.listdir(m.mnt))
    assert os.stat(m.mnt / "b0").st_size == 200_000
    n_synced = len(w.synced)

    own_server.start()  # same ports, same data
    wait_until(lambda: len(w.synced) >= n_synced + 5, 120, "writes to succeed again without a remount")
    w.stop.set()
    w.join(60)
    assert set(w.errors) == {errno.EIO}, w.errors
    log = m.log_text()
    assert "gave up after 2 s of retries" in log  # one line per failed request, after the budget

    m.unmount()
    shutil.rmtree(state / "cache", ignore_errors=True)
    m.start()  # everything below is read back from the server
    for name, data in {**before, **w.synced}.items():
        assert (m.mnt / name).read_bytes() == data, name
    assert TRACEBACK not in m.log_text(all_generations=True)
