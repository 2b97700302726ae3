"""The metadata database: the namespace, attributes, xattrs and block map, in SQLite.

SQLite runs on the trio thread (as in S3QL): every mutation is one transaction,
and the code between two checkpoints is the critical section, so there are no
database locks. `schema()` documents every column.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

ROOT_INODE = 1
# inode rows kept in memory (about 4 MiB at most): getattr, open, create and the data path
# read the same few rows again and again, and a dictionary lookup costs a tenth of a query
INODE_CACHE = 16384
# up to this many inodes with xattrs are remembered in memory (a few MiB at most)
XATTR_SET_LIMIT = 100_000
_ALWAYS_ASK: set[int] = set()
SCHEMA_VERSION = 1

SCHEMA = """
-- One row per file, directory, symlink, FIFO, socket or device node.
CREATE TABLE inodes (
    id INTEGER PRIMARY KEY,
    mode INTEGER NOT NULL,          -- st_mode: type and permission bits
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    nlink INTEGER NOT NULL,         -- directory entries (dirs: 2 + subdirectories)
    size INTEGER NOT NULL DEFAULT 0,-- st_size as of the last committed flush
    rdev INTEGER NOT NULL DEFAULT 0,
    atime_ns INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    stored_bytes INTEGER NOT NULL DEFAULT 0, -- plaintext bytes held in objects (st_blocks)
    sse BLOB                        -- msgpack: encryption of this file's new objects, or a
                                    -- directory's default for new children (NULL: inherit)
);
-- Directory entries; id is a never-reused cursor for readdir.
CREATE TABLE dentries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER NOT NULL,
    name BLOB NOT NULL,
    inode INTEGER NOT NULL,
    UNIQUE (parent, name)
);
CREATE INDEX dentries_by_parent ON dentries (parent, id);
CREATE INDEX dentries_by_inode ON dentries (inode);
CREATE TABLE symlinks (
    inode INTEGER PRIMARY KEY,
    target BLOB NOT NULL
);
CREATE TABLE xattrs (
    inode INTEGER NOT NULL,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (inode, name)
) WITHOUT ROWID;
-- The block map: which object holds block `blockno` (of BLOCK_SIZE bytes) of a file,
-- with the object's encryption descriptor. No row = a hole (reads as zeros).
CREATE TABLE blocks (
    inode INTEGER NOT NULL,
    blockno INTEGER NOT NULL,
    object_id BLOB NOT NULL,        -- 16 random bytes, never reused; object key = hex
    length INTEGER NOT NULL,        -- valid plaintext bytes (<= obj_length after a truncate)
    obj_length INTEGER NOT NULL,    -- plaintext bytes in the object
    hdr_len INTEGER NOT NULL,       -- object header length, for ranged reads
    mode TEXT NOT NULL,             -- AES256 | aws:kms | SSE-C
    key_ref TEXT NOT NULL,          -- key identity within the mode (see docs/FORMAT.md)
    key_version INTEGER NOT NULL,   -- master-key or KMS backing-key version
    key_slot BLOB NOT NULL,         -- the data key, wrapped (docs/FORMAT.md, "Key slots")
    PRIMARY KEY (inode, blockno)
) WITHOUT ROWID;
CREATE UNIQUE INDEX blocks_by_object ON blocks (object_id);
-- Objects no longer referenced, to be deleted from the store by the collector.
CREATE TABLE garbage (
    object_id BLOB PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE state (
    key TEXT PRIMARY KEY,
    value
);
"""


@dataclass(slots=True)
class Inode:
    id: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    stored_bytes: int
    sse: bytes | None


@dataclass(slots=True)
class BlockRef:
    inode: int
    blockno: int
    object_id: bytes
    length: int
    obj_length: int
    hdr_len: int
    mode: str
    key_ref: str
    key_version: int
    key_slot: bytes


_INODE_COLS = "id, mode, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, ctime_ns, stored_bytes, sse"
_INODE_INDEX = {name.strip(): i for i, name in enumerate(_INODE_COLS.split(","))}
_BLOCK_COLS = "inode, blockno, object_id, length, obj_length, hdr_len, mode, key_ref, key_version, key_slot"
BLOCK_COLUMNS = _BLOCK_COLS  # a block-map row's columns in BlockRef's order (metaquery.py)


class Meta:
    def __init__(self, path: str) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=OFF")
        self.db.execute("PRAGMA wal_autocheckpoint=8192")
        # The WAL is emptied (not just rewound) when a checkpoint restarts it. A WAL frame is
        # a page plus a 24-byte header, so frames straddle the OS's pages, and rewriting a
        # WAL that is no longer in the page cache reads each page from disk first, with the
        # event loop waiting (docs/BENCH.md).
        self.db.execute("PRAGMA journal_size_limit=0")
        self.db.execute("PRAGMA cache_size=-32768")  # 32 MiB page cache, bounded
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE name='dentries'").fetchone():
            # stores made before this index existed get it on first open
            self.db.execute("CREATE INDEX IF NOT EXISTS dentries_by_inode ON dentries (inode)")
        self._in_tx = False
        # Inode rows as the database holds them (this connection's view, uncommitted changes
        # included): every change of the inodes table goes through this class and updates
        # it, and a rollback empties it.
        self._rows: dict[int, tuple] = {}
        self._next_ino: int | None = None  # see _new_inode_number
        # inodes that have any xattr: most getxattr calls (ACL and security probes) are for
        # names that do not exist, and this answers them without a query
        self._xattr_inodes: set[int] | None = None

    @classmethod
    def create(cls, path: str, root_uid: int, root_gid: int, now_ns: int) -> "Meta":
        m = cls(path)
        m.db.executescript(SCHEMA)
        with m.transaction():
            m.db.execute(
                f"INSERT INTO inodes ({_INODE_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (ROOT_INODE, 0o040755, root_uid, root_gid, 2, 0, 0, now_ns, now_ns, now_ns, 0, None),
            )
            m.set_state("schema_version", SCHEMA_VERSION)
            m.set_state("clean", 1)
        return m

    def close(self) -> None:
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.close()

    def hold_checkpoints(self) -> None:
        """No automatic checkpoints: the owner calls `checkpoint` (an S3 store's journal ships
        WAL frames, and a checkpoint must not drop frames it has not shipped)."""
        self.db.execute("PRAGMA wal_autocheckpoint=0")

    def checkpoint(self) -> bool:
        """Copy the WAL into the database and empty it; False if readers kept it from completing."""
        busy, _, _ = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One mutation = one transaction. Nested use joins the outer one."""
        if self._in_tx:
            yield self.db
            return
        self.db.execute("BEGIN")
        self._in_tx = True
        try:
            yield self.db
        except BaseException:
            self._in_tx = False
            self._rows.clear()
            self.db.execute("ROLLBACK")
            raise
        self._in_tx = False
        self.db.execute("COMMIT")

    def sync(self) -> None:
        """Make every committed transaction durable (fsync of the WAL). Blocking."""
        wal = self.path + "-wal"
        try:
            fd = os.open(wal, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # state
    def get_state(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM state WHERE key=?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_state(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))

    # inodes
    def inode(self, ino: int) -> Inode | None:
        """A fresh copy of an inode's row (callers may change it), or None."""
        row = self._rows.get(ino)
        if row is None:
            row = self.db.execute(f"SELECT {_INODE_COLS} FROM inodes WHERE id=?", (ino,)).fetchone()
            if row is None:
                return None
            self._remember(ino, row)
        return Inode(*row)

    def _remember(self, ino: int, row: tuple) -> None:
        if len(self._rows) >= INODE_CACHE:
            del self._rows[next(iter(self._rows))]  # the longest held
        self._rows[ino] = row

    def _new_inode_number(self) -> int:
        """Never one used before while this database is open.

        SQLite would hand out the number of the most recently deleted inode again, and work
        still in flight for the deleted file (a flush storing its blocks, the kernel's cached
        attributes) would then land on the new one. Across a restart reuse is harmless (no
        such work survives), so the counter lives in memory; it starts past every number the
        database mentions, stray rows included."""
        if self._next_ino is None:
            self._next_ino = 1 + max(
                self.db.execute("SELECT coalesce(max(id), 0) FROM inodes").fetchone()[0],
                self.db.execute("SELECT coalesce(max(inode), 0) FROM blocks").fetchone()[0],
                self.db.execute("SELECT coalesce(max(inode), 0) FROM dentries").fetchone()[0])
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def create_inode(self, mode: int, uid: int, gid: int, nlink: int, now_ns: int,
                     rdev: int = 0, sse: bytes | None = None) -> Inode:
        ino = self._new_inode_number()
        self.db.execute(
            "INSERT INTO inodes (id, mode, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, ctime_ns, sse)"
            " VALUES (?,?,?,?,?,0,?,?,?,?,?)",
            (ino, mode, uid, gid, nlink, rdev, now_ns, now_ns, now_ns, sse),
        )
        row = (ino, mode, uid, gid, nlink, 0, rdev, now_ns, now_ns, now_ns, 0, sse)
        self._remember(ino, row)
        return Inode(*row)

    def update_inode(self, ino: int, **fields) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE inodes SET {cols} WHERE id=?", (*fields.values(), ino))
        row = self._rows.get(ino)
        if row is not None:
            new = list(row)
            for name, value in fields.items():
                new[_INODE_INDEX[name]] = value
            self._rows[ino] = tuple(new)

    def delete_inode(self, ino: int) -> None:
        """Remove an inode with everything it owns; its objects become garbage."""
        self.db.execute("INSERT OR IGNORE INTO garbage (object_id) SELECT object_id FROM blocks WHERE inode=?", (ino,))
        self.db.execute("DELETE FROM blocks WHERE inode=?", (ino,))
        self.db.execute("DELETE FROM xattrs WHERE inode=?", (ino,))
        self.db.execute("DELETE FROM symlinks WHERE inode=?", (ino,))
        self.db.execute("DELETE FROM inodes WHERE id=?", (ino,))
        self._rows.pop(ino, None)

    def orphan_inodes(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT id FROM inodes WHERE nlink=0")]

    def inode_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM inodes").fetchone()[0]

    # directory entries
    def lookup(self, parent: int, name: bytes) -> int | None:
        row = self.db.execute("SELECT inode FROM dentries WHERE parent=? AND name=?", (parent, name)).fetchone()
        return None if row is None else row[0]

    def add_entry(self, parent: int, name: bytes, ino: int) -> None:
        self.db.execute("INSERT INTO dentries (parent, name, inode) VALUES (?,?,?)", (parent, name, ino))

    def remove_entry(self, parent: int, name: bytes) -> None:
        self.db.execute("DELETE FROM dentries WHERE parent=? AND name=?", (parent, name))

    def move_entry(self, parent: int, name: bytes, new_parent: int, new_name: bytes) -> None:
        self.db.execute("UPDATE dentries SET parent=?, name=? WHERE parent=? AND name=?",
                        (new_parent, new_name, parent, name))

    def set_entry_inode(self, parent: int, name: bytes, ino: int) -> None:
        self.db.execute("UPDATE dentries SET inode=? WHERE parent=? AND name=?", (ino, parent, name))

    def has_entries(self, parent: int) -> bool:
        return self.db.execute("SELECT 1 FROM dentries WHERE parent=? LIMIT 1", (parent,)).fetchone() is not None

    def parent_of(self, ino: int) -> int | None:
        row = self.db.execute("SELECT parent FROM dentries WHERE inode=? LIMIT 1", (ino,)).fetchone()
        return None if row is None else row[0]

    def entries_after(self, parent: int, cursor: int, limit: int) -> list[tuple]:
        """(cursor, name, inode columns...) of the entries after `cursor`, in cursor order."""
        return self.db.execute(
            f"SELECT d.id, d.name, {', '.join('i.' + c.strip() for c in _INODE_COLS.split(','))}"
            " FROM dentries d JOIN inodes i ON i.id = d.inode"
            " WHERE d.parent=? AND d.id>? ORDER BY d.id LIMIT ?",
            (parent, cursor, limit),
        ).fetchall()

    def entry_of(self, ino: int) -> tuple[int, int] | None:
        """(parent, cursor) of one directory entry of an inode."""
        return self.db.execute("SELECT parent, id FROM dentries WHERE inode=? LIMIT 1", (ino,)).fetchone()

    def first_blocks_after(self, parent: int, cursor: int, limit: int) -> list[tuple]:
        """(cursor, inode, mode, size, block 0's BlockRef or None) of the entries after `cursor`."""
        rows = self.db.execute(
            f"SELECT d.id, d.inode, i.mode, i.size, {', '.join('b.' + c.strip() for c in _BLOCK_COLS.split(','))}"
            " FROM dentries d JOIN inodes i ON i.id = d.inode"
            " LEFT JOIN blocks b ON b.inode = d.inode AND b.blockno = 0"
            " WHERE d.parent=? AND d.id>? ORDER BY d.id LIMIT ?", (parent, cursor, limit)).fetchall()
        return [(r[0], r[1], r[2], r[3], BlockRef(*r[4:]) if r[4] is not None else None) for r in rows]

    # symlinks
    def set_symlink(self, ino: int, target: bytes) -> None:
        self.db.execute("INSERT INTO symlinks (inode, target) VALUES (?,?)", (ino, target))

    def symlink_target(self, ino: int) -> bytes | None:
        row = self.db.execute("SELECT target FROM symlinks WHERE inode=?", (ino,)).fetchone()
        return None if row is None else row[0]

    # xattrs
    def _with_xattrs(self) -> set[int] | None:
        """Inodes with xattrs, or None once there are too many to keep in memory."""
        if self._xattr_inodes is None:
            rows = self.db.execute("SELECT DISTINCT inode FROM xattrs LIMIT ?", (XATTR_SET_LIMIT + 1,))
            self._xattr_inodes = {r[0] for r in rows}
        if len(self._xattr_inodes) > XATTR_SET_LIMIT:
            self._xattr_inodes = _ALWAYS_ASK
        return None if self._xattr_inodes is _ALWAYS_ASK else self._xattr_inodes

    def _may_have_xattrs(self, ino: int) -> bool:
        known = self._with_xattrs()
        return known is None or ino in known

    def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        if not self._may_have_xattrs(ino):
            return None
        row = self.db.execute("SELECT value FROM xattrs WHERE inode=? AND name=?", (ino, name)).fetchone()
        return None if row is None else row[0]

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO xattrs (inode, name, value) VALUES (?,?,?)", (ino, name, value))
        known = self._with_xattrs()
        if known is not None:
            known.add(ino)  # a rolled-back insert leaves a harmless extra entry

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        return self.db.execute("DELETE FROM xattrs WHERE inode=? AND name=?", (ino, name)).rowcount > 0

    def inodes_with_xattr(self, name: bytes, prefix: bytes = b"") -> list[int]:
        """Inodes that have xattr `name` with a value starting with `prefix`."""
        return [ino for ino, value in self.db.execute("SELECT inode, value FROM xattrs WHERE name=?", (name,))
                if bytes(value).startswith(prefix)]

    def list_xattrs(self, ino: int) -> list[bytes]:
        if not self._may_have_xattrs(ino):
            return []
        return [r[0] for r in self.db.execute("SELECT name FROM xattrs WHERE inode=? ORDER BY name", (ino,))]

    # block map
    def block(self, ino: int, blockno: int) -> BlockRef | None:
        row = self.db.execute(f"SELECT {_BLOCK_COLS} FROM blocks WHERE inode=? AND blockno=?",
                              (ino, blockno)).fetchone()
        return None if row is None else BlockRef(*row)

    def blocks_of(self, ino: int) -> list[BlockRef]:
        return [BlockRef(*r) for r in self.db.execute(
            f"SELECT {_BLOCK_COLS} FROM blocks WHERE inode=? ORDER BY blockno", (ino,))]

    def delete_block(self, ino: int, blockno: int) -> None:
        """Forget a block's row (it became a hole); the caller makes its object garbage."""
        self.db.execute("DELETE FROM blocks WHERE inode=? AND blockno=?", (ino, blockno))

    def stored_bytes_of(self, ino: int) -> int:
        """Plaintext bytes a file's block map holds (its st_blocks)."""
        return self.db.execute("SELECT coalesce(sum(length), 0) FROM blocks WHERE inode=?", (ino,)).fetchone()[0]

    def key_slot_of(self, object_id: bytes) -> tuple[int, bytes] | None:
        """The master-key version and key slot an object's row has now."""
        row = self.db.execute("SELECT key_version, key_slot FROM blocks WHERE object_id=?",
                              (object_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def put_block(self, ref: BlockRef) -> BlockRef | None:
        """Point a block at a new object; the replaced object (if any) becomes garbage."""
        old = self.block(ref.inode, ref.blockno)
        if old is not None:
            self.db.execute("INSERT OR IGNORE INTO garbage (object_id) VALUES (?)", (old.object_id,))
        self.db.execute(
            f"INSERT OR REPLACE INTO blocks ({_BLOCK_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (ref.inode, ref.blockno, ref.object_id, ref.length, ref.obj_length, ref.hdr_len,
             ref.mode, ref.key_ref, ref.key_version, ref.key_slot),
        )
        return old

    def truncate_blocks(self, ino: int, size: int, block_size: int) -> None:
        """Drop blocks wholly past `size` and shorten the one that straddles it."""
        first_gone = -(-size // block_size)
        self.db.execute(
            "INSERT OR IGNORE INTO garbage (object_id) SELECT object_id FROM blocks WHERE inode=? AND blockno>=?",
            (ino, first_gone))
        self.db.execute("DELETE FROM blocks WHERE inode=? AND blockno>=?", (ino, first_gone))
        if size % block_size:
            self.db.execute("UPDATE blocks SET length=min(length, ?) WHERE inode=? AND blockno=?",
                            (size % block_size, ino, size // block_size))
        self.update_inode(ino, stored_bytes=self.stored_bytes_of(ino))

    def kms_slots_below(self, key_ref: str, version: int, after: bytes, limit: int) -> list[BlockRef]:
        """Blocks wrapped under an SSE-KMS key at a version below `version`, in object-id
        order after `after` (pages of a re-wrap)."""
        return [BlockRef(*r) for r in self.db.execute(
            f"SELECT {_BLOCK_COLS} FROM blocks WHERE object_id > ? AND mode = 'aws:kms' "
            "AND key_ref = ? AND key_version < ? ORDER BY object_id LIMIT ?",
            (after, key_ref, version, limit))]

    def slots_not_at_version(self, mode: str, version: int, after: bytes,
                             limit: int) -> list[tuple[int, int, bytes, int, bytes]]:
        """(inode, blockno, object_id, key_version, key_slot) of blocks of `mode` wrapped under
        another version than `version`, in object-id order after `after` (pages of a re-wrap)."""
        return self.db.execute(
            "SELECT inode, blockno, object_id, key_version, key_slot FROM blocks"
            " WHERE object_id > ? AND mode = ? AND key_version <> ? ORDER BY object_id LIMIT ?",
            (after, mode, version, limit)).fetchall()

    def count_not_at_version(self, mode: str, version: int) -> int:
        """Blocks of `mode` wrapped under another version than `version`."""
        return self.db.execute("SELECT count(*) FROM blocks WHERE mode = ? AND key_version <> ?",
                               (mode, version)).fetchone()[0]

    def count_by_version(self, mode: str) -> dict[int, int]:
        """Blocks of `mode` per key version."""
        return dict(self.db.execute(
            "SELECT key_version, count(*) FROM blocks WHERE mode = ? GROUP BY key_version", (mode,)))

    def replace_key_slot(self, object_id: bytes, old_slot: bytes, new_slot: bytes, version: int) -> bool:
        """Swap a block's wrapped data key if it is still `old_slot` (the block may have been
        rewritten meanwhile) -> whether it was swapped."""
        cur = self.db.execute("UPDATE blocks SET key_slot = ?, key_version = ? "
                              "WHERE object_id = ? AND key_slot = ?",
                              (new_slot, version, object_id, old_slot))
        return cur.rowcount == 1

    def key_refs(self, ino: int) -> list[tuple[str, str]]:
        """The distinct (mode, key_ref) of a file's objects: the keys reading it needs."""
        return self.db.execute("SELECT DISTINCT mode, key_ref FROM blocks WHERE inode=?", (ino,)).fetchall()

    def key_versions(self, ino: int) -> list[tuple[str, str, int]]:
        return self.db.execute("SELECT DISTINCT mode, key_ref, key_version FROM blocks WHERE inode=?"
                               " ORDER BY key_version", (ino,)).fetchall()

    def path_of(self, ino: int, limit: int = 256) -> str:
        """One path of an inode (for audit records); '?' where a link is missing."""
        parts = []
        while ino != ROOT_INODE and len(parts) < limit:
            row = self.db.execute("SELECT parent, name FROM dentries WHERE inode=? LIMIT 1", (ino,)).fetchone()
            if row is None:
                parts.append("?")
                break
            ino = row[0]
            parts.append(row[1].decode("utf-8", "surrogateescape"))
        return "/" + "/".join(reversed(parts))

    def is_referenced(self, object_id: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM blocks WHERE object_id=?", (object_id,)).fetchone() is not None

    def object_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM blocks").fetchone()[0]

    # garbage
    def garbage(self, limit: int) -> list[bytes]:
        return [r[0] for r in self.db.execute("SELECT object_id FROM garbage LIMIT ?", (limit,))]

    def add_garbage(self, object_id: bytes) -> None:
        self.db.execute("INSERT OR IGNORE INTO garbage (object_id) VALUES (?)", (object_id,))

    def forget_garbage(self, object_ids: list[bytes]) -> None:
        self.db.executemany("DELETE FROM garbage WHERE object_id=?", [(o,) for o in object_ids])

    # repairs (fsck --repair): each is part of the caller's transaction
    def remove_garbage(self, object_id: bytes) -> None:
        """Take an object off the deletion list (a row still references it)."""
        self.db.execute("DELETE FROM garbage WHERE object_id = ?", (object_id,))

    def drop_collected_garbage(self) -> None:
        """Forget deletion-list entries no row references (their objects are deleted)."""
        self.db.execute("DELETE FROM garbage WHERE object_id NOT IN (SELECT object_id FROM blocks)")

    def remove_dangling_entries(self) -> None:
        """Remove directory entries whose inode does not exist."""
        self.db.execute("DELETE FROM dentries WHERE inode NOT IN (SELECT id FROM inodes)")

    def remove_stray_rows(self) -> None:
        """Remove xattrs and symlink targets of inodes that do not exist."""
        self.db.execute("DELETE FROM xattrs WHERE inode NOT IN (SELECT id FROM inodes)")
        self.db.execute("DELETE FROM symlinks WHERE inode NOT IN (SELECT id FROM inodes)")
        self._xattr_inodes = None

    def restore_inode(self, ino: int, mode: int, size: int, stored: int, now_ns: int) -> None:
        """Bring back a missing inode under its own number (its key slots are bound to it),
        owned by root, with one link."""
        self.db.execute(
            f"INSERT INTO inodes ({_INODE_COLS}) VALUES (?,?,0,0,1,?,0,?,?,?,?,NULL)",
            (ino, mode, size, now_ns, now_ns, now_ns, stored))
        self._rows.pop(ino, None)

    def remove_entry_by_id(self, entry_id: int) -> None:
        self.db.execute("DELETE FROM dentries WHERE id = ?", (entry_id,))

    def remove_entries_of(self, ino: int) -> None:
        """Remove every directory entry that names `ino`."""
        self.db.execute("DELETE FROM dentries WHERE inode = ?", (ino,))

    def keep_oldest_entry(self, ino: int) -> None:
        """Remove every entry of `ino` but its oldest."""
        self.db.execute("DELETE FROM dentries WHERE inode = ? AND id != "
                        "(SELECT min(id) FROM dentries WHERE inode = ?)", (ino, ino))

    def recount_stored_bytes(self) -> None:
        """Set every inode's stored_bytes to what its block-map rows hold."""
        self.db.execute("UPDATE inodes SET stored_bytes = coalesce((SELECT sum(length) FROM blocks b"
                        " WHERE b.inode = inodes.id), 0)")
        self._rows.clear()
