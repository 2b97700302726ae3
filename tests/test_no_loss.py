"""No accepted write is lost (issue 17): a failure stays with its file, a stop keeps what it
cannot store, and a key withdrawn after a file was opened for writing does not lose its data.

Real mounts throughout; failures come from the fault plan (s3fuse/backends/faulty.py), a
small tmpfs, or keys removed and disabled through the CLI."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO, run_as, run_cli, wait_until
from .conftest import write_file as write
from .test_faults import Plan, fsync, plan  # noqa: F401 - the fixture
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
