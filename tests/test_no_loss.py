"""No accepted write is lost (issue 17): a failure stays with its file, a stop keeps what it
cannot store, and a key withdrawn after a file was opened for writing does not lose its data.

Real mounts throughout; failures come from the fault plan (tests/faulty.py), a
small tmpfs, or keys removed and disabled through the CLI."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO, run_as, run_cli, s3_set_backend_options, wait_until
from .conftest import write_file as write
from .test_faults import Plan, fsync, plan  # noqa: F401 - the fixture
from .test_s3_faults import own_server  # noqa: F401 - the fixture
from .test_sse import (ALICE, ALLOW_OTHER, _policy, add_key, as_uid, cat_as, cli, cli_ok, kms_create,
                       owned_dir, setfattr_ok)

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


# --------------------------------------------------------------------------
# the README tour's SSE-C part, with the key removed before the data was stored
# --------------------------------------------------------------------------

DOC = Path("/usr/share/doc/bash") if Path("/usr/share/doc/bash").is_dir() else REPO / "docs"


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tour(m, plan) -> tuple[bytes, dict[str, bytes]]:  # noqa: F811
    """key add; SSE-C directory; a note written while puts hang (so it is not stored yet);
    key remove (which names the note); then plain.txt and a copied tree. -> the note's
    contents and the expected plain files."""
    mnt = m.mnt
    key = os.urandom(32)
    add_key(mnt, "mine", key)
    os.mkdir(mnt / "p")
    os.setxattr(mnt / "p", "user.s3fuse.sse", b"SSE-C:mine")
    plan.set([{"op": "put", "hang": True}])
    note = b"secret\n"
    write(mnt / "p" / "note", note)
    wait_until(lambda: any(h.startswith("put ") for h in plan.hits()), 30, "the note's put to start")
    r = cli("key", "remove", "mine", "-m", mnt)
    assert r.returncode == 0, r.stderr
    assert "/p/note" in r.stderr and "waiting to be stored" in r.stderr, r.stderr
    plan.set([])
    expected = {"plain.txt": b"plain\n"}
    write(mnt / "plain.txt", b"plain\n")
    subprocess.run(["cp", "-a", str(DOC), str(mnt / "doc")], check=True)
    expected.update({f"doc/{k}": v for k, v in tree(DOC).items()})
    return key, expected


@pytest.mark.parametrize("stop", ["sigterm", "umount", "kill9"])
def test_tour_with_a_removed_customer_key_loses_nothing(plan, mount_factory, stop):  # noqa: F811
    m = mount_factory()
    mnt = m.mnt
    key, expected = _tour(m, plan)
    if stop == "umount":
        m.unmount()
    elif stop == "sigterm":
        os.kill(m.pid, signal.SIGTERM)
        assert m.proc.wait(timeout=120) == 0, m.describe_logs()
        m.clear_dead_mount()
    else:
        assert fsync(mnt / "plain.txt") == 0
        m.kill9()
    m.start()
    got = {name: (mnt / name).read_bytes() for name in expected}
    if stop == "kill9":
        # only plain.txt was fsync'd: the others are whole or (not stored yet) empty
        assert got.pop("plain.txt") == expected.pop("plain.txt")
        for name, data in got.items():
            assert data in (expected[name], b""), name
    else:
        assert got == expected
        assert "is lost" not in m.log_text(all_generations=True)
    note = mnt / "p" / "note"
    if stop != "kill9" or os.stat(note).st_size:
        with pytest.raises(OSError) as e:
            note.read_bytes()
        assert e.value.errno == errno.ENOKEY
        add_key(mnt, "mine", key)
        assert note.read_bytes() == b"secret\n"


@pytest.mark.parametrize("change", ["disable", "policy"])
def test_kms_key_withdrawn_between_open_and_store_loses_nothing(plan, mount_factory, change):  # noqa: F811
    m = mount_factory(extra_args=ALLOW_OTHER)
    mnt = m.mnt
    key_id = kms_create(mnt, "alias/k")
    cli_ok("kms", "policy", "set", "alias/k", "-m", mnt, input=_policy([0, ALICE], [0, ALICE], [0]))
    d = owned_dir(mnt / "k", ALICE)
    setfattr_ok(d, "aws:kms:alias/k")
    plan.set([{"op": "put", "hang": True}])
    alice_data, root_data = b"alice's accepted data\n", os.urandom(3000)
    r = run_as(ALICE, ALICE, ["sh", "-c", f"printf \"alice's accepted data\\n\" > {d}/alice"])
    assert r.returncode == 0, r.stderr
    write(d / "root", root_data)
    wait_until(lambda: any(h.startswith("put ") for h in plan.hits()), 30, "a put to start")
    if change == "disable":
        r = cli("kms", "disable", "alias/k", "-m", mnt)
    else:
        r = cli("kms", "policy", "set", "alias/k", "-m", mnt, input=_policy([0], [0, ALICE], [0]))
    assert r.returncode == 0, r.stderr
    assert "/k/alice" in r.stderr and "waiting to be stored" in r.stderr, r.stderr
    if change == "disable":
        assert "/k/root" in r.stderr
    # new opens are refused; what was accepted before is not
    who = 0 if change == "disable" else ALICE
    assert as_uid(who, "create", d / "late")[0] == "errno"
    plan.set([])
    m.unmount()
    m.start()
    if change == "disable":
        cli_ok("kms", "enable", key_id, "-m", mnt)
    assert (d / "root").read_bytes() == root_data
    r = cat_as(ALICE, d / "alice")
    assert r.returncode == 0 and r.stdout == alice_data, r.stderr


# --------------------------------------------------------------------------
# stops with data that cannot be stored: the recovery area
# --------------------------------------------------------------------------

def _records(store: Path) -> list[str]:
    d = Path(store) / "recovery"
    return sorted(p.name for p in d.glob("*.rec")) if d.is_dir() else []


def _sigterm(m) -> None:
    os.kill(m.pid, signal.SIGTERM)
    assert m.proc.wait(timeout=180) == 0, m.describe_logs()
    m.clear_dead_mount()


def test_stop_while_the_store_fails_keeps_the_data_for_the_next_mount(plan, mount_factory):  # noqa: F811
    m = mount_factory()
    mnt = m.mnt
    rnd = random.Random(19)
    stored = rnd.randbytes(5000)
    write(mnt / "stored", stored, fsync=True)
    plan.set([{"op": "put", "error": "EIO"}])
    files = {f"f{i}": rnd.randbytes(n) for i, n in enumerate([100, 70_000, 300_000, 5_000_000])}
    for name, data in files.items():
        write(mnt / name, data)
    inos = {name: os.stat(mnt / name).st_ino for name in files}
    wait_until(lambda: all(f"storing inode {i} " in m.log_text() for i in inos.values()), 30,
               "every store to fail")
    # status names the files and the reason
    r = run_cli("status", mnt)
    assert r.returncode == 0, r.stderr
    assert "unstored files: 4" in r.stdout and "/f3" in r.stdout and "injected fault" in r.stdout, r.stdout
    # umount explains, stays mounted, and offers --keep-pending
    r = run_cli("umount", mnt)
    assert r.returncode != 0 and "--keep-pending" in r.stderr and "/f2" in r.stderr, r.stderr
    assert os.path.ismount(mnt) and m.proc.poll() is None
    # SIGTERM (systemctl stop): kept, sealed, in the recovery area
    _sigterm(m)
    assert _records(m.store) == sorted(f"{i}.rec" for i in inos.values())
    log = m.log_text()
    assert "is lost" not in log and "kept in" in log
    for name, data in files.items():  # sealed: no plaintext in the records
        blob = (m.store / "recovery" / f"{inos[name]}.rec").read_bytes()
        assert data[:64] not in blob
    r = run_cli("fsck", m.store)
    assert r.returncode == 4 and "recovery-pending" in r.stdout, r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("DAMAGE REMAINS"), r.stdout
    # the next mount stores them first
    plan.set([])
    m.start()
    assert _records(m.store) == []
    for name, data in {**files, "stored": stored}.items():
        assert (mnt / name).read_bytes() == data, name
    m.unmount()
    r = run_cli("fsck", m.store)
    assert r.returncode == 0, r.stdout


def test_umount_keep_pending_stops_and_the_next_mount_stores(plan, mount_factory):  # noqa: F811
    m = mount_factory()
    mnt = m.mnt
    plan.set([{"op": "put", "error": "EIO", "min_size": BIG}])
    bad, good = os.urandom(BIG * 2), os.urandom(1000)
    write(mnt / "bad", bad)
    write(mnt / "good", good)
    ino = os.stat(mnt / "bad").st_ino
    wait_until(lambda: f"storing inode {ino} " in m.log_text(), 30, "the bad file's store to fail")
    r = run_cli("umount", "--keep-pending", mnt)
    assert r.returncode == 0, r.stderr
    assert m.proc.wait(timeout=60) == 0
    assert _records(m.store) == [f"{ino}.rec"]
    plan.set([])
    m.start()
    assert (mnt / "bad").read_bytes() == bad and (mnt / "good").read_bytes() == good
    assert _records(m.store) == []


def test_a_record_that_cannot_be_stored_yet_stays_until_it_can(plan, mount_factory):  # noqa: F811
    m = mount_factory()
    mnt = m.mnt
    plan.set([{"op": "put", "error": "EIO"}])
    write(mnt / "f", b"kept at the stop\n")
    ino = os.stat(mnt / "f").st_ino
    wait_until(lambda: f"storing inode {ino} " in m.log_text(), 30, "the store to fail")
    _sigterm(m)
    assert _records(m.store) == [f"{ino}.rec"]
    # a later mount that cannot store it yet (the fault goes on): the record stays
    m.start()
    assert _records(m.store) == [f"{ino}.rec"]
    r = run_cli("status", mnt)
    assert "recovery area: 1 record(s)" in r.stdout, r.stdout
    m.kill9()
    r = run_cli("fsck", m.store)
    assert r.returncode == 4 and "recovery-pending" in r.stdout, r.stdout
    plan.set([])
    m.start()
    assert (mnt / "f").read_bytes() == b"kept at the stop\n"


def test_enospc_during_a_copy_then_space_freed_every_accepted_write_arrives(workdir, mount_factory):
    """A small tmpfs holds the store's objects and recovery area (the metadata database stays
    on the larger disk, so that creating files still works); a filler takes the rest of its
    space. What was accepted is kept (stored, or at the stop kept in the recovery area, whose
    reserve was set aside at mount); a write that cannot be accepted waits a bounded time and
    gets ENOSPC."""
    fsdir = workdir("tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(fsdir)], check=True)
    try:
        store = workdir("store") / "store"
        r = run_cli("init", store)
        assert r.returncode == 0, r.stderr
        shutil.copytree(store / "objects", fsdir / "objects")
        shutil.rmtree(store / "objects")
        os.symlink(fsdir / "objects", store / "objects")
        os.mkdir(fsdir / "recovery", 0o700)
        os.symlink(fsdir / "recovery", store / "recovery")
        m = mount_factory(store, extra_args=["--dirty-limit-mib", "8"])
        mnt = m.mnt
        assert (store / "recovery" / "reserve").stat().st_size >= 8 << 20  # set aside at mount
        filler = fsdir / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(bytes(1 << 20))
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        rnd = random.Random(20)
        copied = {f"c{i}": rnd.randbytes(n) for i, n in enumerate([3000, 1 << 20, 1 << 20, 2_500_000])}
        src = workdir("src")
        for name, data in copied.items():
            (src / name).write_bytes(data)
        subprocess.run(["cp", "-r", str(src), str(mnt / "copy")], check=True)  # accepted into memory
        inos = [os.stat(mnt / "copy" / n).st_ino for n in copied]
        wait_until(lambda: all(f"storing inode {i} " in m.log_text() for i in inos), 60,
                   "the copied files' stores to fail with ENOSPC")
        assert "No space left on device" in m.log_text()
        # more than the write-back buffer holds cannot be accepted: ENOSPC after a bounded wait
        fd = os.open(mnt / "too-much", os.O_WRONLY | os.O_CREAT, 0o644)
        errs = []
        try:
            for _ in range(16):
                os.write(fd, rnd.randbytes(1 << 20))
            os.fsync(fd)
        except OSError as e:
            errs.append(e.errno)
        try:
            os.close(fd)
        except OSError as e:
            errs.append(e.errno)
        assert errs and errs[0] == errno.ENOSPC, errs
        # stopped while the disk is full: kept in the recovery area, in the reserve's place
        _sigterm(m)
        assert {f"{i}.rec" for i in inos} <= set(_records(store)), _records(store)
        assert "is lost" not in m.log_text(), m.describe_logs()
        filler.unlink()  # space again
        m.start()
        for name, data in copied.items():
            assert (mnt / "copy" / name).read_bytes() == data, name
        m.unmount()
    finally:
        for mm in mount_factory.mounts:
            mm.cleanup()
        subprocess.run(["umount", "-l", str(fsdir)], capture_output=True)


def test_stop_with_the_s3_server_down_loses_nothing(own_server, workdir, mount_factory):  # noqa: F811 - the fixture
    state = workdir("store") / "store"
    r = run_cli("init", "s3://faults/noloss", "--endpoint-url", own_server.endpoint, "--state-dir", state)
    assert r.returncode == 0, r.stderr
    s3_set_backend_options(state, retry_budget=2, cache_mib=0)
    m = mount_factory(state)
    mnt = m.mnt
    rnd = random.Random(21)
    before = {f"b{i}": rnd.randbytes(20_000) for i in range(3)}
    for name, data in before.items():
        write(mnt / name, data, fsync=True)
    own_server.stop()  # mid-run
    during = {f"d{i}": rnd.randbytes(n) for i, n in enumerate([500, 80_000, 1_200_000])}
    for name, data in during.items():
        write(mnt / name, data)
    _sigterm(m)
    assert len(_records(state)) == len(during), m.describe_logs()
    own_server.start()  # same ports, same data
    m.start()
    assert _records(state) == []
    for name, data in {**before, **during}.items():
        assert (mnt / name).read_bytes() == data, name


def test_data_a_stop_could_not_keep_marks_the_file_and_reads_fail(plan, mount_factory):  # noqa: F811
    m = mount_factory()
    mnt = m.mnt
    write(mnt / "f", b"committed\n", fsync=True)
    plan.set([{"op": "put", "error": "EIO"}])
    with open(mnt / "f", "ab") as f:
        f.write(b"accepted, never stored\n")
    ino = os.stat(mnt / "f").st_ino
    wait_until(lambda: f"storing inode {ino} " in m.log_text(), 30, "the store to fail")
    # the recovery area cannot take it either
    shutil.rmtree(m.store / "recovery")
    (m.store / "recovery").write_bytes(b"not a directory")
    _sigterm(m)
    assert "marked damaged" in m.log_text()
    r = run_cli("fsck", m.store)
    assert r.returncode == 4 and "lost-at-stop" in r.stdout, r.stdout
    (m.store / "recovery").unlink()
    plan.set([])
    m.start()
    # never zeros or the old contents as if nothing happened: EIO, and the marker says why
    with pytest.raises(OSError) as e:
        (mnt / "f").read_bytes()
    assert e.value.errno == errno.EIO
    assert os.getxattr(mnt / "f", "user.s3fuse.damage").startswith(b"lost-at-stop: ")
    os.removexattr(mnt / "f", "user.s3fuse.damage")  # the owner has seen it
    assert (mnt / "f").read_bytes() == b"committed\n"


@pytest.mark.parametrize("withdraw", ["kms disable", "key remove"])
def test_key_withdrawn_while_a_large_file_is_written_loses_nothing(mount_factory, withdraw):
    """Writes after the withdrawal, through a handle opened before it, are stored under the
    handle's key: new blocks, and a block already stored that the write extends (which must
    be decrypted to merge the write)."""
    m = mount_factory()
    mnt = m.mnt
    d = mnt / "d"
    os.mkdir(d)
    customer_key = os.urandom(32)
    if withdraw == "kms disable":
        key_id = kms_create(mnt, "alias/big")
        setfattr_ok(d, "aws:kms:alias/big")
    else:
        add_key(mnt, "mine", customer_key)
        setfattr_ok(d, "SSE-C:mine")
    f = d / "f"
    before, after = os.urandom(9 << 20), os.urandom(6 << 20)  # blocks 0-2, then 2-3
    fd = os.open(f, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        os.write(fd, before)
        os.fsync(fd)  # blocks 0-2 stored, block 2 partly, before the key is withdrawn
        r = cli(*withdraw.split(), "alias/big" if withdraw == "kms disable" else "mine", "-m", mnt)
        assert r.returncode == 0, r.stderr
        with pytest.raises(OSError):  # a new open for writing is refused
            os.open(d / "late", os.O_WRONLY | os.O_CREAT, 0o666)
        os.write(fd, after)
        os.fsync(fd)
    finally:
        os.close(fd)
    m.unmount()
    m.start()
    if withdraw == "kms disable":
        cli_ok("kms", "enable", key_id, "-m", mnt)
    else:
        add_key(mnt, "mine", customer_key)
    assert f.read_bytes() == before + after
