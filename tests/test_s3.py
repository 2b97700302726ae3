"""The S3 backend against a real SeaweedFS: ranged reads, multipart, cache, snapshots,
the mount lease, clear errors, and mounting on a new machine from the bucket alone."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .conftest import (TRACEBACK, init_s3_store, new_s3_url, run_cli, s3_list_keys, s3_list_objects,
                       s3_set_backend_options, store_config)

BACKENDS = ("s3",)


def test_write_read_remount(mount_factory, store_backend):
    m = mount_factory()
    data = os.urandom(3 << 20)
    (m.mnt / "a").write_bytes(data)
    (m.mnt / "d").mkdir()
    (m.mnt / "d" / "small").write_bytes(b"hello")
    m.remount()
    assert (m.mnt / "a").read_bytes() == data
    assert (m.mnt / "d" / "small").read_bytes() == b"hello"
    keys = s3_list_keys(m.store)
    assert "store.json" in keys
    assert any(k.startswith("snapshots/") for k in keys)
    assert len(s3_list_objects(m.store)) >= 2
    # nothing of the store lives in a local objects directory
    assert not (m.store / "objects").exists()


def status(m) -> dict[str, str]:
    r = run_cli("status", m.mnt, "--verbose")
    assert r.returncode == 0, r.stderr
    return dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)


def _url(store: Path) -> str:
    b = store_config(store)["backend"]
    return f"s3://{b['bucket']}/{b['prefix']}"


def test_mount_on_a_new_machine_from_bucket_and_root_key(mount_factory, workdir, s3_server, store_backend):
    m = mount_factory()
    files = {"a": os.urandom(5 << 20 | 123), "d/b": b"small file", "d/e/c": os.urandom(70000)}
    for name, data in files.items():
        (m.mnt / name).parent.mkdir(parents=True, exist_ok=True)
        (m.mnt / name).write_bytes(data)
    os.symlink("d/b", m.mnt / "link")
    os.setxattr(m.mnt / "a", "user.colour", b"blue")
    m.unmount()
    key_copy = workdir("keys") / "root.key"
    shutil.copy(m.store / "root.key", key_copy)
    url = _url(m.store)
    shutil.rmtree(m.store)  # the old machine is gone

    state, mnt = workdir("state2") / "state", workdir("mnt2")
    r = run_cli("mount", url, mnt, "--state-dir", state, "--endpoint-url", s3_server.endpoint)
    assert r.returncode != 0 and "--root-key-file" in r.stderr and TRACEBACK not in r.stderr
    r = run_cli("mount", url, mnt, "--state-dir", state, "--endpoint-url", s3_server.endpoint,
                "--root-key-file", key_copy)
    assert r.returncode == 0, r.stderr
    try:
        for name, data in files.items():
            assert (mnt / name).read_bytes() == data
        assert os.readlink(mnt / "link") == "d/b"
        assert os.getxattr(mnt / "a", "user.colour") == b"blue"
        (mnt / "new").write_bytes(b"written on the new machine")
    finally:
        r = run_cli("umount", mnt)
    assert r.returncode == 0, r.stderr
    log = (state / "s3fuse.log").read_text()
    assert "restoring metadata snapshot" in log and TRACEBACK not in log
    # and the first machine's state directory, rebuilt again from the bucket, sees it too
    state3, mnt3 = workdir("state3") / "state", workdir("mnt3")
    r = run_cli("mount", url, mnt3, "--state-dir", state3, "--endpoint-url", s3_server.endpoint,
                "--root-key-file", key_copy)
    assert r.returncode == 0, r.stderr
    try:
        assert (mnt3 / "new").read_bytes() == b"written on the new machine"
    finally:
        assert run_cli("umount", mnt3).returncode == 0


def test_passphrase_store_moves_with_the_passphrase_alone(workdir, s3_server, store_backend):
    """init s3://... --root-key passphrase: nothing secret in the state directory or bucket;
    a new machine mounts from the bucket and the passphrase; a wrong one is refused."""
    pw = workdir("pw") / "pass"
    pw.write_text("correct horse battery staple\n")
    url = new_s3_url()
    state = init_s3_store(workdir("st1") / "s", url, extra=(
        "--root-key", "passphrase", "--passphrase-file", pw, "--scrypt-log-n", "14"))
    assert not (state / "root.key").exists()
    assert store_config(state)["root_key"]["source"] == "passphrase"
    data = os.urandom(300_000)
    mnt = workdir("m1")
    r = run_cli("mount", state, mnt, "--passphrase-file", pw)
    assert r.returncode == 0, r.stderr
    try:
        (mnt / "f").write_bytes(data)
    finally:
        assert run_cli("umount", mnt).returncode == 0
    shutil.rmtree(state)  # the old machine is gone

    wrong = workdir("pw2") / "wrong"
    wrong.write_text("not the passphrase\n")
    state2, mnt2 = workdir("st2") / "s", workdir("m2")
    args = ("mount", url, mnt2, "--state-dir", state2, "--endpoint-url", s3_server.endpoint)
    r = run_cli(*args, "--passphrase-file", wrong)
    assert r.returncode != 0 and TRACEBACK not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli(*args, "--passphrase-file", pw)
    assert r.returncode == 0, r.stderr
    try:
        assert (mnt2 / "f").read_bytes() == data
    finally:
        assert run_cli("umount", mnt2).returncode == 0


def test_wrong_root_key_fails_authentication(mount_factory, workdir, s3_server, store_backend):
    m = mount_factory()
    (m.mnt / "f").write_bytes(b"x")
    m.unmount()
    bad = workdir("keys") / "bad.key"
    bad.write_bytes(os.urandom(32))
    bad.chmod(0o600)
    r = run_cli("mount", _url(m.store), workdir("mnt"), "--state-dir", workdir("st") / "s",
                "--endpoint-url", s3_server.endpoint, "--root-key-file", bad)
    assert r.returncode != 0
    assert "failed authentication" in r.stderr and TRACEBACK not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    m.start()  # the lease was released after the failed mount
    assert (m.mnt / "f").read_bytes() == b"x"


def test_second_mount_is_refused_naming_the_holder(mount_factory, workdir, s3_server, store_backend):
    m = mount_factory()
    r = run_cli("mount", _url(m.store), workdir("mnt"), "--state-dir", workdir("st") / "s",
                "--endpoint-url", s3_server.endpoint, "--root-key-file", m.store / "root.key")
    assert r.returncode != 0
    assert "already mounted by" in r.stderr and f"pid {m.pid}" in r.stderr, r.stderr
    assert TRACEBACK not in r.stderr


def _put_lock(store: Path, holder: str, expires: float) -> None:
    import json
    import time

    from .conftest import s3_client

    b = store_config(store)["backend"]
    body = {"format": 1, "holder": holder, "lease_id": "x", "host": "elsewhere.example", "boot_id": "b",
            "pid": 4242, "renewed": time.time(), "expires": expires}
    s3_client().put_object(Bucket=b["bucket"], Key=f"{b['prefix']}/lock", Body=json.dumps(body).encode())


def test_lease_of_another_machine_blocks_until_it_expires(mount_factory, store_backend):
    import time

    m = mount_factory()
    m.unmount()
    assert "lock" not in s3_list_keys(m.store)  # released at the clean stop
    _put_lock(m.store, "pid 4242 on elsewhere.example:/mnt/x", time.time() + 3600)
    r = run_cli("mount", m.store, m.mnt, "--foreground")
    assert r.returncode != 0 and "already mounted by pid 4242 on elsewhere.example" in r.stderr
    assert TRACEBACK not in r.stderr
    _put_lock(m.store, "pid 4242 on elsewhere.example:/mnt/x", time.time() - 1)  # crashed, lease over
    m.start()
    assert "took over the expired lease" in m.log_text()
    (m.mnt / "f").write_bytes(b"after takeover")
    m.remount()
    assert (m.mnt / "f").read_bytes() == b"after takeover"


def test_killed_daemon_is_replaced_and_recovers(mount_factory, store_backend):
    m = mount_factory()
    (m.mnt / "kept").write_bytes(b"synced")
    fd = os.open(m.mnt / "kept", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    m.kill9()
    m.start()  # same machine, holder dead: no need to wait for the lease to expire
    assert (m.mnt / "kept").read_bytes() == b"synced"
    assert "not unmounted cleanly" in m.log_text()


def test_repeated_reads_come_from_the_object_cache(mount_factory, store_backend):
    m = mount_factory()
    s3_set_backend_options(m.store, cache_mib=16, cache_writes_upto_kib=8 << 10)
    m.remount()
    (m.mnt / "big").write_bytes(os.urandom(40 << 20))
    fd = os.open(m.mnt / "big", os.O_RDONLY)
    os.fsync(fd)  # all of big is stored (and cached) before hot
    os.close(fd)
    hot = os.urandom(6 << 20)
    (m.mnt / "hot").write_bytes(hot)  # written last: its objects are the most recently used
    m.remount()
    cache = m.store / "cache"
    used = sum(p.stat().st_size for p in cache.iterdir())
    assert 0 < used <= 16 << 20  # bounded: 46 MiB written, at most 16 kept
    assert (m.mnt / "hot").read_bytes() == hot
    st = status(m)
    # every object of the file came from the cache: no GET went to the server
    assert int(st["object_cache_hits"]) > 0 and int(st["s3_gets"]) == 0, st
    assert int(st["object_cache_bytes"]) <= 16 << 20


def test_a_sequential_read_of_objects_larger_than_the_cache_admits(mount_factory, store_backend):
    """With a 4 MiB cache an object over 2 MiB is fetched ahead only in part: that part must
    never answer a read (it would be short), so the reads fetch for themselves and are right."""
    m = mount_factory()
    s3_set_backend_options(m.store, cache_mib=4)
    m.remount()
    data = os.urandom(3 * (4 << 20) + 5)
    (m.mnt / "f").write_bytes(data)
    m.remount()
    with open(m.mnt / "f", "rb", buffering=0) as f:
        got = b"".join(iter(lambda: f.read(1 << 20), b""))
    assert got == data
    st = status(m)
    assert int(st["s3_prefetches"]) >= 1 and int(st["s3_prefetch_handoffs"]) == 0, st


def test_partial_reads_are_ranged_gets(mount_factory, store_backend):
    m = mount_factory()
    s3_set_backend_options(m.store, cache_mib=0)
    m.remount()
    data = os.urandom(4 << 20)
    (m.mnt / "f").write_bytes(data)
    m.remount()
    fd = os.open(m.mnt / "f", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 2 << 20) == data[2 << 20:(2 << 20) + 4096]
    finally:
        os.close(fd)
    st = status(m)
    assert int(st["s3_gets"]) >= 1
    assert 0 < int(st["s3_bytes_in"]) < 1 << 20  # a few segments, not the 4 MiB object


def test_a_read_miss_caches_the_whole_object(mount_factory, store_backend):
    """Random reads: the first miss in an object fetches all of it into the ciphertext
    cache, so reads elsewhere in the same object cost no further GET."""
    m = mount_factory()
    data = os.urandom(4 << 20)
    (m.mnt / "f").write_bytes(data)
    m.unmount()
    # a full 4 MiB block is above cache_writes_upto_kib: the cache starts out empty
    assert list((m.store / "cache").iterdir()) == []
    m.start()
    fd = os.open(m.mnt / "f", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 2 << 20) == data[2 << 20:(2 << 20) + 4096]
        first = status(m)
        assert int(first["s3_bytes_in"]) >= 4 << 20, first  # the whole object came in
        for off in (100 << 10, (3 << 20) + 123, (4 << 20) - 4096):
            assert os.pread(fd, 4096, off) == data[off:off + 4096]
    finally:
        os.close(fd)
    later = status(m)
    assert int(later["s3_gets"]) == int(first["s3_gets"]), (first, later)
    # served from the ciphertext cache, or (pushed to the page cache) never asked of the daemon
    assert (int(later["object_cache_hits"]) > int(first["object_cache_hits"])
            or int(later["reads"]) == int(first["reads"])), (first, later)


def test_large_objects_go_up_in_parts(workdir, mount_factory, store_backend):
    store = init_s3_store(workdir("store") / "store", extra=("--block-size-kib", "32768"))
    s3_set_backend_options(store, multipart_threshold_mib=5)
    m = mount_factory(store)
    data = os.urandom(24 << 20)
    (m.mnt / "f").write_bytes(data)
    fd = os.open(m.mnt / "f", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    assert int(status(m)["s3_multipart_puts"]) >= 1
    sizes = [s for k, s in s3_list_keys(store, "objects/").items()]
    assert max(sizes) > 24 << 20  # one object, in parts
    m.remount()
    assert (m.mnt / "f").read_bytes() == data


def test_bucket_holds_no_plaintext_or_keys(mount_factory, store_backend):
    from .conftest import s3_client

    m = mount_factory()
    marker = b"PLAINTEXT-MARKER-" * 300
    (m.mnt / "secret-name.txt").write_bytes(marker)
    m.unmount()
    root_key = (m.store / "root.key").read_bytes()
    b = store_config(m.store)["backend"]
    c = s3_client()
    keys = s3_list_keys(m.store)
    assert keys
    for key in keys:
        obj = c.get_object(Bucket=b["bucket"], Key=f"{b['prefix']}/{key}")
        body = obj["Body"].read()
        assert b"PLAINTEXT-MARKER" not in body and b"secret-name" not in body, key
        assert root_key not in body, key
        assert obj.get("Metadata", {}) == {}, key


def test_snapshots_are_sequence_numbered_and_pruned(mount_factory, store_backend):
    m = mount_factory()
    for i in range(5):
        (m.mnt / f"f{i}").write_bytes(b"x" * i)
        m.remount()
    snaps = sorted(k for k in s3_list_keys(m.store) if k.startswith("snapshots/"))
    assert len(snaps) == 3  # the newest three are kept
    seqs = [int(k.split("/")[1]) for k in snaps]
    assert seqs == list(range(seqs[0], seqs[0] + 3)) and seqs[-1] >= 6
    assert int((m.store / "snapshot.seq").read_text()) == seqs[-1]


def test_older_snapshot_in_bucket_is_refused(mount_factory, store_backend):
    from .conftest import s3_client

    m = mount_factory()
    (m.mnt / "f").write_bytes(b"1")
    m.unmount()
    b = store_config(m.store)["backend"]
    newest = max(k for k in s3_list_keys(m.store) if k.startswith("snapshots/"))
    s3_client().delete_object(Bucket=b["bucket"], Key=f"{b['prefix']}/{newest}")
    r = run_cli("mount", m.store, m.mnt, "--foreground")
    assert r.returncode != 0 and "refusing an older state" in r.stderr and TRACEBACK not in r.stderr


def test_clear_errors_for_wrong_endpoint_bucket_credentials(workdir, s3_server):
    url = new_s3_url()
    cases = [
        (("--endpoint-url", "http://127.0.0.1:9"), {}, "cannot reach the S3 endpoint"),
        (("--endpoint-url", s3_server.endpoint), {}, "does not exist"),
        (("--endpoint-url", s3_server.endpoint), {"AWS_SECRET_ACCESS_KEY": "wrong"}, "not accepted"),
    ]
    for i, (args, env, want) in enumerate(cases):
        target = url.replace("s3fuse-tests", "no-such-bucket-s3fuse") if want == "does not exist" else url
        r = run_cli("init", target, "--state-dir", workdir("st") / "s", *args, env={**os.environ, **env})
        assert r.returncode == 1, (want, r.stderr)
        assert want in r.stderr and TRACEBACK not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    # at mount too: a store whose credentials stop working
    state = init_s3_store(workdir("st") / "s", url)
    r = run_cli("mount", state, workdir("mnt"), env={**os.environ, "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert r.returncode == 1 and "not accepted" in r.stderr and TRACEBACK not in r.stderr, r.stderr
    r = run_cli("mount", state, workdir("mnt"), "--endpoint-url", "http://127.0.0.1:9")  # wrong endpoint
    assert r.returncode == 1 and "cannot reach the S3 endpoint" in r.stderr and TRACEBACK not in r.stderr
    # and a prefix that already holds a store is not initialised twice
    r = run_cli("init", url, "--state-dir", workdir("st") / "s", "--endpoint-url", s3_server.endpoint)
    assert r.returncode == 1 and "already holds an s3fuse store" in r.stderr


def test_daemon_that_lost_its_lease_stops_writing(mount_factory, store_backend):
    import errno
    import time

    import pytest

    from .conftest import wait_until

    m = mount_factory()
    s3_set_backend_options(m.store, lease_seconds=3)  # renewed every second
    m.remount()
    (m.mnt / "before").write_bytes(b"stored while the lease was ours")
    fd = os.open(m.mnt / "before", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    # another daemon took the prefix over (say, after this one's lease expired during a partition)
    _put_lock(m.store, "pid 4242 on elsewhere.example:/mnt/x", time.time() + 3600)
    wait_until(lambda: "lost the lease" in m.log_text(), 30, "the daemon to notice the lost lease")
    before = set(s3_list_objects(m.store))
    fd = os.open(m.mnt / "after", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"must not reach the bucket")
        with pytest.raises(OSError) as exc:
            os.fsync(fd)
        assert exc.value.errno == errno.EIO
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    assert set(s3_list_objects(m.store)) == before
    assert m.proc.poll() is None  # still up: reads of what it has keep working
    assert (m.mnt / "before").read_bytes() == b"stored while the lease was ours"
    m.kill9()  # its unflushed data cannot be stored; the other holder owns the prefix


def test_a_sequential_read_has_the_next_objects_fetched_ahead(mount_factory, store_backend):
    """Over S3 a sequential reader's next blocks are fetched into the object cache ahead of
    it, in parallel; no object is fetched twice (a read waits for a prefetch under way)."""
    m = mount_factory()
    data = os.urandom(24 << 20)  # 6 objects
    fd = os.open(m.mnt / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    m.remount()  # the kernel's page cache and the object cache are empty (4 MiB blocks: not cached)
    assert (m.mnt / "f").read_bytes() == data
    st = status(m)
    assert int(st["s3_prefetches"]) >= 1, st
    assert int(st["s3_gets"]) == 6, st


def test_small_objects_put_are_cached_and_full_blocks_are_not(mount_factory, store_backend):
    """Write-through up to cache_writes_upto_kib (1 MiB): a small file reads back after a
    remount without a GET; a write stream's 4 MiB blocks do not fill the local disk."""
    m = mount_factory()
    small = os.urandom(5000)
    (m.mnt / "small").write_bytes(small)
    (m.mnt / "big").write_bytes(os.urandom(8 << 20))
    m.remount()
    cached = [p.stat().st_size for p in (m.store / "cache").iterdir()]
    assert len(cached) == 1 and cached[0] < 1 << 20, cached
    assert (m.mnt / "small").read_bytes() == small
    assert int(status(m)["s3_gets"]) == 0


def test_object_cache_keeps_exact_bytes_whether_filled_directly_or_not(tmp_path):
    """Cache files written with O_DIRECT (padded to whole blocks, then cut to size) and the
    usual way read back byte for byte, at sizes on and off block boundaries. No server needed."""
    import random

    from s3fuse.backends.direct import DIRECT_BUFFER
    from s3fuse.backends.s3 import ObjectCache

    cache = ObjectCache(str(tmp_path / "cache"), 64 << 20)
    rng = random.Random(7)
    objects = {f"k{i}": [rng.randbytes(n) for n in sizes] for i, sizes in enumerate(
        [[1], [4096], [4095, 2], [1 << 20, 4113], [DIRECT_BUFFER], [DIRECT_BUFFER, 1]])}
    for key, parts in objects.items():
        cache.store(key, parts)
    # the one larger than a buffer went the usual way, the rest directly (unless this
    # filesystem refuses O_DIRECT: then all went the usual way, as they must)
    assert cache.direct.writes == (len(objects) - 1 if cache.direct.ok else 0)
    for key, parts in objects.items():
        whole = b"".join(parts)
        assert os.path.getsize(tmp_path / "cache" / key) == len(whole)
        assert cache.read(key, [(0, None)]) == [whole]
        assert cache.read(key, [(len(whole) // 2, None), (0, 1)]) == [whole[len(whole) // 2:], whole[:1]]
