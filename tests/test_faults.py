"""Faults: a backend that fails (ENOSPC, EIO), is slow, or hangs, at moments the test chooses
(tests/faulty.py, put around the daemon's backend by tests/faultd.py when
S3FUSE_TESTING_FAULT_PLAN is set), a real ENOSPC from a small
tmpfs, and kill -9 in a loop under a mixed workload checked against a model.

Required: fsynced data survives; unsynced data is never silently dropped (a write that
waits for buffer space, or a later fsync, fails; the data stays readable until it can be stored); the daemon stays up; the
log names the cause; a hanging put does not stall other files."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from .conftest import count_objects, run_cli, wait_until
from .conftest import write_file as write
from .workload import Model, Worker

FAULT_ENV = "S3FUSE_TESTING_FAULT_PLAN"


class Plan:
    def __init__(self, path: Path):
        self.path = path
        self.set([])

    def set(self, rules: list[dict]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rules": rules}))
        os.replace(tmp, self.path)  # a new inode: the daemon sees the change at once

    def hits(self) -> list[str]:
        p = Path(str(self.path) + ".hits")
        return p.read_text().splitlines() if p.exists() else []


@pytest.fixture
def plan(workdir, monkeypatch) -> Plan:
    p = Plan(workdir("plan") / "plan.json")
    monkeypatch.setenv(FAULT_ENV, str(p.path))
    return p


def fsync(path) -> int:
    """0, or the errno fsync(2) failed with."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        return 0
    except OSError as e:
        return e.errno
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # close may report the same failure again


def status_ok(m) -> None:
    r = run_cli("status", m.mnt)
    assert r.returncode == 0, r.stderr
    assert m.proc.poll() is None


def fsck_exit(store) -> tuple[int, str]:
    r = run_cli("fsck", store)
    assert r.returncode in (0, 1, 4), r.stderr
    return r.returncode, r.stdout


def test_put_enospc_fails_visibly_and_keeps_the_data(plan, mount_factory):
    m = mount_factory()
    mnt = m.mnt
    rnd = random.Random(1)
    f1, f2, f3 = rnd.randbytes(200_000), rnd.randbytes(300_000), rnd.randbytes(5_000_000)
    write(mnt / "f1", f1, fsync=True)
    plan.set([{"op": "put", "error": "ENOSPC"}])
    # fsync reports the failure
    fd = os.open(mnt / "f2", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, f2)
    with pytest.raises(OSError) as e:
        os.fsync(fd)
    assert e.value.errno == errno.ENOSPC
    try:
        os.close(fd)
    except OSError as exc:  # the background retry may have failed meanwhile: reported again
        assert exc.errno == errno.ENOSPC
    # a write-back in the background (no fsync) fails: the next fsync says so
    write(mnt / "f3", f3)
    ino3 = os.stat(mnt / "f3").st_ino
    wait_until(lambda: f"storing inode {ino3} " in m.log_text(), 30,
               "the background flush of f3 to fail")
    assert fsync(mnt / "f3") == errno.ENOSPC
    # nothing was dropped: the data reads back from memory, the daemon serves, the log says why
    assert (mnt / "f2").read_bytes() == f2
    assert (mnt / "f3").read_bytes() == f3
    assert (mnt / "f1").read_bytes() == f1
    status_ok(m)
    assert "No space left on device" in m.log_text()
    assert any(h.startswith("put ") and h.endswith("ENOSPC") for h in plan.hits())
    # space again: fsync succeeds, and what it acknowledged survives kill -9
    plan.set([])
    assert fsync(mnt / "f2") == 0
    assert fsync(mnt / "f3") == 0
    m.kill9()
    code, out = fsck_exit(m.store)
    assert code == 0, out
    m.start()
    assert (mnt / "f1").read_bytes() == f1
    assert (mnt / "f2").read_bytes() == f2
    assert (mnt / "f3").read_bytes() == f3


def fsync_fails_then_succeeds(plan, path, data: bytes, faults: list[dict]) -> None:
    """Write `data` to a new file while `faults` are planned: fsync fails with EIO; with the
    faults gone, a second fsync of the same descriptor stores it."""
    plan.set(faults)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        with pytest.raises(OSError) as e:
            os.fsync(fd)
        assert e.value.errno == errno.EIO
        plan.set([])
        os.fsync(fd)
    finally:
        os.close(fd)


def test_a_partly_failed_flush_leaks_no_objects(plan, mount_factory):
    """Puts of half the object ids fail: the objects the batch did store are collected, so a
    clean unmount leaves no unreferenced object behind (fsck reports none)."""
    m = mount_factory()
    data = os.urandom(12 * (4 << 20))
    fsync_fails_then_succeeds(plan, m.mnt / "big", data,
                              [{"op": "put", "key": c, "error": "EIO"} for c in "01234567"])
    m.unmount()
    r = run_cli("fsck", m.store, "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 0, report
    assert not [f for f in report["findings"] if f["kind"] in ("unreferenced-object", "garbage")], report
    assert report["counts"]["objects_in_store"] == report["counts"]["objects_referenced"] == 12
    m.start()
    assert (m.mnt / "big").read_bytes() == data


def test_writers_waiting_for_buffer_space_get_the_error(plan, mount_factory):
    """With the dirty limit full and every put failing, a writer is told (ENOSPC from write,
    fsync or close), instead of waiting forever."""
    m = mount_factory(extra_args=["--dirty-limit-mib", "8"])
    plan.set([{"op": "put", "error": "ENOSPC"}])
    got = []

    def writer():
        try:
            fd = os.open(m.mnt / "big", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                for _ in range(20):  # more than twice the dirty limit
                    os.write(fd, b"\x5a" * (1 << 20))
                os.fsync(fd)
            finally:
                os.close(fd)
            got.append(0)
        except OSError as e:
            got.append(e.errno)

    t = threading.Thread(target=writer)
    t.start()
    t.join(120)
    assert not t.is_alive(), "the writer hangs: a failing write-back was never reported"
    assert got == [errno.ENOSPC], got
    status_ok(m)
    plan.set([])
    os.unlink(m.mnt / "big")


def test_real_enospc_on_a_small_tmpfs(mount_factory, workdir):
    store = workdir("tmpfs-store") / "store"
    assert run_cli("init", store).returncode == 0
    objects = store / "objects"
    shutil.rmtree(objects)
    objects.mkdir(mode=0o700)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(objects)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"cannot mount a tmpfs (the test needs root): {r.stderr}"
    m = None
    try:
        for i in range(256):
            (objects / f"{i:02x}").mkdir()
        (objects / ".tmp").mkdir()
        m = mount_factory(store=store)
        small = os.urandom(100_000)
        write(m.mnt / "small", small, fsync=True)
        with pytest.raises(OSError) as e:
            write(m.mnt / "big", os.urandom(6_000_000), fsync=True)
        assert e.value.errno == errno.ENOSPC
        assert "No space left on device" in m.log_text()
        assert (m.mnt / "small").read_bytes() == small
        os.unlink(m.mnt / "big")  # its unstored data goes with it, and the objects it did store
        # the objects the failed flushes did store are collected, and the failed puts leave no
        # partial copies behind to keep the disk full (a retry in flight may still hold one
        # for a moment: wait for it to go, rather than catch it in the act)
        wait_until(lambda: count_objects(store) == 1 and not os.listdir(objects / ".tmp"), 60,
                   "the failed flushes' objects and temp files to be gone")
        again = os.urandom(500_000)
        write(m.mnt / "again", again, fsync=True)
        status_ok(m)
        m.unmount()
        code, out = fsck_exit(store)
        assert code == 0, out
        m.start()
        assert (m.mnt / "small").read_bytes() == small and (m.mnt / "again").read_bytes() == again
        m.unmount()
    finally:
        if m is not None:
            m.cleanup()  # the daemon goes before the objects directory it writes to
        subprocess.run(["umount", "-l", str(objects)], capture_output=True)


def test_hanging_put_does_not_stall_other_files(plan, mount_factory):
    m = mount_factory()
    y = os.urandom(3_000_000)
    write(m.mnt / "y", y, fsync=True)
    m.remount()  # y is not in any cache now
    plan.set([{"op": "put", "hang": True}])
    x = os.urandom(600_000)
    write(m.mnt / "x", x)  # close returns: the put runs in the background, and hangs
    wait_until(lambda: any(h.startswith("put ") and h.endswith(" hang") for h in plan.hits()), 30,
               "a put to hang")
    # meanwhile everything that needs no put still works
    assert (m.mnt / "y").read_bytes() == y
    assert os.stat(m.mnt / "x").st_size == len(x)
    assert (m.mnt / "x").read_bytes() == x
    write(m.mnt / "z", b"while hanging")
    assert (m.mnt / "z").read_bytes() == b"while hanging"
    assert sorted(os.listdir(m.mnt)) == ["x", "y", "z"]
    status_ok(m)
    plan.set([{"op": "put", "delay": 0.2}])  # released, then merely slow
    assert fsync(m.mnt / "x") == 0
    assert fsync(m.mnt / "z") == 0
    m.kill9()
    plan.set([])
    m.start()
    assert (m.mnt / "x").read_bytes() == x and (m.mnt / "y").read_bytes() == y
    assert (m.mnt / "z").read_bytes() == b"while hanging"


def test_flush_in_flight_for_a_deleted_file_does_not_touch_a_new_one(plan, mount_factory):
    """A file is unlinked while its flush waits for a (hanging) put, and a new file and symlink
    are created at once. They must not inherit the deleted file's number, size or blocks when
    the flush finishes (SQLite hands out the number of the most recently deleted row again;
    the differential test caught this as a symlink with a file's size, and as EIO)."""
    m = mount_factory()
    plan.set([{"op": "put", "hang": True}])
    x = os.urandom(700_000)
    write(m.mnt / "x", x)
    x_ino = os.stat(m.mnt / "x").st_ino
    wait_until(lambda: any(h.endswith(" hang") for h in plan.hits()), 30, "the flush of x to hang")
    os.unlink(m.mnt / "x")
    # make the kernel forget x, so that the daemon deletes its inode (it holds a reference
    # until then)
    def forgotten():
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")
        return "files: 1 inodes," in run_cli("status", m.mnt).stdout
    wait_until(forgotten, 30, "the kernel to forget the unlinked file", interval=0.2)
    os.symlink("abc", m.mnt / "link")
    write(m.mnt / "y", b"y" * 10)
    inos = {os.lstat(m.mnt / "link").st_ino, os.stat(m.mnt / "y").st_ino}
    plan.set([])  # the flush of the deleted x completes now
    assert x_ino not in inos, "a deleted file's inode number was handed out again at once"
    assert fsync(m.mnt / "y") == 0
    m.remount()
    assert os.lstat(m.mnt / "link").st_size == 3 and os.readlink(m.mnt / "link") == "abc"
    assert (m.mnt / "y").read_bytes() == b"y" * 10
    m.unmount()
    r = run_cli("fsck", m.store)
    assert r.returncode == 0, r.stdout


def test_get_sync_and_delete_failures(plan, mount_factory):
    m = mount_factory()
    a = os.urandom(400_000)
    write(m.mnt / "a", a, fsync=True)
    m.remount()
    # a failing get: EIO for the read, logged; the next read, without the fault, works
    plan.set([{"op": "get", "error": "EIO"}])
    with pytest.raises(OSError) as e:
        (m.mnt / "a").read_bytes()
    assert e.value.errno == errno.EIO
    assert "injected fault: get" in m.log_text()
    plan.set([])
    assert (m.mnt / "a").read_bytes() == a
    # a failing durability barrier: fsync fails, and nothing is committed that is not durable
    b = os.urandom(100_000)
    fsync_fails_then_succeeds(plan, m.mnt / "b", b, [{"op": "sync", "error": "EIO"}])
    # a failing delete: the collector retries later; nothing is lost or leaked
    before = count_objects(m.store)
    plan.set([{"op": "delete", "error": "EIO"}])
    os.unlink(m.mnt / "a")
    wait_until(lambda: any(h.startswith("delete ") for h in plan.hits()), 30, "a delete to fail")
    assert count_objects(m.store) == before
    plan.set([])
    wait_until(lambda: count_objects(m.store) < before, 30, "the collector to retry the delete")
    status_ok(m)
    m.kill9()
    m.start()
    assert (m.mnt / "b").read_bytes() == b
    assert not (m.mnt / "a").exists()


def kill9_cycles(m, cycles: int, seed: int, seconds: float = 1.5, workers: int = 2) -> dict:
    """Mixed workload, kill -9 at a random moment, fsck, remount, compare with the model."""
    rng = random.Random(seed)
    model = Model()
    totals: dict[str, int] = {}
    for cycle in range(cycles):
        ws = [Worker(str(m.mnt), model, seed * 1000 + cycle * 10 + i, prefix=f"w{i}-") for i in range(workers)]
        threads = [threading.Thread(target=w.run) for w in ws]
        for t in threads:
            t.start()
        threading.Event().wait(rng.uniform(0.2, seconds))  # the kill lands at a random moment
        for w in ws:
            w.killed.set()
        os.kill(m.pid, signal.SIGKILL)
        m.proc.wait(30)
        # the workers stop while the dead mount is still attached (their calls fail with
        # ENOTCONN); once it is cleared, their paths would reach the directory beneath it
        for w in ws:
            w.stop.set()
        for t in threads:
            t.join(60)
            assert not t.is_alive()
        m.kill9()  # clears the dead mount
        for w in ws:
            assert not w.errors, f"cycle {cycle}: {w.errors}"
            for k, v in w.ops.items():
                totals[k] = totals.get(k, 0) + v
        code, out = fsck_exit(m.store)
        assert code == 0, f"cycle {cycle}: fsck after kill -9:\n{out}"
        m.start()
        problems = model.check(str(m.mnt))
        assert not problems, f"cycle {cycle}: " + "; ".join(problems)
        model.settle(str(m.mnt))
    return totals


def test_kill9_loop_against_a_model(mount_factory):
    m = mount_factory()
    totals = kill9_cycles(m, cycles=3, seed=int(os.environ.get("S3FUSE_TEST_SEED", "11")))
    assert totals.get("put_sync", 0) > 0, totals


def test_the_production_command_ignores_a_fault_plan(plan, new_store, workdir):
    """Only the harness's command (tests/faultd.py) injects faults: `python -m s3fuse`, with a
    plan that fails every put in its environment, stores and fsyncs as if there were none."""
    import pathlib

    src = pathlib.Path(__file__).resolve().parent.parent / "s3fuse"
    assert not [p for p in src.rglob("*.py") if "FAULT_PLAN" in p.read_text() or "faulty" in p.name]
    plan.set([{"op": "*", "error": "EIO"}])
    mnt = workdir("mnt")
    r = run_cli("mount", new_store, mnt)  # background: the daemon is `python -m s3fuse`
    assert r.returncode == 0, r.stderr
    try:
        write(mnt / "f", b"x" * 100_000, fsync=True)
        assert (mnt / "f").read_bytes() == b"x" * 100_000
    finally:
        u = run_cli("umount", mnt)
    assert u.returncode == 0, u.stderr
    assert plan.hits() == []
