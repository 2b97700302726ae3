"""The S3 store's metadata journal, mounted on a real SeaweedFS (issue 20): after kill -9,
another host mounting from the bucket sees what fsync covered and what was closed and
shipped; the crashed host comes back without silently dropping either side's commits; a
tampered journal is refused; fsync fails with EIO while the bucket cannot take the record."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile

import pytest

from .conftest import (TRACEBACK, run_cli, s3_client, s3_list_keys, s3_set_backend_options, store_config,
                       wait_until)
from .s3server import SeaweedServer

BACKENDS = ("s3",)


def _status(mnt) -> dict:
    r = run_cli("status", mnt, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _all_shipped(mnt) -> bool:
    """Every commit so far is in the bucket and no written byte waits to be stored."""
    s = _status(mnt)
    return s["dirty_bytes"] == 0 and s["metadata_shipped_changes"] >= s["metadata_changes"]


def _fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _url(store) -> str:
    b = store_config(store)["backend"]
    return f"s3://{b['bucket']}/{b['prefix']}"


def _records(store) -> list[str]:
    return sorted(k for k in s3_list_keys(store) if k.startswith("journal/"))


def _elsewhere(workdir, store, endpoint, name):
    """Arguments to mount the store as another host would: fresh state dir, root key copy."""
    key = workdir(f"{name}-key") / "root.key"
    if not key.exists():
        shutil.copy(store / "root.key", key)
    state, mnt = workdir(f"{name}-state") / "state", workdir(f"{name}-mnt")
    return state, mnt, ("--state-dir", state, "--endpoint-url", endpoint, "--root-key-file", key)


def test_kill9_then_another_host_sees_what_was_fsynced_and_shipped(mount_factory, workdir, s3_server,
                                                                 store_backend):
    m = mount_factory(start=False)
    s3_set_backend_options(m.store, metadata_sync_seconds=1, snapshot_interval=3600)
    m.start()
    mnt = m.mnt
    for sub in ("tree/a", "tree/b/c"):
        os.makedirs(mnt / sub)
        (mnt / sub / "f").write_bytes(os.urandom(5000))
    (mnt / "early").write_bytes(b"early")
    assert run_cli("sync", mnt).returncode == 0
    # closed without fsync, and a removed tree: shipped by the daemon within the interval
    closed = os.urandom(300_000)
    (mnt / "closed").write_bytes(closed)
    shutil.rmtree(mnt / "tree")
    wait_until(lambda: _all_shipped(mnt), 60, "the daemon to ship the closed file's metadata")
    # an fsync'd file, and a rename whose directory was fsync'd
    os.mkdir(mnt / "d")
    synced = os.urandom(70_000)
    fd = os.open(mnt / "d" / "synced", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, synced)
    os.fsync(fd)
    os.close(fd)
    (mnt / "d" / "old").write_bytes(b"renamed")
    os.rename(mnt / "d" / "old", mnt / "d" / "new")
    _fsync_path(mnt / "d")
    m.kill9()

    state, mnt2, args = _elsewhere(workdir, m.store, s3_server.endpoint, "b")
    url = _url(m.store)
    r = run_cli("mount", url, mnt2, *args)
    assert r.returncode == 0, r.stderr
    try:
        assert (mnt2 / "early").read_bytes() == b"early"
        assert (mnt2 / "closed").read_bytes() == closed
        assert (mnt2 / "d" / "synced").read_bytes() == synced
        assert (mnt2 / "d" / "new").exists()  # the entry; its data was not fsync'd
        assert not (mnt2 / "d" / "old").exists()
        assert not (mnt2 / "tree").exists()  # the removed tree stays removed
        (mnt2 / "fromB").write_bytes(b"written by B")
    finally:
        assert run_cli("umount", mnt2).returncode == 0
    log = (state / "s3fuse.log").read_text()
    assert "journal record(s)" in log and TRACEBACK not in log

    # A comes back on its own state directory. If it died with commits it had not shipped
    # (a write-back committed after the last fsync), it refuses once, naming its kept copy;
    # either way it then holds B's state
    r = run_cli("mount", m.store, mnt)
    if r.returncode != 0:
        kept = list(m.store.glob("diverged-*"))
        assert len(kept) == 1 and str(kept[0]) in r.stderr and TRACEBACK not in r.stderr, r.stderr
        r = run_cli("mount", m.store, mnt)
    assert r.returncode == 0, r.stderr
    try:
        assert (mnt / "fromB").read_bytes() == b"written by B"
        assert (mnt / "d" / "synced").read_bytes() == synced
        assert (mnt / "closed").read_bytes() == closed
    finally:
        assert run_cli("umount", mnt).returncode == 0


def test_tampered_journal_is_refused(mount_factory, workdir, s3_server, store_backend):
    m = mount_factory(start=False)
    s3_set_backend_options(m.store, metadata_sync_seconds=3600, snapshot_interval=3600)
    m.start()
    for i in range(4):
        (m.mnt / f"f{i}").write_bytes(b"x" * (i + 1))
        assert run_cli("sync", m.mnt).returncode == 0
    m.kill9()
    recs = _records(m.store)
    assert len(recs) >= 4, recs
    b = store_config(m.store)["backend"]
    s3 = s3_client()
    full = {k: s3.get_object(Bucket=b["bucket"], Key=f"{b['prefix']}/{k}")["Body"].read() for k in recs}
    last, first = recs[-1], recs[0]

    def put(key, body):
        s3.put_object(Bucket=b["bucket"], Key=f"{b['prefix']}/{key}", Body=body)

    def delete(key):
        s3.delete_object(Bucket=b["bucket"], Key=f"{b['prefix']}/{key}")

    def refused(what, expect):
        state, mnt, args = _elsewhere(workdir, m.store, s3_server.endpoint, "t")
        r = run_cli("mount", _url(m.store), mnt, *args)
        assert r.returncode != 0, what
        assert expect in r.stderr and TRACEBACK not in r.stderr, (what, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (state / "meta.db").exists(), what  # nothing was changed
        r = run_cli("fsck", m.store, "--quick")  # fsck of the crashed host's state reports it too
        assert r.returncode == 4 and "journal" in r.stdout and expect in r.stdout, (what, r.stdout, r.stderr)
        for k, body in full.items():
            put(k, body)

    delete(recs[1])
    refused("a gap", "has a gap")
    put(recs[1], full[recs[2]])
    put(recs[2], full[recs[1]])
    refused("reordered", "reordered or replayed")
    put(last, full[first])
    refused("replayed", "reordered or replayed")
    other = init_other_store(workdir)
    put(last, other)
    refused("another store's record", "belongs to store")
    altered = bytearray(full[last])
    altered[-3] ^= 1
    put(last, bytes(altered))
    refused("altered", "failed authentication")

    # a cut tail looks current to a new host, but not to the host that has seen it
    delete(last)
    r = run_cli("mount", m.store, m.mnt, "--foreground")
    assert r.returncode != 0 and "refusing an older state" in r.stderr and TRACEBACK not in r.stderr
    put(last, full[last])
    m.start()
    assert (m.mnt / "f3").read_bytes() == b"xxxx"


def init_other_store(workdir) -> bytes:
    """A journal record of another store."""
    from s3fuse import journal

    return journal.seal(os.urandom(32), os.urandom(16), 1, 1, bytes(32), journal.Entries())


@pytest.fixture
def own_server():
    base = tempfile.mkdtemp(prefix="s3fuse-weed-journal-", dir="/tmp")
    srv = SeaweedServer(base).start()
    os.environ.update(srv.env())
    srv.create_bucket("journal")
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_fsync_fails_while_the_bucket_is_down_and_a_diverged_host_is_refused(own_server, workdir, mount_factory,
                                                                            store_backend):
    state = workdir("store") / "store"
    r = run_cli("init", "s3://journal/fs", "--endpoint-url", own_server.endpoint, "--state-dir", state)
    assert r.returncode == 0, r.stderr
    s3_set_backend_options(state, retry_budget=2, metadata_sync_seconds=3600, snapshot_interval=3600)
    m = mount_factory(state)
    (m.mnt / "base").write_bytes(b"base")
    assert run_cli("sync", m.mnt).returncode == 0

    # the journal put fails: fsync says EIO; the next fsync that succeeds covers the change
    own_server.stop()
    os.mkdir(m.mnt / "x1")
    with pytest.raises(OSError) as exc:
        _fsync_path(m.mnt)
    assert exc.value.errno == errno.EIO
    own_server.start()
    _fsync_path(m.mnt)

    # A stores a file's object but has not shipped the commit naming it yet; then it commits
    # while the bucket is unreachable, and dies
    data_a = os.urandom(100_000)
    (m.mnt / "dataA").write_bytes(data_a)
    wait_until(lambda: _status(m.mnt)["dirty_bytes"] == 0, 60, "A to store dataA's object")
    own_server.stop()
    os.mkdir(m.mnt / "onlyA")
    with pytest.raises(OSError):
        _fsync_path(m.mnt)
    m.kill9()
    own_server.start()

    bstate, bmnt, args = _elsewhere(workdir, state, own_server.endpoint, "b")
    r = run_cli("mount", "s3://journal/fs", bmnt, *args)
    assert r.returncode == 0, r.stderr
    try:
        assert (bmnt / "base").read_bytes() == b"base"
        assert (bmnt / "x1").is_dir()
        assert not (bmnt / "onlyA").exists() and not (bmnt / "dataA").exists()
        (bmnt / "fromB").write_bytes(b"B")
    finally:
        assert run_cli("umount", bmnt).returncode == 0
    # B's collector left the object only A's unshipped commit names
    blog = (bstate / "s3fuse.log").read_text()
    assert "kept 1 unreferenced objects" in blog and "removed 0 unreferenced objects" in blog, blog

    # A's own state directory holds a commit the bucket lacks, and the bucket moved on
    r = run_cli("mount", state, m.mnt)
    assert r.returncode != 0 and TRACEBACK not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    kept = list(state.glob("diverged-*"))
    assert len(kept) == 1 and str(kept[0]) in r.stderr
    r = run_cli("diverged", kept[0])
    assert r.returncode == 0, r.stderr
    assert "+ /onlyA" in r.stdout and "+ /dataA" in r.stdout and "- /fromB" in r.stdout and "/base" not in r.stdout, r.stdout
    # mounted again, A has the bucket's state: B's writes, not its own lost commit
    m.start()
    assert (m.mnt / "fromB").read_bytes() == b"B"
    assert not (m.mnt / "onlyA").exists()
    assert (kept[0] / "meta.db").exists()


def test_settings_sealed_on_one_host_reach_a_new_host(mount_factory, workdir, s3_server, store_backend):
    """store.json's authenticated settings, changed and sealed on host A, are what a host
    starting from the bucket gets (not the bucket's copy from init, which still authenticates)."""
    m = mount_factory(start=False)
    cfg_path = m.store / "store.json"
    raw = json.loads(cfg_path.read_text())
    raw["default_sse"] = "aws:kms:alias/team"
    cfg_path.write_text(json.dumps(raw))
    r = run_cli("seal-settings", m.store)
    assert r.returncode == 0, r.stderr
    m.start()
    os.mkdir(m.mnt / "d")
    m.unmount()
    sealed = store_config(m.store)

    state, mnt2, args = _elsewhere(workdir, m.store, s3_server.endpoint, "b")
    r = run_cli("mount", _url(m.store), mnt2, *args)
    assert r.returncode == 0, r.stderr
    try:
        assert os.listdir(mnt2) == ["d"]
    finally:
        assert run_cli("umount", mnt2).returncode == 0
    got = json.loads((state / "store.json").read_text())
    assert got["default_sse"] == "aws:kms:alias/team"
    assert got["meta_mac"] == sealed["meta_mac"] and got["format"] == sealed["format"]


def test_an_answered_s3_api_put_is_in_the_bucket(mount_factory, workdir, s3_server, store_backend):
    """A PUT through the mount's S3 API is answered once its metadata is in the bucket, as an
    fsync: a host that mounts from the bucket after a kill -9 has the object."""
    from .s3api_helpers import client, endpoint_of, new_key

    m = mount_factory(start=False, extra_args=["--s3-api", "127.0.0.1:0"])
    s3_set_backend_options(m.store, metadata_sync_seconds=3600, snapshot_interval=3600)
    m.start()
    os.mkdir(m.mnt / "bkt")
    endpoint = endpoint_of(m)
    body = os.urandom(50_000)
    client(endpoint, *new_key(m)).put_object(Bucket="bkt", Key="a/b/obj", Body=body)
    m.kill9()

    state, mnt2, args = _elsewhere(workdir, m.store, s3_server.endpoint, "b")
    r = run_cli("mount", _url(m.store), mnt2, *args)
    assert r.returncode == 0, r.stderr
    try:
        assert (mnt2 / "bkt" / "a" / "b" / "obj").read_bytes() == body
    finally:
        assert run_cli("umount", mnt2).returncode == 0
