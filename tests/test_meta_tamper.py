"""Edits of meta.db (and store.json) made with the store unmounted, on a real mount: each one
the issue lists gives EIO where a reader meets it, and `s3fuse fsck` exit 4. One store is
prepared per module and copied for each attack."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from s3fuse.policy import Policy

from .conftest import run_cli
from .test_sse import add_key

MiB = 1 << 20


def _ino(store: Path, path: str) -> int:
    con = sqlite3.connect(store / "meta.db")
    try:
        ino = 1
        for part in path.strip("/").split("/"):
            ino = con.execute("SELECT inode FROM dentries WHERE parent=? AND name=?",
                              (ino, part.encode())).fetchone()[0]
        return ino
    finally:
        con.close()


def _sql(store: Path, *statements) -> None:
    con = sqlite3.connect(store / "meta.db")
    con.execute("DROP INDEX IF EXISTS blocks_by_object")  # the attacker edits at will
    with con:
        for sql, args in statements:
            con.execute(sql, args)
    con.close()


@pytest.fixture(scope="module")
def prepared(module_mount_factory):
    m = module_mount_factory()
    mnt = m.mnt
    (mnt / "cut").write_bytes(os.urandom(204_800))
    os.truncate(mnt / "cut", 1000)
    (mnt / "big").write_bytes(os.urandom(12 * MiB))
    (mnt / "a").write_bytes(b"file a" * 100)
    (mnt / "b").write_bytes(b"file b" * 100)
    (mnt / "d").mkdir()
    (mnt / "e").mkdir()
    (mnt / "d" / "x").write_bytes(b"x")
    os.setxattr(mnt / "d", "user.s3fuse.sse", b"AES256")
    (mnt / "c").mkdir()
    add_key(mnt, "c1", os.urandom(32))
    os.setxattr(mnt / "c", "user.s3fuse.sse", b"SSE-C:c1")
    (mnt / "c" / "y").write_bytes(b"y")
    os.symlink("a", mnt / "l")
    (mnt / "r").write_bytes(b"first version")
    m.unmount()
    con = sqlite3.connect(m.store / "meta.db")
    old_r = con.execute("SELECT * FROM blocks WHERE inode=?", (_ino(m.store, "r"),)).fetchone()
    con.close()
    m.start()
    (m.mnt / "r").write_bytes(b"second version, longer")
    m.unmount()
    return m.store, old_r


@pytest.fixture
def attacked(prepared, tmp_path, mount_factory):
    """A copy of the prepared store; call with the edit, get a mount of it."""
    src, old_r = prepared

    def attack(edit):
        store = tmp_path / "store"
        shutil.copytree(src, store)
        edit(store, old_r)
        return store

    return attack


def _eio(fn) -> None:
    with pytest.raises(OSError) as exc:
        fn()
    assert exc.value.errno == errno.EIO, exc.value


def _read(p: Path):
    return lambda: p.read_bytes()


def _list(p: Path):
    return lambda: os.listdir(p)


def _fsck_says_damaged(store: Path) -> str:
    r = run_cli("fsck", store)
    assert r.returncode == 4, (r.returncode, r.stdout, r.stderr)
    return r.stdout


ATTACKS = {
    # the table
    "truncated bytes brought back": (
        lambda s, _: _sql(s, ("UPDATE blocks SET length = obj_length WHERE inode=?", (_ino(s, "cut"),)),
                          ("UPDATE inodes SET size = 204800 WHERE id=?", (_ino(s, "cut"),))), "cut", _read),
    "block row deleted": (
        lambda s, _: _sql(s, ("DELETE FROM blocks WHERE inode=? AND blockno=1", (_ino(s, "big"),)),
                          ("UPDATE inodes SET stored_bytes = 8388608 WHERE id=?", (_ino(s, "big"),))),
        "big", _read),
    "entry inodes swapped": (
        lambda s, _: _sql(s, ("UPDATE dentries SET inode = CASE inode WHEN :a THEN :b ELSE :a END"
                              " WHERE inode IN (:a, :b)", {"a": _ino(s, "a"), "b": _ino(s, "b")})), "a", _read),
    "size raised": (lambda s, _: _sql(s, ("UPDATE inodes SET size = size + 10 WHERE id=?", (_ino(s, "a"),))),
                    "a", _read),
    "size and length lowered": (
        lambda s, _: _sql(s, ("UPDATE inodes SET size = 10 WHERE id=?", (_ino(s, "a"),)),
                          ("UPDATE blocks SET length = 10 WHERE inode=?", (_ino(s, "a"),))), "a", _read),
    # the further list
    "row copied from another file": (
        lambda s, _: _sql(s, ("DELETE FROM blocks WHERE inode=?", (_ino(s, "a"),)),
                          ("UPDATE blocks SET inode=? WHERE inode=?", (_ino(s, "a"), _ino(s, "b")))), "a", _read),
    "row deleted and another inserted": (
        lambda s, _: _sql(s, ("DELETE FROM blocks WHERE inode=? AND blockno=2", (_ino(s, "big"),)),
                          ("UPDATE blocks SET blockno=2 WHERE inode=? AND blockno=1", (_ino(s, "big"),))),
        "big", _read),
    "old row replayed after a rewrite": (
        lambda s, old: _sql(s, ("DELETE FROM blocks WHERE inode=?", (old[0],)),
                            ("INSERT INTO blocks VALUES (" + ",".join("?" * len(old)) + ")", old)), "r", _read),
    "a listed file's inode row edited": (  # met by readdir, not by a lookup
        lambda s, _: _sql(s, ("UPDATE inodes SET mode = mode | 2 WHERE id=?", (_ino(s, "d/x"),))), "d", _list),
    "entry moved to another directory": (
        lambda s, _: _sql(s, ("UPDATE dentries SET parent=? WHERE name=?", (_ino(s, "e"), b"x"))), "e", _list),
    "symlink target changed": (
        lambda s, _: _sql(s, ("UPDATE symlinks SET target=? WHERE inode=?", (b"b", _ino(s, "l")))), "l",
        lambda p: lambda: os.readlink(p)),
    "directory encryption setting switched": (
        lambda s, _: _sql(s, ("UPDATE inodes SET sse=? WHERE id=?", (Policy("aws:kms").encode(), _ino(s, "d")))),
        "d/x", _read),
    "customer-key directory switched to SSE-S3": (
        lambda s, _: _sql(s, ("UPDATE inodes SET sse=? WHERE id=?", (Policy("AES256").encode(), _ino(s, "c")))),
        "c", _list),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_edit_gives_eio_and_fsck_damage(attacked, mount_factory, attack):
    edit, path, op = ATTACKS[attack]
    store = attacked(edit)
    m = mount_factory(store=store)
    _eio(op(m.mnt / path))
    m.unmount()
    assert "does not authenticate" in m.log_text()
    assert "forged-record" in _fsck_says_damaged(store)


@pytest.mark.parametrize("field,value", [("default_sse", "aws:kms"),
                                         ("kms", {"address": "https://attacker.example:8200"})])
def test_store_json_key_settings_edited(attacked, mount_factory, field, value):
    def edit(store, _):
        raw = json.loads((store / "store.json").read_text())
        raw[field] = value
        (store / "store.json").write_text(json.dumps(raw))

    store = attacked(edit)
    (store.parent / "mnt").mkdir()
    r = run_cli("mount", store, str(store.parent / "mnt"), "--foreground")
    assert r.returncode != 0 and "do not authenticate" in r.stderr, r
    assert "forged-settings" in _fsck_says_damaged(store)


def test_repair_moves_forged_file_to_lost_found(attacked):
    store = attacked(ATTACKS["size raised"][0])
    r = run_cli("fsck", "--repair", store)
    assert r.returncode in (1, 4), r
    r = run_cli("fsck", store)
    assert r.returncode == 0, r.stdout  # known damage, quarantined: a note
    con = sqlite3.connect(store / "meta.db")
    names = [n for (n,) in con.execute("SELECT name FROM dentries WHERE parent = (SELECT inode FROM dentries"
                                       " WHERE parent = 1 AND name = ?)", (b"lost+found",))]
    con.close()
    assert any(n.endswith(b"-a") for n in names), names


def _as_format_1(store: Path) -> None:
    """Make a store look as the previous format wrote it: no metadata key in the keyring,
    no MAC or digest columns, store.json format 1 without its MAC, schema version 1."""
    from s3fuse.keys.keyring import Keyring

    raw = json.loads((store / "store.json").read_text())
    root_key = (store / "root.key").read_bytes()
    sid = bytes.fromhex(raw["store_id"])
    k = Keyring.unseal((store / "keyring.bin").read_bytes(), root_key, sid)
    Keyring(k.keys, k.current, k.created, k.retired).save(str(store / "keyring.bin"), root_key, sid)
    raw["format"] = 1
    del raw["meta_mac"]
    (store / "store.json").write_text(json.dumps(raw))
    con = sqlite3.connect(store / "meta.db")
    for table in ("inodes", "dentries", "symlinks", "blocks"):
        con.execute(f"ALTER TABLE {table} DROP COLUMN mac")
    con.execute("ALTER TABLE inodes DROP COLUMN digest")
    con.execute("UPDATE state SET value = 1 WHERE key = 'schema_version'")
    con.commit()
    con.close()


def test_previous_format_upgraded_at_mount_then_attacked(attacked, mount_factory):
    store = attacked(lambda s, _: _as_format_1(s))
    assert run_cli("fsck", store).returncode == 0  # not yet authenticated: a note only
    m = mount_factory(store=store)
    assert (m.mnt / "a").read_bytes() == b"file a" * 100
    assert sorted(os.listdir(m.mnt / "d")) == ["x"] and os.readlink(m.mnt / "l") == "a"
    m.unmount()
    assert m.log_text().count("made before authenticated metadata") == 1
    assert json.loads((store / "store.json").read_text())["format"] == 2
    assert run_cli("fsck", store).returncode == 0
    m.start()  # no second upgrade
    m.unmount()
    assert m.log_text(all_generations=True).count("made before authenticated metadata") == 1
    ATTACKS["size raised"][0](store, None)
    m.start()
    _eio(_read(m.mnt / "a"))
    m.unmount()
    assert "forged-record" in _fsck_says_damaged(store)
    # putting back format 1 in store.json asks for no second upgrade: the keyring decides
    raw = json.loads((store / "store.json").read_text())
    raw["format"] = 1
    (store / "store.json").write_text(json.dumps(raw))
    m.start()
    _eio(_read(m.mnt / "a"))
    m.unmount()
