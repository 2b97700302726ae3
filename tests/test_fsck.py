"""s3fuse fsck: a clean store is clean; each kind of damage, made on purpose in a copy of
one prepared store, is reported with its documented kind and exit code (4), and --repair
fixes what is safe (exit 1), after which fsck is clean (exit 0), the store mounts, the
damaged file is in /lost+found with its damage recorded, and everything else reads back."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from .conftest import S3FUSE, TRACEBACK, list_objects, object_path, resign_metadata, run_cli

KiB = 1024
BS = 256 * KiB  # the prepared store's block size: several blocks per file stay cheap
SSE = "user.s3fuse.sse"
DAMAGE_XATTR = "user.s3fuse.damage"
EXIT_CLEAN, EXIT_REPAIRED, EXIT_DAMAGED, EXIT_FAILED = 0, 1, 4, 8


def _write(p: Path, data: bytes) -> None:
    with open(p, "wb") as f:
        f.write(data)


class Prepared:
    store: Path
    files: dict[str, bytes]
    ssec_key: bytes


@pytest.fixture(scope="module")
def prepared(module_mount_factory, _dirs) -> Prepared:
    store = _dirs("fsck-store") / "store"
    r = run_cli("init", store, "--block-size-kib", BS // KiB, "--segment-size-kib", 64)
    assert r.returncode == 0, r.stderr
    m = module_mount_factory(store=store)
    mnt = m.mnt
    rnd = random.Random(7)
    prep = Prepared()
    prep.store = store
    prep.files = {
        "big": rnd.randbytes(3 * BS - 1000),
        "small": b"hello",
        "victim": rnd.randbytes(2 * BS + 5),
        "d1/d2/file": rnd.randbytes(10_000),
        "hl1": rnd.randbytes(3000),
        "kms/f": rnd.randbytes(100_000),
        "ssec/f": rnd.randbytes(100_000),
    }
    os.makedirs(mnt / "d1" / "d2")
    for d in ("kms", "ssec"):
        os.mkdir(mnt / d)
    os.setxattr(mnt / "kms", SSE, b"aws:kms")
    prep.ssec_key = rnd.randbytes(32)
    r = subprocess.run([*S3FUSE, "key", "add", "k1", "-m", str(mnt)],
                       input=base64.b64encode(prep.ssec_key) + b"\n", capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    os.setxattr(mnt / "ssec", SSE, b"SSE-C:k1")
    for name, data in prep.files.items():
        _write(mnt / name, data)
    os.link(mnt / "hl1", mnt / "d1" / "hl2")
    os.symlink("small", mnt / "sym")
    m.unmount()
    return prep


@pytest.fixture
def store(prepared, workdir) -> Path:
    dst = workdir("fsck-copy") / "store"
    shutil.copytree(prepared.store, dst, symlinks=True)
    return dst


def fsck(store: Path, *args) -> tuple[int, dict]:
    r = run_cli("fsck", store, "--json", *args)
    assert TRACEBACK not in r.stderr, r.stderr
    assert r.returncode in (0, 1, 4), f"fsck exited {r.returncode}: {r.stderr}"
    report = json.loads(r.stdout)
    assert report["exit"] == r.returncode
    return r.returncode, report


def kinds(report: dict, severity: str | None = None) -> set[str]:
    return {f["kind"] for f in report["findings"] if severity is None or f["severity"] == severity}


class _Edit(sqlite3.Connection):
    """A connection whose edits, once closed, are signed again (conftest.resign_metadata):
    these tests make structural damage, not forgeries."""

    store: Path

    def close(self) -> None:
        super().close()
        resign_metadata(self.store)


def db(store: Path) -> sqlite3.Connection:
    con = sqlite3.connect(store / "meta.db", isolation_level=None, factory=_Edit)
    con.store = store
    return con


def inode_of(store: Path, path: str) -> int:
    con = db(store)
    ino = 1
    for part in path.split("/"):
        (ino,) = con.execute("SELECT inode FROM dentries WHERE parent=? AND name=?", (ino, part.encode())).fetchone()
    con.close()
    return ino


def oids_of(store: Path, path: str) -> list[str]:
    con = db(store)
    rows = con.execute("SELECT object_id FROM blocks WHERE inode=? ORDER BY blockno",
                       (inode_of(store, path),)).fetchall()
    con.close()
    return [r[0].hex() for r in rows]


def check_damaged_then_repair(store: Path, expect: set[str], exit_before: int = EXIT_DAMAGED) -> dict:
    """fsck reports `expect`; --repair exits 1 and fixes it; fsck is clean afterwards."""
    code, report = fsck(store)
    assert code == exit_before, report
    assert expect <= kinds(report), f"expected {expect}, found {kinds(report)}"
    code, fixed = fsck(store, "--repair")
    assert code == EXIT_REPAIRED, fixed
    assert not [f for f in fixed["findings"] if f["severity"] == "damage" and not f["repaired"]], fixed
    code, again = fsck(store)
    assert code == EXIT_CLEAN, again
    assert not kinds(again, "damage"), again
    return fixed


def check_tree(m, files: dict[str, bytes], skip: set[str] = frozenset()) -> None:
    for name, data in files.items():
        if name in skip or name.startswith("ssec/"):
            continue
        assert (m.mnt / name).read_bytes() == data, f"{name} differs after repair"


def lost_found(m) -> dict[str, str]:
    lf = m.mnt / "lost+found"
    return {n: os.getxattr(lf / n, DAMAGE_XATTR).decode() if DAMAGE_XATTR in os.listxattr(lf / n) else ""
            for n in os.listdir(lf)}


# --------------------------------------------------------------------------------- clean


def test_clean_store_is_clean(prepared, store, mount_factory):
    code, report = fsck(store)
    assert code == EXIT_CLEAN
    assert not kinds(report, "damage")
    assert kinds(report) == {"unverifiable"}, report  # SSE-C objects: no customer key offline
    c = report["counts"]
    assert c["objects_referenced"] == c["objects_in_store"] > 0
    assert c["objects_unverifiable"] == 1
    # an object fsck could not verify is not counted as authenticated
    assert c["objects_fully_authenticated"] == c["objects_referenced"] - 1
    # with the customer key, SSE-C objects are verified too
    keyfile = store.parent / "ssec.key"
    keyfile.write_bytes(base64.b64encode(prepared.ssec_key))
    code, report = fsck(store, "--customer-key", f"k1={keyfile}")
    assert code == EXIT_CLEAN and not report["findings"], report
    code, report = fsck(store, "--quick")
    assert code == EXIT_CLEAN and not kinds(report, "damage")
    # --repair on a clean store changes nothing
    before = list_objects(store)
    code, report = fsck(store, "--repair")
    assert code == EXIT_CLEAN, report
    assert list_objects(store) == before
    # the human-readable report: a summary and the verdict
    r = run_cli("fsck", store)
    assert r.returncode == 0 and "clean: 0 damage" in r.stdout, r.stdout
    m = mount_factory(store=store)
    check_tree(m, prepared.files)
    assert not (m.mnt / "lost+found").exists()


def test_cannot_run_exit_8(prepared, store, mount_factory, workdir):
    r = run_cli("fsck", workdir("nostore") / "none")
    assert r.returncode == EXIT_FAILED and r.stderr.startswith("s3fuse: fsck could not run:"), r.stderr
    m = mount_factory(store=store)
    r = run_cli("fsck", store)
    assert r.returncode == EXIT_FAILED
    assert "already mounted" in r.stderr and "unmount it" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert (m.mnt / "small").read_bytes() == b"hello"  # the mount is unaffected
    m.unmount()
    os.chmod(store / "root.key", 0o000)
    os.rename(store / "root.key", store / "root.key.away")
    r = run_cli("fsck", store)
    assert r.returncode == EXIT_FAILED and "root key" in r.stderr, r.stderr
    r = run_cli("fsck", store, "--customer-key", "nokey")
    assert r.returncode == EXIT_FAILED and "NAME=FILE" in r.stderr


# ---------------------------------------------------------------------- objects


@pytest.mark.parametrize("how", ["missing", "flipped", "truncated", "appended"])
def test_damaged_object_is_quarantined(prepared, store, mount_factory, how):
    oid = oids_of(store, "victim")[1]
    p = object_path(store, oid)
    raw = bytearray(p.read_bytes())
    if how == "missing":
        p.unlink()
    elif how == "flipped":
        raw[len(raw) // 2] ^= 4
        p.write_bytes(raw)
    elif how == "truncated":
        p.write_bytes(raw[:-1])
    else:  # a segment appended: reads never look there, fsck does
        p.write_bytes(raw + raw[-1000:])
    kind = "missing-object" if how == "missing" else "corrupt-object"
    if how != "missing":  # a damaged object is counted apart, not as authenticated
        c = fsck(store)[1]["counts"]
        assert c["objects_damaged"] == 1, c
        good = c["objects_referenced"] - 1 - c["objects_unverifiable"]
        assert c["objects_fully_authenticated"] == good, c
        text = run_cli("fsck", store).stdout
        assert f"{good} fully authenticated" in text and "1 damaged" in text, text
    fixed = check_damaged_then_repair(store, {kind})
    assert any(f["object_id"] == oid and f["kind"] == kind for f in fixed["findings"])
    m = mount_factory(store=store)
    check_tree(m, prepared.files, skip={"victim"})
    assert not (m.mnt / "victim").exists()
    found = lost_found(m)
    (name,) = found
    assert name.endswith("victim") and "was /victim" in found[name] and oid in found[name], found
    # the undamaged blocks of the quarantined file still read; the damaged one is EIO
    data = prepared.files["victim"]
    with open(m.mnt / "lost+found" / name, "rb") as f:
        assert f.read(BS) == data[:BS]
        f.seek(2 * BS)
        assert f.read() == data[2 * BS:]
        f.seek(BS)
        if how != "appended":
            with pytest.raises(OSError) as e:
                f.read(BS)
            assert e.value.errno == 5
    assert oct(os.stat(m.mnt / "lost+found").st_mode & 0o7777) == "0o700"
    # the record is read-only through the mount, and the owner clears it once the file is salvaged
    with pytest.raises(OSError) as e:
        os.setxattr(m.mnt / "lost+found" / name, DAMAGE_XATTR, b"forged")
    assert e.value.errno == 1
    os.removexattr(m.mnt / "lost+found" / name, DAMAGE_XATTR)
    assert DAMAGE_XATTR not in os.listxattr(m.mnt / "lost+found" / name)


def test_unreferenced_objects_are_collected(prepared, store, mount_factory):
    oid = oids_of(store, "big")[0]
    src = object_path(store, oid)
    stray = "ab" + os.urandom(15).hex()
    shutil.copy(src, store / "objects" / stray[:2] / stray)
    foreign = store / "objects" / "ab" / "not-an-object"
    foreign.write_bytes(b"x")
    code, report = fsck(store)
    assert code == EXIT_CLEAN, report  # a leftover is a note, not damage
    assert {"unreferenced-object", "foreign-key"} <= kinds(report, "note")
    code, report = fsck(store, "--repair")
    assert code == EXIT_REPAIRED
    objs = list_objects(store)
    assert stray not in objs and oid in objs
    assert foreign.exists(), "fsck deleted a key that is not an s3fuse object"
    assert "unreferenced-object" not in kinds(fsck(store)[1])
    m = mount_factory(store=store)
    check_tree(m, prepared.files)


def test_referenced_object_on_the_deletion_list(prepared, store, mount_factory):
    oid = oids_of(store, "big")[1]
    con = db(store)
    con.execute("INSERT INTO garbage (object_id) VALUES (?)", (bytes.fromhex(oid),))
    con.close()
    check_damaged_then_repair(store, {"referenced-garbage"})
    assert oid in list_objects(store)
    m = mount_factory(store=store)
    check_tree(m, prepared.files)


def test_after_kill9_leftovers_are_notes(prepared, store, mount_factory):
    m = mount_factory(store=store)
    _write(m.mnt / "new", os.urandom(1000))
    fd = os.open(m.mnt / "new", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    m.kill9()
    code, report = fsck(store)
    assert code == EXIT_CLEAN, report
    assert "unclean" in kinds(report, "note")
    code, report = fsck(store, "--repair")
    assert code == EXIT_REPAIRED
    code, report = fsck(store)
    assert code == EXIT_CLEAN and not report["findings"] or kinds(report) == {"unverifiable"}, report


# ---------------------------------------------------------------------- namespace


def test_wrong_link_counts(prepared, store, mount_factory):
    con = db(store)
    con.execute("UPDATE inodes SET nlink=5 WHERE id=?", (inode_of(store, "hl1"),))
    con.execute("UPDATE inodes SET nlink=7 WHERE id=?", (inode_of(store, "d1"),))
    con.close()
    check_damaged_then_repair(store, {"link-count"})
    m = mount_factory(store=store)
    assert os.stat(m.mnt / "hl1").st_nlink == 2
    assert os.stat(m.mnt / "d1").st_nlink == 3
    check_tree(m, prepared.files)


def test_dangling_entry_removed(prepared, store, mount_factory):
    con = db(store)
    con.execute("INSERT INTO dentries (parent, name, inode) VALUES (1, ?, 99999)", (b"ghost",))
    con.close()
    check_damaged_then_repair(store, {"dangling-entry"})
    m = mount_factory(store=store)
    assert "ghost" not in os.listdir(m.mnt)
    check_tree(m, prepared.files)


def test_directory_cycle_and_orphans_go_to_lost_found(prepared, store, mount_factory):
    d1, d2 = inode_of(store, "d1"), inode_of(store, "d1/d2")
    con = db(store)
    # d1 moved under its own child: both become unreachable from the root (a cycle)
    con.execute("UPDATE dentries SET parent=? WHERE inode=?", (d2, d1))
    # an entry in a directory that does not exist
    (small,) = con.execute("SELECT inode FROM dentries WHERE parent=1 AND name=?", (b"small",)).fetchone()
    con.execute("UPDATE dentries SET parent=424242, name=? WHERE inode=?", (b"s" * 255, small))
    con.close()
    check_damaged_then_repair(store, {"disconnected", "orphan-entry"})
    m = mount_factory(store=store)
    found = sorted(os.listdir(m.mnt / "lost+found"))
    assert len(found) == 2, found
    # every byte is still there, reachable again
    by_content = {}
    for dirpath, _dirs, names in os.walk(m.mnt / "lost+found"):
        for n in names:
            by_content[(Path(dirpath) / n).read_bytes()] = n
    for name in ("small", "d1/d2/file", "hl1"):
        assert prepared.files[name] in by_content, f"{name} was lost"
    assert all(len(os.fsencode(n)) <= 255 for n in found)  # a 255-byte name stays within NAME_MAX
    assert "d1" not in os.listdir(m.mnt)


def test_disconnected_file_inode(prepared, store, mount_factory):
    ino = inode_of(store, "small")
    con = db(store)
    con.execute("DELETE FROM dentries WHERE inode=?", (ino,))
    con.close()
    check_damaged_then_repair(store, {"disconnected", "link-count"})
    m = mount_factory(store=store)
    (name,) = os.listdir(m.mnt / "lost+found")
    assert (m.mnt / "lost+found" / name).read_bytes() == b"hello"


def test_unlinked_inode_is_a_note(prepared, store):
    con = db(store)
    ino = inode_of(store, "d1/d2/file")
    con.execute("DELETE FROM dentries WHERE inode=?", (ino,))
    con.execute("UPDATE inodes SET nlink=0 WHERE id=?", (ino,))
    con.close()
    oid = oids_of_ino(store, ino)
    code, report = fsck(store)
    assert code == EXIT_CLEAN and "unlinked-inode" in kinds(report, "note"), report
    code, _ = fsck(store, "--repair")
    assert code == EXIT_REPAIRED
    assert not set(oid) & list_objects(store)


def oids_of_ino(store: Path, ino: int) -> list[str]:
    con = db(store)
    rows = con.execute("SELECT object_id FROM blocks WHERE inode=?", (ino,)).fetchall()
    con.close()
    return [r[0].hex() for r in rows]


# ---------------------------------------------------------------------- block map


def test_block_rows_past_the_size(prepared, store, mount_factory):
    ino = inode_of(store, "big")
    con = db(store)
    con.execute("UPDATE inodes SET size=? WHERE id=?", (BS + 10, ino))
    con.close()
    gone = oids_of(store, "big")[2]
    check_damaged_then_repair(store, {"block-past-end"})
    assert gone not in list_objects(store)
    m = mount_factory(store=store)
    assert (m.mnt / "big").read_bytes() == prepared.files["big"][:BS + 10]


def test_impossible_block_row_and_stored_bytes(prepared, store, mount_factory):
    ino = inode_of(store, "victim")
    con = db(store)
    con.execute("UPDATE blocks SET length=obj_length+1 WHERE inode=? AND blockno=0", (ino,))
    con.execute("UPDATE inodes SET stored_bytes=1 WHERE id=?", (inode_of(store, "small"),))
    con.close()
    check_damaged_then_repair(store, {"bad-block-row", "stored-bytes"})
    m = mount_factory(store=store)
    assert "victim" not in os.listdir(m.mnt)
    assert os.stat(m.mnt / "small").st_blocks == 1
    check_tree(m, prepared.files, skip={"victim"})


def test_block_rows_of_a_missing_inode_are_recovered(prepared, store, mount_factory):
    ino = inode_of(store, "d1/d2/file")
    con = db(store)
    con.execute("DELETE FROM dentries WHERE inode=?", (ino,))
    con.execute("DELETE FROM inodes WHERE id=?", (ino,))
    con.close()
    check_damaged_then_repair(store, {"stray-blocks"})
    m = mount_factory(store=store)
    assert (m.mnt / "lost+found" / f"#{ino}").read_bytes() == prepared.files["d1/d2/file"]


# ---------------------------------------------------------------------- keys


def test_missing_master_key_version(prepared, store, mount_factory):
    ino = inode_of(store, "victim")
    con = db(store)
    con.execute("UPDATE blocks SET key_version=77 WHERE inode=? AND blockno=0", (ino,))
    con.close()
    fixed = check_damaged_then_repair(store, {"missing-master-key", "missing-key"})
    assert "missing-master-key" in {f["kind"] for f in fixed["findings"] if f["repaired"]}
    m = mount_factory(store=store)
    check_tree(m, prepared.files, skip={"victim"})


def test_wrapped_key_copied_from_another_object(prepared, store):
    a, b = inode_of(store, "victim"), inode_of(store, "big")
    con = db(store)
    (slot,) = con.execute("SELECT key_slot FROM blocks WHERE inode=? AND blockno=0", (b,)).fetchone()
    con.execute("UPDATE blocks SET key_slot=? WHERE inode=? AND blockno=0", (slot, a))
    con.close()
    check_damaged_then_repair(store, {"bad-key-slot"})


def test_missing_kms_keystore(prepared, store):
    os.unlink(store / "kms.bin")
    code, report = fsck(store)
    assert code == EXIT_DAMAGED
    assert {"missing-kms-key", "missing-key"} <= kinds(report, "damage"), report
    kms_ino = inode_of(store, "kms/f")
    assert any(f["inode"] == kms_ino for f in report["findings"] if f["kind"] == "missing-key")


def test_database_edited_to_point_at_another_files_object(prepared, store, mount_factory):
    a, b = inode_of(store, "victim"), inode_of(store, "big")
    con = db(store)
    row = con.execute("SELECT object_id, length, obj_length, hdr_len, key_slot FROM blocks"
                      " WHERE inode=? AND blockno=1", (b,)).fetchone()
    con.execute("DELETE FROM blocks WHERE inode=? AND blockno=1", (b,))
    con.execute("UPDATE blocks SET object_id=?, length=?, obj_length=?, hdr_len=?, key_slot=?"
                " WHERE inode=? AND blockno=1", (*row, a))
    con.execute("UPDATE inodes SET stored_bytes=stored_bytes-? WHERE id=?", (row[1], b))
    con.close()
    code, report = fsck(store)
    assert code == EXIT_DAMAGED
    assert "bad-key-slot" in kinds(report, "damage"), report
