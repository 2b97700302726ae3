"""The metadata database's in-memory shortcuts stay correct and bounded."""

from __future__ import annotations

import time

from s3fuse import meta as meta_mod
from s3fuse.meta import Meta


def test_xattr_shortcut_answers_like_the_database(tmp_path, monkeypatch):
    monkeypatch.setattr(meta_mod, "XATTR_SET_LIMIT", 3)
    m = Meta.create(str(tmp_path / "m.db"), 0, 0, time.time_ns())
    with m.transaction():
        for ino in range(2, 5):
            m.set_xattr(ino, b"user.a", b"v%d" % ino)
    assert m.get_xattr(3, b"user.a") == b"v3"
    assert m.get_xattr(30, b"user.a") is None
    assert m._xattr_inodes == {2, 3, 4}
    # past the limit the set is dropped and every lookup asks the database
    with m.transaction():
        for ino in range(5, 9):
            m.set_xattr(ino, b"user.b", b"w")
    assert m.get_xattr(8, b"user.b") == b"w"
    assert m._xattr_inodes is meta_mod._ALWAYS_ASK
    assert m.list_xattrs(7) == [b"user.b"]
    # a new connection with more inodes than the limit starts in that mode
    again = Meta(str(tmp_path / "m.db"))
    assert again.get_xattr(6, b"user.b") == b"w"
    assert again._xattr_inodes is meta_mod._ALWAYS_ASK


def test_inode_rows_held_in_memory_answer_like_the_database(tmp_path, monkeypatch):
    """Meta.inode serves rows from memory: after creates, updates, truncates, deletes and a
    rolled-back transaction, and past the cache's bound, it still gives what a query gives."""
    import random
    import sqlite3
    import stat

    import pytest

    monkeypatch.setattr(meta_mod, "INODE_CACHE", 8)
    m = Meta.create(str(tmp_path / "m.db"), 0, 0, time.time_ns())
    fresh = sqlite3.connect(str(tmp_path / "m.db"), isolation_level=None)  # committed rows only
    rng = random.Random(5)
    inos = []

    def agree() -> None:
        for ino in inos + [1, 10_000]:
            row = fresh.execute(f"SELECT {meta_mod._INODE_COLS} FROM inodes WHERE id=?", (ino,)).fetchone()
            assert m.inode(ino) == (None if row is None else meta_mod.Inode(*row)), ino

    for step in range(300):
        action = rng.choice(["create", "update", "update", "truncate", "delete", "rollback"])
        with m.transaction():
            if action == "create" or not inos:
                inos.append(m.create_inode(stat.S_IFREG | 0o644, 0, 0, 1, step).id)
            elif action == "update":
                m.update_inode(rng.choice(inos), size=rng.randrange(1 << 20), mtime_ns=step)
            elif action == "truncate":
                m.truncate_blocks(rng.choice(inos), 0, 4096)
            elif action == "delete":
                m.delete_inode(inos.pop(rng.randrange(len(inos))))
        if action == "rollback":
            ino = rng.choice(inos)
            with pytest.raises(RuntimeError), m.transaction():
                m.update_inode(ino, nlink=7, uid=99)
                assert m.inode(ino).uid == 99  # the transaction sees its own change
                raise RuntimeError("abandoned")
        agree()
        if inos:
            row = m.inode(inos[0])
            row.size = -1  # a caller's copy: changing it changes nothing held
            assert m.inode(inos[0]).size != -1
    assert len(m._rows) <= 8


def test_block_rows_read_ahead_answer_like_the_database(tmp_path):
    """Meta.block serves block 0 from the rows a directory walk read ahead (first_blocks_after):
    after puts, deletes, truncates, patches, key-slot swaps, inode deletions and a rolled-back
    transaction in between, it still gives what a query gives."""
    import os
    import random
    import stat

    import pytest

    from s3fuse.format import patch_number
    from s3fuse.meta import BlockRef

    m = Meta.create(str(tmp_path / "m.db"), 0, 0, time.time_ns(), key=os.urandom(32))
    rng = random.Random(7)
    inos = []

    def ref(ino: int, blockno: int = 0) -> BlockRef:
        return BlockRef(ino, blockno, os.urandom(16), 4096, 4096, 64, "AES256", "", 1, os.urandom(60))

    def from_database(ino: int):
        row = m.db.execute(f"SELECT {meta_mod._BLOCK_COLS} FROM blocks WHERE inode=? AND blockno=0",
                           (ino,)).fetchone()
        return None if row is None else BlockRef(*row)

    for step in range(300):
        m.first_blocks_after(1, 0, 1000)  # what a walk reads ahead, before the next change
        assert set(m._first_blocks) == set(inos)  # all made here, so all trusted
        action = rng.choice(["create", "put", "put", "delete", "truncate", "patch", "reslot", "drop", "rollback"])
        with m.transaction():
            if action == "create" or not inos:
                ino = m.create_inode(stat.S_IFREG | 0o644, 0, 0, 1, step).id
                m.add_entry(1, b"f%d" % ino, ino)
                inos.append(ino)
            elif action == "put":
                m.put_block(ref(rng.choice(inos)))
            elif action == "delete":
                ino = rng.choice(inos)
                if m.block(ino, 0) is not None:
                    m.delete_block(ino, 0)
            elif action == "truncate":
                m.truncate_blocks(rng.choice(inos), rng.choice([0, 100]), 4096)
            elif action == "patch":
                ino = rng.choice(inos)
                m.put_block(ref(ino, patch_number(0, 0)))
            elif action == "reslot":
                ino = rng.choice(inos)
                old = from_database(ino)
                if old is not None:
                    m.replace_key_slot(old.object_id, old.key_slot, os.urandom(60), 2)
            elif action == "drop":
                ino = inos.pop(rng.randrange(len(inos)))
                m.remove_entry(1, b"f%d" % ino, ino)
                m.delete_inode(ino)
        if action == "rollback":
            ino = rng.choice(inos)
            with pytest.raises(RuntimeError), m.transaction():
                m.put_block(ref(ino))
                m.first_blocks_after(1, 0, 1000)
                raise RuntimeError("abandoned")
        for ino in inos:
            assert m.block(ino, 0) == from_database(ino), (step, action, ino)


def test_a_checkpointed_wal_is_emptied_before_it_is_written_again(tmp_path):
    """Rewriting an old WAL in place reads its pages back from disk when they are no longer
    cached (frames straddle pages); so a restarted WAL starts from an empty file."""
    import os
    import stat

    path = str(tmp_path / "m.db")
    m = Meta.create(path, 0, 0, time.time_ns())
    for i in range(300):
        with m.transaction():
            m.create_inode(stat.S_IFREG | 0o644, 0, 0, 1, time.time_ns())
    grown = os.path.getsize(path + "-wal")
    assert grown > 300 * 4096
    busy, frames, backfilled = m.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and frames == backfilled
    with m.transaction():  # the first write after the checkpoint restarts the WAL
        m.create_inode(stat.S_IFREG | 0o644, 0, 0, 1, time.time_ns())
    assert os.path.getsize(path + "-wal") < 16 * 4096


def test_deferred_transactions_commit_together_and_fail_alone(tmp_path):
    """A deferred transaction is seen at once on this connection, reaches the database file
    only with the next transaction that commits (or `commit`), and a failing one rolls back
    without the deferred ones before it."""
    import os
    import sqlite3

    import pytest

    from s3fuse.errors import S3fuseError

    path = str(tmp_path / "m.db")
    m = Meta.create(path, 0, 0, time.time_ns(), key=os.urandom(32))
    told = []
    m.on_deferred = lambda: told.append(1)
    other = sqlite3.connect(path)

    def committed_names() -> set[bytes]:
        return {r[0] for r in other.execute("SELECT name FROM dentries")}

    def make(name: bytes) -> int:
        with m.transaction(defer=True):
            row = m.create_inode(0o100644, 0, 0, 1, time.time_ns())
            m.add_entry(1, name, row.id)
        return row.id

    a = make(b"a")
    b = make(b"b")
    assert told == [1]  # once per group
    assert m.lookup(1, b"a") == a and m.lookup(1, b"b") == b
    assert committed_names() == set()
    assert not m.checkpoint()  # it would move frames of a transaction not yet committed

    with pytest.raises(S3fuseError), m.transaction(defer=True):
        m.add_entry(1, b"c", m.create_inode(0o100644, 0, 0, 1, time.time_ns()).id)
        raise S3fuseError("refused", 5)
    assert m.lookup(1, b"c") is None and m.lookup(1, b"a") == a

    # an inode deleted "soon" goes with a transaction that commits, not with a deferred one
    with m.transaction(defer=True):
        m.remove_entry(1, b"b")
        m.update_inode(b, nlink=0)
    m.delete_inode_soon(b)
    make(b"d")
    assert m.inode(b) is not None
    with m.transaction():  # an ordinary transaction commits the group
        m.set_state("x", 1)
    assert committed_names() == {b"a", b"d"}
    assert m.inode(b) is None
    assert other.execute("SELECT count(*) FROM inodes WHERE id=?", (b,)).fetchone()[0] == 0

    make(b"e")
    assert told == [1, 1]
    m.commit()
    assert committed_names() == {b"a", b"d", b"e"}
    # every row still authenticates from a fresh connection
    fresh = Meta(path, m.key)
    assert fresh.lookup(1, b"e") is not None and fresh.lookup(1, b"a") == a


def test_waiting_since_dates_the_oldest_change_a_commit_has_not_covered(tmp_path):
    """The commit timer's reference: set by the first deferred transaction or deletion left
    for the next commit, kept by those after it, cleared by the commit that covers them (a
    timer started for a group another commit covered then waits for the next group's own
    delay instead of committing it at once)."""
    import os

    path = str(tmp_path / "m.db")
    m = Meta.create(path, 0, 0, time.time_ns(), key=os.urandom(32))
    m.on_deferred = lambda: None
    assert m.waiting_since() is None

    def make(name: bytes) -> int:
        with m.transaction(defer=True):
            row = m.create_inode(0o100644, 0, 0, 1, time.time_ns())
            m.add_entry(1, name, row.id)
        return row.id

    before = time.monotonic()
    a = make(b"a")
    first = m.waiting_since()
    assert first is not None and before <= first <= time.monotonic()
    make(b"b")
    assert m.waiting_since() == first  # a later change does not move it
    with m.transaction():  # an ordinary transaction commits the group
        m.set_state("x", 1)
    assert m.waiting_since() is None

    with m.transaction():
        m.remove_entry(1, b"a")
        m.update_inode(a, nlink=0)
    assert m.waiting_since() is None
    m.delete_inode_soon(a)  # a deletion left for the next commit waits too
    assert m.waiting_since() is not None
    m.commit()
    assert m.waiting_since() is None and m.inode(a) is None


def test_deferred_transactions_whose_commit_fails_are_made_again(tmp_path):
    """A commit that fails (disk full: SQLite rolls the transaction back) loses no deferred
    transaction: their requests were answered, so they are made again and committed later."""
    import os
    import sqlite3

    import pytest

    path = str(tmp_path / "m.db")
    m = Meta.create(path, 0, 0, time.time_ns(), key=os.urandom(32))
    told = []
    m.on_deferred = lambda: told.append(1)

    class FullDisk:
        def __init__(self, db):
            self._db = db
            self.fail = 0

        def execute(self, sql, params=()):
            if sql == "COMMIT" and self.fail:
                self.fail -= 1
                self._db.execute("ROLLBACK")
                raise sqlite3.OperationalError("database or disk is full")
            return self._db.execute(sql, params)

        def __getattr__(self, name):
            return getattr(self._db, name)

    m.db = disk = FullDisk(m.db)
    made = {}
    for name in (b"a", b"b", b"c"):
        with m.transaction(defer=True):
            row = m.create_inode(0o100644, 0, 0, 1, time.time_ns())
            m.add_entry(1, name, row.id)
            made[name] = row.id
    with m.transaction(defer=True):
        m.remove_entry(1, b"c")
        m.update_inode(made[b"c"], nlink=0)
    disk.fail = 1
    with pytest.raises(sqlite3.OperationalError), m.transaction():  # e.g. the flusher's commit
        m.set_state("x", 1)
    assert m.commit_failing and len(told) == 2  # a retry was asked for
    assert m.get_state("x") is None  # the transaction that failed to commit failed alone
    assert m.lookup(1, b"a") == made[b"a"] and m.lookup(1, b"c") is None
    m.commit()
    assert not m.commit_failing
    fresh = Meta(path, m.key)
    assert fresh.lookup(1, b"a") == made[b"a"] and fresh.lookup(1, b"b") == made[b"b"]
    assert fresh.lookup(1, b"c") is None and fresh.inode(made[b"c"]).nlink == 0
