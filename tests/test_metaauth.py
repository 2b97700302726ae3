"""Authenticated metadata without a mount: the record MACs (metaauth.py), their documented
vector, and the database's checks (meta.py) against each kind of edit of meta.db."""

from __future__ import annotations

import os
import re
import sqlite3
import time

import pytest

from s3fuse import metaauth as ma
from s3fuse.meta import ROOT_INODE, BlockRef, Forged, Meta

from . import vectors

FORMAT_MD = os.path.join(os.path.dirname(__file__), "..", "docs", "FORMAT.md")
KEY = bytes(range(32))
BS = 4 << 20


def test_macs_match_documented_vector():
    text = open(FORMAT_MD).read().split("Metadata MACs of that vector:", 1)[1]
    block = re.search(r"```\n(.*?)```", text, re.S).group(1)
    documented = dict(line.split() for line in block.strip().splitlines())
    assert {k: v.hex() for k, v in vectors.metadata_macs().items()} == documented


def test_position_is_bound():
    assert ma.entry_mac(KEY, 1, b"a", 2) != ma.entry_mac(KEY, 5, b"a", 2)
    assert ma.entry_mac(KEY, 1, b"a", 2) != ma.entry_mac(KEY, 1, b"a", 3)
    args = (b"o" * 16, 10, 10, 64, "AES256", "", 1, b"slot")
    assert ma.block_mac(KEY, 2, 0, *args) != ma.block_mac(KEY, 2, 1, *args)
    assert ma.block_mac(KEY, 2, 0, *args) != ma.block_mac(KEY, 3, 0, *args)
    assert ma.symlink_mac(KEY, 2, b"t") != ma.symlink_mac(KEY, 3, b"t")
    # the length prefixes keep field boundaries: no two encodings run together
    assert ma.entry_mac(KEY, 1, b"ab", 2) != ma.entry_mac(KEY, 1, b"a", 2)
    assert ma.inode_mac(KEY, 2, 1, 2, 3, 4, 5, 6, None, ma.ZERO) != ma.inode_mac(KEY, 2, 1, 2, 3, 4, 5, 6,
                                                                                   b"", ma.ZERO)


def test_digest_add_sub_and_no_cancelling():
    a, b = ma.entry_mac(KEY, 1, b"a", 2), ma.entry_mac(KEY, 1, b"b", 3)
    d = ma.add(ma.add(ma.ZERO, a), b)
    assert d == ma.digest_of([b, a])
    assert ma.sub(d, b) == ma.digest_of([a])
    assert ma.digest_of([a, a]) != ma.ZERO  # unlike XOR, a pair does not cancel
    assert ma.sub(ma.ZERO, a) != ma.ZERO and ma.add(ma.sub(ma.ZERO, a), a) == ma.ZERO


def test_config_mac_covers_key_settings_only():
    raw = {"format": 2, "store_id": "aa", "block_size": BS, "segment_size": 65536, "default_sse": "AES256",
           "kms": {"address": "https://bao:8200"}, "rotation_interval": 30}
    raw[ma.CONFIG_MAC] = ma.config_mac(KEY, raw)
    assert ma.check_config(KEY, raw)
    assert ma.check_config(KEY, {**raw, "rotation_interval": 60, "format": 1})
    for field, value in (("default_sse", "aws:kms:x"), ("kms", {"address": "https://evil:8200"}),
                         ("block_size", 1 << 20)):
        assert not ma.check_config(KEY, {**raw, field: value}), field
    assert not ma.check_config(KEY, {k: v for k, v in raw.items() if k != ma.CONFIG_MAC})


# ---------------------------------------------------------------- the database's checks

def _ref(ino: int, blockno: int, length: int = 100) -> BlockRef:
    return BlockRef(ino, blockno, os.urandom(16), length, length, 64, "AES256", "", 1, os.urandom(60))


@pytest.fixture
def store(tmp_path):
    """A signed database: /f (2 blocks), /g (1 block), /d/ (with /d/x), /l -> f."""
    path = str(tmp_path / "meta.db")
    m = Meta.create(path, 0, 0, time.time_ns(), key=KEY)
    ids = {}
    with m.transaction():
        for name, blocks in (("f", 2), ("g", 1)):
            ino = m.create_inode(0o100644, 0, 0, 1, 1).id
            m.add_entry(ROOT_INODE, name.encode(), ino)
            for b in range(blocks):
                m.put_block(_ref(ino, b))
            m.update_inode(ino, size=blocks * BS)
            ids[name] = ino
        ids["d"] = m.create_inode(0o040755, 0, 0, 2, 1).id
        m.add_entry(ROOT_INODE, b"d", ids["d"])
        ids["x"] = m.create_inode(0o100644, 0, 0, 1, 1).id
        m.add_entry(ids["d"], b"x", ids["x"])
        ids["l"] = m.create_inode(0o120777, 0, 0, 1, 1).id
        m.add_entry(ROOT_INODE, b"l", ids["l"])
        m.set_symlink(ids["l"], b"f")
    m.close()
    return path, ids


def _edit(path: str, *statements) -> None:
    db = sqlite3.connect(path)
    with db:
        for sql, args in statements:
            db.execute(sql, args)
    db.close()


def _reads(path: str, ids: dict) -> None:
    """What a mount reads, through a fresh connection (nothing held in memory)."""
    m = Meta(path, KEY)
    try:
        for parent in (ROOT_INODE, ids["d"]):
            for _, name, *row in m.entries_after(parent, 0, 100):
                assert m.lookup(parent, name) == row[0]
        for name in ("f", "g"):
            m.inode(ids[name])
            m.blocks_of(ids[name])
            m.block(ids[name], 0)
        m.symlink_target(ids["l"])
    finally:
        m.db.close()


def test_clean_store_reads_and_checks_clean(store):
    path, ids = store
    _reads(path, ids)
    assert Meta(path, KEY).forged_records() == []


ATTACKS = {
    "raise size": [("UPDATE inodes SET size = size + 1 WHERE id = :f", None)],
    "lower size and length": [("UPDATE inodes SET size = 10 WHERE id = :f", None),
                              ("UPDATE blocks SET length = 10 WHERE inode = :f AND blockno = 0", None)],
    "length back to obj_length": [("UPDATE blocks SET length = 50 WHERE inode = :f AND blockno = 0", None)],
    "delete block row": [("DELETE FROM blocks WHERE inode = :f AND blockno = 1", None)],
    "swap entry inodes": [("UPDATE dentries SET inode = CASE inode WHEN :f THEN :g ELSE :f END"
                           " WHERE inode IN (:f, :g)", None)],
    "row copied from another file": [("DELETE FROM blocks WHERE inode = :f AND blockno = 0", None),
                                     ("UPDATE blocks SET inode = :f WHERE inode = :g AND blockno = 0", None)],
    "entry moved to another directory": [("UPDATE dentries SET parent = :d WHERE name = x'67'", None)],
    "symlink target changed": [("UPDATE symlinks SET target = 'g' WHERE inode = :l", None)],
    "sse switched": [("UPDATE inodes SET sse = x'81a46d6f6465a6414553323536' WHERE id = :d", None)],
    "mode changed": [("UPDATE inodes SET mode = 33279 WHERE id = :f", None)],
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_each_edit_is_caught_on_read_and_by_the_full_check(store, attack):
    path, ids = store
    _edit(path, *[(sql, ids) for sql, _ in ATTACKS[attack]])
    with pytest.raises(Forged):
        _reads(path, ids)
    assert Meta(path, KEY).forged_records(), attack


def test_deleted_and_reinserted_row_is_the_same_state(store):
    path, ids = store
    db = sqlite3.connect(path)
    row = db.execute("SELECT * FROM blocks WHERE inode = ? AND blockno = 1", (ids["f"],)).fetchone()
    with db:
        db.execute("DELETE FROM blocks WHERE inode = ? AND blockno = 1", (ids["f"],))
    db.close()
    with pytest.raises(Forged):
        _reads(path, ids)
    _edit(path, ("INSERT INTO blocks VALUES (" + ",".join("?" * len(row)) + ")", row))
    _reads(path, ids)  # the very row back: nothing changed
    assert Meta(path, KEY).forged_records() == []


def test_added_row_is_caught(store):
    path, ids = store
    m = Meta(path, KEY)
    ref = _ref(ids["g"], 5)
    from s3fuse.meta import block_mac  # a row with a valid MAC of its own, not in g's digest

    _edit(path, ("INSERT INTO blocks VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                 (ref.inode, ref.blockno, ref.object_id, ref.length, ref.obj_length, ref.hdr_len, ref.mode,
                  ref.key_ref, ref.key_version, ref.key_slot, block_mac(KEY, ref))))
    m.db.close()
    with pytest.raises(Forged):
        _reads(path, ids)
    assert Meta(path, KEY).forged_records() == [(ids["g"], "block map (a row deleted, added or replayed)")]


def test_old_row_replayed_after_rewrite(store):
    path, ids = store
    db = sqlite3.connect(path)
    old = db.execute("SELECT * FROM blocks WHERE inode = ? AND blockno = 0", (ids["f"],)).fetchone()
    db.close()
    m = Meta(path, KEY)
    with m.transaction():
        m.put_block(_ref(ids["f"], 0, 200))
    m.close()
    _reads(path, ids)
    _edit(path, ("DELETE FROM blocks WHERE inode = ? AND blockno = 0", (ids["f"],)),
          ("INSERT INTO blocks VALUES (" + ",".join("?" * len(old)) + ")", old))
    with pytest.raises(Forged):
        _reads(path, ids)
    assert Meta(path, KEY).forged_records()


def test_changes_keep_digests_consistent(store):
    """Every write path of meta.py keeps the digests right (a false EIO would be a bug)."""
    path, ids = store
    m = Meta(path, KEY)
    with m.transaction():
        m.move_entry(ROOT_INODE, b"g", ids["d"], b"g2")
        m.set_entry_inode(ids["d"], b"x", ids["f"])
        m.remove_entry(ROOT_INODE, b"f")
        m.truncate_blocks(ids["f"], BS + 10, BS)
        m.truncate_blocks(ids["f"], 10, BS)
        m.delete_block(ids["g"], 0)
        ref = m.block(ids["f"], 0)
        assert m.replace_key_slot(ref.object_id, ref.key_slot, b"new slot", 2)
        m.update_inode(ids["f"], size=10, mode=0o100600, nlink=1)
    m.close()
    assert Meta(path, KEY).forged_records() == []
    m = Meta(path, KEY)
    assert m.lookup(ids["d"], b"x") == ids["f"] and m.block(ids["f"], 0).length == 10


def test_upgrade_signs_an_unsigned_store(tmp_path):
    path = str(tmp_path / "meta.db")
    m = Meta.create(path, 0, 0, time.time_ns())  # no key: as a format-1 store's rows
    with m.transaction():
        ino = m.create_inode(0o100644, 0, 0, 1, 1).id
        m.add_entry(ROOT_INODE, b"f", ino)
        m.put_block(_ref(ino, 0))
    m.close()
    m = Meta(path)
    assert m.authenticate_all(KEY) == 2
    m.close()
    m = Meta(path, KEY)
    assert m.forged_records() == [] and m.lookup(ROOT_INODE, b"f") == ino
    assert m.get_state("schema_version") == 2
