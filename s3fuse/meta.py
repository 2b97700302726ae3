"""The metadata database: the namespace, attributes, xattrs and block map, in SQLite.

SQLite runs on the trio thread (as in S3QL): every mutation is one transaction (a
deferred one waits to be committed with others, `Meta.transaction`), and the code
between two checkpoints is the critical section, so there are no database locks.
`schema()` documents every column.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from . import metaauth as ma
from .format import PATCH_BASE, PATCH_SEQS, is_patch, patch_number
from .errors import IntegrityError

log = logging.getLogger(__name__)

ROOT_INODE = 1
# inode rows kept in memory (about 4 MiB at most): getattr, open, create and the data path
# read the same few rows again and again, and a dictionary lookup costs a tenth of a query
INODE_CACHE = 16384
# up to this many inodes with xattrs are remembered in memory (a few MiB at most)
XATTR_SET_LIMIT = 100_000
_ALWAYS_ASK: set[int] = set()
# inodes whose owned rows were checked against their set digest are remembered (ids only)
VERIFIED_LIMIT = 200_000
_IN_LIST = 500  # ids per `IN (...)` query, well below SQLite's bound on parameters
SCHEMA_VERSION = 2  # 2: rows carry MACs, inodes a set digest (docs/FORMAT.md)
# deferred transactions (transaction(defer=True)) committed together at most
GROUP_MAX = 256
FIRST_BLOCKS_HELD = 4096  # block-0 rows read ahead for the opens of a directory walk (first_blocks_after)
_ABSENT = object()

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
    -- sse: msgpack, the encryption of this file's new objects, or a directory's default for
    -- new children (NULL: inherit); digest: the sum of the MACs of the rows it owns; mac: the
    -- row's MAC (metaauth.py)
    sse BLOB,
    digest BLOB,
    mac BLOB
);
-- Directory entries; id is a never-reused cursor for readdir.
CREATE TABLE dentries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER NOT NULL,
    name BLOB NOT NULL,
    inode INTEGER NOT NULL,
    mac BLOB,
    UNIQUE (parent, name)
);
CREATE INDEX dentries_by_parent ON dentries (parent, id);
CREATE INDEX dentries_by_inode ON dentries (inode);
CREATE TABLE symlinks (
    inode INTEGER PRIMARY KEY,
    target BLOB NOT NULL,
    mac BLOB
);
CREATE TABLE xattrs (
    inode INTEGER NOT NULL,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (inode, name)
) WITHOUT ROWID;
-- The block map: which object holds block `blockno` (of BLOCK_SIZE bytes) of a file,
-- with the object's encryption descriptor. No row = a hole (reads as zeros). Rows numbered
-- from 2^62 are patches of a block, applied over its object in number order
-- (format.patch_number; docs/FORMAT.md, "Patches").
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
    mac BLOB,
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
    digest: bytes | None = None
    mac: bytes | None = None


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


_INODE_COLS = "id, mode, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, ctime_ns, stored_bytes, sse, digest, mac"
_INODE_INDEX = {name.strip(): i for i, name in enumerate(_INODE_COLS.split(","))}
_BLOCK_COLS = "inode, blockno, object_id, length, obj_length, hdr_len, mode, key_ref, key_version, key_slot"
BLOCK_COLUMNS = _BLOCK_COLS  # a block-map row's columns in BlockRef's order (metaquery.py)
_DIGEST = _INODE_INDEX["digest"]
_MAC = _INODE_INDEX["mac"]
# the inode columns its MAC covers (times and stored_bytes change no content)
_AUTH_FIELDS = frozenset(("mode", "uid", "gid", "nlink", "size", "rdev", "sse", "digest"))
_S_IFMT = 0o170000
_S_IFREG = 0o100000
_S_IFDIR = 0o040000
_S_IFLNK = 0o120000


def inode_mac(key: bytes, row) -> bytes:
    """The MAC an inode row (in _INODE_COLS order) should carry."""
    return ma.inode_mac(key, row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[11],
                        row[_DIGEST] if row[_DIGEST] is not None else ma.ZERO)


def block_mac(key: bytes, r) -> bytes:
    """The MAC a block-map row (a BlockRef, or a tuple in its order) should carry."""
    if isinstance(r, BlockRef):
        return ma.block_mac(key, r.inode, r.blockno, r.object_id, r.length, r.obj_length, r.hdr_len,
                            r.mode, r.key_ref, r.key_version, r.key_slot)
    return ma.block_mac(key, *r[:10])


class _Noting:
    """The connection, noting each change it makes (for `Meta`'s deferred transactions)."""

    def __init__(self, db: sqlite3.Connection, notes: list) -> None:
        self._db = db
        self.notes = notes

    def execute(self, sql: str, params=()) -> sqlite3.Cursor:
        if not sql.startswith("SELECT"):
            self.notes.append((sql, params))
        return self._db.execute(sql, params)

    def executemany(self, sql: str, seq) -> sqlite3.Cursor:
        seq = list(seq)
        for params in seq:
            self.notes.append((sql, params))
        return self._db.executemany(sql, seq)

    def __getattr__(self, name: str):
        return getattr(self._db, name)


class Forged(IntegrityError):
    """A metadata record does not authenticate: EIO for the operation that met it."""


class Meta:
    def __init__(self, path: str, key: bytes | None = None) -> None:
        """`key`: the metadata key; with it every row written is signed and every row read
        checked. Without it (a store not yet authenticated, or a tool that only touches the
        state table) rows are neither."""
        self.path = path
        self.key = key
        # inodes whose owned rows (blocks, entries, symlink) matched their set digest
        self._verified: set[int] = set()
        self._reported: set[tuple[int, str]] = set()  # (inode, record) logged once
        self._patched: set[int] | None = None  # files that have (or had) patch rows; see has_patches
        # fsck turns this off: it reads every row as it is and checks them all itself
        self.check_reads = True
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
            self._add_auth_columns()
        self._in_tx = False
        # Inode rows as the database holds them (this connection's view, uncommitted changes
        # included): every change of the inodes table goes through this class and updates
        # it, and a rollback empties it.
        self._rows: dict[int, tuple] = {}
        # Set digests changed in the open transaction: written with the inode's next UPDATE
        # in it, or at its end, so that a change costs one UPDATE of the owner, not two.
        self._pending_digest: dict[int, bytes] = {}
        # Block 0's row (or None) of files a directory walk is about to open, as first_blocks_after
        # read it for an inode whose rows are trusted (_trusted): their opens take it from here
        # rather than ask again. Any change of an inode's block rows drops its entry, a
        # rollback all of them.
        self._first_blocks: dict[int, BlockRef | None] = {}
        self._next_ino: int | None = None  # see _new_inode_number
        # inodes to delete in the next transaction that commits (delete_inode_soon)
        self._doomed: set[int] = set()
        # Deferred transactions: their changes wait in a write transaction left open, each
        # made a savepoint within it, until a transaction that commits (or `commit`).
        self._open = False  # that write transaction is open
        self._deferred = 0  # transactions waiting in it
        # time.monotonic() when the oldest change still waiting for a commit (a deferred
        # transaction, a deletion left for the next commit) was made; None: none waits
        self._waiting_since: float | None = None
        # the changes they made, in order: made again if their commit fails (_commit)
        self._notes: list[tuple[str, tuple]] = []
        self.commit_failing = False  # the last commit of deferred transactions failed
        # told (on the loop) when a transaction is deferred and none was: it arranges a
        # commit soon; None: no transaction is deferred
        self.on_deferred: Callable[[], None] | None = None
        # inodes that have any xattr: most getxattr calls (ACL and security probes) are for
        # names that do not exist, and this answers them without a query
        self._xattr_inodes: set[int] | None = None
        # grows whenever a statement may have added objects to the garbage table, so that a
        # caller can tell whether its transaction made any (and wake the collector)
        self.garbage_made = 0

    @classmethod
    def create(cls, path: str, root_uid: int, root_gid: int, now_ns: int, key: bytes | None = None) -> "Meta":
        m = cls(path, key)
        m.db.executescript(SCHEMA)
        with m.transaction():
            row = (ROOT_INODE, 0o040755, root_uid, root_gid, 2, 0, 0, now_ns, now_ns, now_ns, 0, None, ma.ZERO)
            m.db.execute(
                f"INSERT INTO inodes ({_INODE_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (*row, inode_mac(key, (*row, None)) if key is not None else None),
            )
            m.set_state("schema_version", SCHEMA_VERSION)
            m.set_state("clean", 1)
        return m

    def close(self) -> None:
        self.commit()
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.close()

    def hold_checkpoints(self) -> None:
        """No automatic checkpoints: the owner calls `checkpoint` (an S3 store's journal ships
        WAL frames, and a checkpoint must not drop frames it has not shipped)."""
        self.db.execute("PRAGMA wal_autocheckpoint=0")

    def checkpoint(self) -> bool:
        """Copy the WAL into the database and empty it; False if readers kept it from completing,
        or deferred transactions wait (committing them here would add frames to the WAL)."""
        if self._open:
            return False
        busy, _, _ = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy

    @contextlib.contextmanager
    def transaction(self, defer: bool = False) -> Iterator[sqlite3.Connection]:
        """One mutation = one transaction. Nested use joins the outer one.

        `defer`: commit it with the next transaction that commits, or at `commit`, which
        `on_deferred` arranges for soon (docs/ARCHITECTURE.md, "Crash consistency"). Only for
        changes no other work relies on being committed: no garbage, nothing deleted that a
        committed row refers to. It is rolled back alone if it fails."""
        if self._in_tx:
            yield self.db
            return
        defer = defer and self.on_deferred is not None and self._deferred < GROUP_MAX
        self.db.execute("SAVEPOINT op" if self._open else "BEGIN")
        self._in_tx = True
        noted = len(self._notes)
        if defer:
            self.db = _Noting(self.db, self._notes)
        try:
            yield self.db
            if not defer and self._doomed:
                for ino in sorted(self._doomed):
                    self.delete_inode(ino)
            while self._pending_digest:
                ino = next(iter(self._pending_digest))
                self.update_inode(ino, digest=self._pending_digest[ino])
        except BaseException:
            self._in_tx = False
            if defer:
                self.db = self.db._db
                del self._notes[noted:]
            self._rows.clear()
            self._verified.clear()
            self._first_blocks.clear()
            self._pending_digest.clear()
            if self._open:  # the deferred transactions before this one stay
                self.db.execute("ROLLBACK TO op")
                self.db.execute("RELEASE op")
            else:
                self.db.execute("ROLLBACK")
            raise
        self._in_tx = False
        if defer:
            self.db = self.db._db
        if self._open:
            self.db.execute("RELEASE op")
        if defer:
            self._deferred += 1
            if not self._open:
                self._open = True
                self._note_waiting()
                self.on_deferred()
            return
        self._commit()

    def _commit(self) -> None:
        deferred = self._deferred
        self._open = False
        self._deferred = 0
        try:
            self.db.execute("COMMIT")
        except BaseException as exc:
            # SQLite rolls back a transaction whose commit failed for I/O or space; what this
            # connection held in memory may be ahead of the database now
            self._rows.clear()
            self._verified.clear()
            self._first_blocks.clear()
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if deferred:
                self._redo(deferred, exc)
            raise
        self._notes.clear()
        self._doomed.clear()
        self._waiting_since = None
        self.commit_failing = False

    def _note_waiting(self) -> None:
        if self._waiting_since is None:
            self._waiting_since = time.monotonic()

    def waiting_since(self) -> float | None:
        """When (time.monotonic()) the oldest change that waits for a commit was made, or None
        if none waits: the owner's timer commits them that long after it, not after the first
        change it was started for, which another commit may have covered already."""
        return self._waiting_since

    def _redo(self, deferred: int, exc: BaseException) -> None:
        """Make the deferred transactions of a failed commit again, to be committed later:
        their requests were answered, and written data may belong to the files they made.
        (The transaction that failed to commit them fails alone, as it would have anyway.)"""
        if not self.commit_failing:
            log.error("committing %d metadata changes failed (%s): retried", deferred, exc)
        self.commit_failing = True
        self.db.execute("BEGIN")
        try:
            for sql, params in self._notes:
                self.db.execute(sql, params)
        except BaseException:
            self.db.execute("ROLLBACK")
            self._notes.clear()
            log.critical("could not make %d metadata changes again: they are lost", deferred)
            raise
        self._open = True
        self._deferred = deferred
        self._waiting_since = time.monotonic()  # the retry is paced from the failure
        if self.on_deferred is not None:
            self.on_deferred()

    def commit(self) -> None:
        """Commit the deferred transactions and the deletions left for the next commit."""
        if not self._in_tx and (self._open or self._doomed):
            with self.transaction():
                pass

    def sync(self) -> None:
        """Make every committed transaction durable (fsync of the WAL). Blocking, so it may run in
        a worker thread; deferred transactions are not committed ones (`commit` first, on the loop)."""
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
        row = self._row(ino)
        return None if row is None else Inode(*row)

    def _row(self, ino: int) -> tuple | None:
        """An inode's row, authenticated (once, then held in memory)."""
        row = self._rows.get(ino)
        if row is None:
            row = self.db.execute(f"SELECT {_INODE_COLS} FROM inodes WHERE id=?", (ino,)).fetchone()
            if row is None:
                return None
            if self.key is not None and self.check_reads and not ma.same(row[_MAC], inode_mac(self.key, row)):
                self._forged(ino, "inode row")
            self._remember(ino, row)
        return row

    def _forged(self, ino: int, record: str) -> None:
        if (ino, record) not in self._reported:
            self._reported.add((ino, record))
            log.error("inode %d: its %s does not authenticate (metadata edited?): EIO", ino, record)
        raise Forged(f"inode {ino}: {record} does not authenticate")

    def _mark_verified(self, ino: int) -> None:
        if len(self._verified) >= VERIFIED_LIMIT:
            self._verified.clear()
        self._verified.add(ino)

    def _trusted(self, ino: int) -> bool:
        """Whether the rows `ino` owns may be used as read, without a MAC each: they were
        checked against its set digest earlier in this mount, and every change since is this
        mount's own (the model is edits made with the store unmounted); or this is fsck,
        which checks every row itself."""
        return ino in self._verified or not self.check_reads

    def _check_blocks(self, ino: int) -> dict[int, BlockRef] | None:
        """Check a file's block rows against its set digest, the first time they are needed ->
        the rows (all checked now), or None if they were checked before."""
        if self.key is None or not self.check_reads or ino in self._verified:
            return None
        row = self._row(ino)
        if row is None:
            return None
        refs, macs = {}, []
        for r in self.db.execute(f"SELECT {_BLOCK_COLS}, mac FROM blocks WHERE inode=?", (ino,)):
            m = block_mac(self.key, r)
            if not ma.same(r[10], m):
                self._forged(ino, f"block {r[1]} row")
            refs[r[1]] = BlockRef(*r[:10])
            macs.append(m)
        if not ma.same(self._digest(ino, row), ma.digest_of(macs)):
            self._forged(ino, "block map (a row deleted, added or replayed)")
        self._mark_verified(ino)
        return refs

    def _check_entries(self, parent: int) -> None:
        """Check a directory's entries against its set digest the first time they are needed."""
        if self.key is None or not self.check_reads or parent in self._verified:
            return
        row = self._row(parent)
        if row is None:
            return
        macs = []
        for name, ino, mac in self.db.execute("SELECT name, inode, mac FROM dentries WHERE parent=?", (parent,)):
            m = ma.entry_mac(self.key, parent, name, ino)
            if not ma.same(mac, m):
                self._forged(parent, f"entry {bytes(name)!r}")
            macs.append(m)
        if not ma.same(self._digest(parent, row), ma.digest_of(macs)):
            self._forged(parent, "entry list (an entry deleted, added or replayed)")
        self._mark_verified(parent)

    def _adjust(self, ino: int, add: Iterable[bytes] = (), sub: Iterable[bytes] = ()) -> None:
        """Update an inode's set digest for rows it gained (`add`) and lost (`sub`)."""
        if self.key is None:
            return
        row = self._row(ino)
        if row is None:
            return  # its owner is gone (rows of a deleted inode)
        d = self._digest(ino, row)
        for m in add:
            d = ma.add(d, m)
        for m in sub:
            d = ma.sub(d, m)
        if self._in_tx:
            self._pending_digest[ino] = d
        else:
            self.update_inode(ino, digest=d)

    def _digest(self, ino: int, row: tuple) -> bytes:
        """The set digest of the rows `ino` owns now (this transaction's changes included)."""
        d = self._pending_digest.get(ino)
        if d is not None:
            return d
        return row[_DIGEST] if row[_DIGEST] is not None else ma.ZERO

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
        row = (ino, mode, uid, gid, nlink, 0, rdev, now_ns, now_ns, now_ns, 0, sse, ma.ZERO)
        row = (*row, inode_mac(self.key, (*row, None)) if self.key is not None else None)
        self.db.execute(f"INSERT INTO inodes ({_INODE_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", row)
        self._remember(ino, row)
        if self.key is not None:
            self._mark_verified(ino)  # it owns nothing yet, as its digest says
        return Inode(*row)

    def update_inode(self, ino: int, **fields) -> None:
        if self._pending_digest:
            pending = self._pending_digest.pop(ino, None)
            if pending is not None:
                fields.setdefault("digest", pending)
        if self.key is not None and not _AUTH_FIELDS.isdisjoint(fields):
            row = self._row(ino)  # authenticated before it is signed again
            if row is not None:
                new = list(row)
                for name, value in fields.items():
                    new[_INODE_INDEX[name]] = value
                fields["mac"] = inode_mac(self.key, new)
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
        self.garbage_made += 1
        self.db.execute("DELETE FROM blocks WHERE inode=?", (ino,))
        if self.may_have_xattrs(ino):
            self.db.execute("DELETE FROM xattrs WHERE inode=?", (ino,))
        self.db.execute("DELETE FROM symlinks WHERE inode=?", (ino,))
        self.db.execute("DELETE FROM inodes WHERE id=?", (ino,))
        self._rows.pop(ino, None)
        self._verified.discard(ino)
        self._first_blocks.pop(ino, None)
        self._pending_digest.pop(ino, None)

    def delete_inode_soon(self, ino: int) -> None:
        """`delete_inode` in the next transaction that commits (not a deferred one: its objects
        become garbage, which must be committed before the collector sees it). An inode no entry,
        kernel reference or handle uses is invisible, so it needs no commit of its own. A crash
        before that commit leaves a row with no links, which the next mount deletes
        (`orphan_inodes`)."""
        self._doomed.add(ino)
        self._note_waiting()

    def orphan_inodes(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT id FROM inodes WHERE nlink=0")]

    def inode_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM inodes").fetchone()[0]

    # directory entries
    def lookup(self, parent: int, name: bytes) -> int | None:
        if self.key is None:
            row = self.db.execute("SELECT inode FROM dentries WHERE parent=? AND name=?", (parent, name)).fetchone()
            return None if row is None else row[0]
        self._check_entries(parent)
        row = self.db.execute("SELECT inode, mac FROM dentries WHERE parent=? AND name=?", (parent, name)).fetchone()
        if row is None:
            return None
        if not self._trusted(parent) and not ma.same(row[1], ma.entry_mac(self.key, parent, name, row[0])):
            self._forged(parent, f"entry {bytes(name)!r}")
        if self._row(row[0]) is None:  # an authentic entry: its inode must be there
            self._forged(row[0], "inode row (missing)")
        return row[0]

    def _entry_mac(self, parent: int, name: bytes, ino: int) -> bytes | None:
        return None if self.key is None else ma.entry_mac(self.key, parent, name, ino)

    def _entry_inode(self, parent: int, name: bytes) -> int | None:
        row = self.db.execute("SELECT inode FROM dentries WHERE parent=? AND name=?", (parent, name)).fetchone()
        return None if row is None else row[0]

    def add_entry(self, parent: int, name: bytes, ino: int) -> None:
        mac = self._entry_mac(parent, name, ino)
        self.db.execute("INSERT INTO dentries (parent, name, inode, mac) VALUES (?,?,?,?)", (parent, name, ino, mac))
        if mac is not None:
            self._adjust(parent, add=[mac])

    def remove_entry(self, parent: int, name: bytes, ino: int | None = None) -> None:
        """`ino`: the entry's inode, when the caller looked the entry up (saves a query)."""
        if ino is None and self.key is not None:
            ino = self._entry_inode(parent, name)
        self.db.execute("DELETE FROM dentries WHERE parent=? AND name=?", (parent, name))
        if ino is not None and self.key is not None:
            self._adjust(parent, sub=[self._entry_mac(parent, name, ino)])

    def move_entry(self, parent: int, name: bytes, new_parent: int, new_name: bytes) -> None:
        ino = self._entry_inode(parent, name) if self.key is not None else None
        if ino is None:
            self.db.execute("UPDATE dentries SET parent=?, name=? WHERE parent=? AND name=?",
                            (new_parent, new_name, parent, name))
            return
        old, new = self._entry_mac(parent, name, ino), self._entry_mac(new_parent, new_name, ino)
        self.db.execute("UPDATE dentries SET parent=?, name=?, mac=? WHERE parent=? AND name=?",
                        (new_parent, new_name, new, parent, name))
        self._adjust(parent, sub=[old])
        self._adjust(new_parent, add=[new])

    def set_entry_inode(self, parent: int, name: bytes, ino: int) -> None:
        old_ino = self._entry_inode(parent, name) if self.key is not None else None
        new = self._entry_mac(parent, name, ino)
        self.db.execute("UPDATE dentries SET inode=?, mac=? WHERE parent=? AND name=?", (ino, new, parent, name))
        if old_ino is not None:
            self._adjust(parent, add=[new], sub=[self._entry_mac(parent, name, old_ino)])

    def has_entries(self, parent: int) -> bool:
        return self.db.execute("SELECT 1 FROM dentries WHERE parent=? LIMIT 1", (parent,)).fetchone() is not None

    def parent_of(self, ino: int) -> int | None:
        row = self.db.execute("SELECT parent FROM dentries WHERE inode=? LIMIT 1", (ino,)).fetchone()
        return None if row is None else row[0]

    def entries_after(self, parent: int, cursor: int, limit: int) -> list[tuple]:
        """(cursor, name, inode columns...) of the entries after `cursor`, in cursor order."""
        if self.key is None:
            return self.db.execute(
                f"SELECT d.id, d.name, {', '.join('i.' + c.strip() for c in _INODE_COLS.split(','))}"
                " FROM dentries d JOIN inodes i ON i.id = d.inode"
                " WHERE d.parent=? AND d.id>? ORDER BY d.id LIMIT ?",
                (parent, cursor, limit),
            ).fetchall()
        self._check_entries(parent)
        rows = self.db.execute("SELECT id, name, inode, mac FROM dentries WHERE parent=? AND id>? ORDER BY id LIMIT ?",
                               (parent, cursor, limit)).fetchall()
        key, held = self.key, self._rows
        if not self._trusted(parent):
            for _, name, ino, mac in rows:
                if not ma.same(mac, ma.entry_mac(key, parent, name, ino)):
                    self._forged(parent, f"entry {bytes(name)!r}")
        # inode rows held in memory are current (every write goes through update_inode); the
        # rest come in one query per batch, each checked as it is read into memory
        missing = [r[2] for r in rows if r[2] not in held]
        for i in range(0, len(missing), _IN_LIST):
            part = missing[i:i + _IN_LIST]
            for row in self.db.execute(f"SELECT {_INODE_COLS} FROM inodes WHERE id IN ({','.join('?' * len(part))})",
                                       part):
                if self.check_reads and not ma.same(row[_MAC], inode_mac(key, row)):
                    self._forged(row[0], "inode row")
                self._remember(row[0], row)
        out = []
        for cursor_id, name, ino, _ in rows:
            row = held.get(ino) or self._row(ino)  # _row: evicted by this batch's own rows
            if row is None:
                self._forged(ino, "inode row (missing)")
            out.append((cursor_id, name, *row))
        return out

    def entry_of(self, ino: int) -> tuple[int, int] | None:
        """(parent, cursor) of one directory entry of an inode."""
        return self.db.execute("SELECT parent, id FROM dentries WHERE inode=? LIMIT 1", (ino,)).fetchone()

    def first_blocks_after(self, parent: int, cursor: int, limit: int) -> list[tuple]:
        """(cursor, inode, mode, size, block 0's BlockRef or None) of the entries after `cursor`."""
        rows = self.db.execute(
            f"SELECT d.id, d.inode, i.mode, i.size, {', '.join('b.' + c.strip() for c in _BLOCK_COLS.split(','))}, b.mac"
            " FROM dentries d JOIN inodes i ON i.id = d.inode"
            " LEFT JOIN blocks b ON b.inode = d.inode AND b.blockno = 0"
            " WHERE d.parent=? AND d.id>? ORDER BY d.id LIMIT ?", (parent, cursor, limit)).fetchall()
        if self.key is None:
            return [(r[0], r[1], r[2], r[3], BlockRef(*r[4:14]) if r[4] is not None else None) for r in rows]
        # a read-ahead hint only (the open checks the file): a row that does not authenticate
        # is not fetched
        out = []
        held = self._first_blocks
        for r in rows:
            ref = None
            trusted = self._trusted(r[1])
            if r[4] is not None:
                ref = BlockRef(*r[4:14])
                if not trusted and not ma.same(r[14], block_mac(self.key, ref)):
                    ref = None
            if trusted:
                if len(held) >= FIRST_BLOCKS_HELD:
                    held.clear()
                held[r[1]] = ref
            out.append((r[0], r[1], r[2], r[3], ref))
        return out

    # symlinks
    def set_symlink(self, ino: int, target: bytes) -> None:
        mac = None if self.key is None else ma.symlink_mac(self.key, ino, target)
        self.db.execute("INSERT INTO symlinks (inode, target, mac) VALUES (?,?,?)", (ino, target, mac))
        if mac is not None:
            self._adjust(ino, add=[mac])

    def symlink_target(self, ino: int) -> bytes | None:
        row = self.db.execute("SELECT target, mac FROM symlinks WHERE inode=?", (ino,)).fetchone()
        if self.key is not None:
            inode = self._row(ino)
            if inode is not None and (inode[1] & _S_IFMT) == _S_IFLNK:
                if row is None:
                    self._forged(ino, "symlink target (missing)")
                m = ma.symlink_mac(self.key, ino, row[0])
                if not ma.same(row[1], m) or not ma.same(inode[_DIGEST], m):
                    self._forged(ino, "symlink target")
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

    def may_have_xattrs(self, ino: int) -> bool:
        """False when `ino` is known to have no xattr at all (no query)."""
        known = self._with_xattrs()
        return known is None or ino in known

    def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        if not self.may_have_xattrs(ino):
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
        if not self.may_have_xattrs(ino):
            return []
        return [r[0] for r in self.db.execute("SELECT name FROM xattrs WHERE inode=? ORDER BY name", (ino,))]

    # block map
    def block(self, ino: int, blockno: int) -> BlockRef | None:
        if self.key is None:
            row = self.db.execute(f"SELECT {_BLOCK_COLS} FROM blocks WHERE inode=? AND blockno=?",
                                  (ino, blockno)).fetchone()
            return None if row is None else BlockRef(*row)
        if blockno == 0 and self._first_blocks:
            held = self._first_blocks.pop(ino, _ABSENT)  # for the one open it was read ahead for
            if held is not _ABSENT:
                return held
        checked = self._check_blocks(ino)
        if checked is not None:
            return checked.get(blockno)
        row = self.db.execute(f"SELECT {_BLOCK_COLS}, mac FROM blocks WHERE inode=? AND blockno=?",
                              (ino, blockno)).fetchone()
        if row is None:
            return None
        if not self._trusted(ino) and not ma.same(row[10], block_mac(self.key, row)):
            self._forged(ino, f"block {blockno} row")
        return BlockRef(*row[:10])

    def blocks_of(self, ino: int) -> list[BlockRef]:
        checked = self._check_blocks(ino)
        if checked is not None:
            return [checked[b] for b in sorted(checked)]
        if self.key is None:
            return [BlockRef(*r) for r in self.db.execute(
                f"SELECT {_BLOCK_COLS} FROM blocks WHERE inode=? ORDER BY blockno", (ino,))]
        out, check_each = [], not self._trusted(ino)
        for r in self.db.execute(f"SELECT {_BLOCK_COLS}, mac FROM blocks WHERE inode=? ORDER BY blockno", (ino,)):
            if check_each and not ma.same(r[10], block_mac(self.key, r)):
                self._forged(ino, f"block {r[1]} row")
            out.append(BlockRef(*r[:10]))
        return out

    def delete_block(self, ino: int, blockno: int) -> None:
        """Forget a block's row (it became a hole); the caller makes its object garbage."""
        old = self.block(ino, blockno) if self.key is not None else None
        self._first_blocks.pop(ino, None)
        self.db.execute("DELETE FROM blocks WHERE inode=? AND blockno=?", (ino, blockno))
        if old is not None:
            self._adjust(ino, sub=[block_mac(self.key, old)])
        self._drop_patches(ino, blockno)

    def has_patches(self, ino: int) -> bool:
        """Whether a file may have patch rows (a cheap test before `patches_of`): the files
        that had some when first asked, and those given one since."""
        if self._patched is None:
            self._patched = {r[0] for r in self.db.execute(
                "SELECT DISTINCT inode FROM blocks WHERE blockno >= ?", (PATCH_BASE,))}
        return ino in self._patched

    def patched_blocks(self, limit: int, exclude: set[int] = frozenset()) -> list[tuple[int, int]]:
        """Up to `limit` blocks (inode, block) that have patch rows, of files not in `exclude`;
        a file found to have none is no longer counted by `has_patches`."""
        self.has_patches(0)  # loads the set of files that may have patch rows
        out: list[tuple[int, int]] = []
        for ino in sorted(self._patched - exclude):
            rows = self.db.execute("SELECT DISTINCT (blockno - ?) / ? FROM blocks WHERE inode=? AND blockno >= ?"
                                   " ORDER BY 1 LIMIT ?", (PATCH_BASE, PATCH_SEQS, ino, PATCH_BASE,
                                                           limit - len(out))).fetchall()
            if not rows:
                self._patched.discard(ino)
            out.extend((ino, r[0]) for r in rows)
            if len(out) >= limit:
                break
        return out

    def patches_of(self, ino: int, blockno: int) -> list[BlockRef]:
        """The patch rows of a block, in the order they apply."""
        lo, hi = patch_number(blockno, 0), patch_number(blockno, PATCH_SEQS - 1)
        checked = self._check_blocks(ino)
        if checked is not None:
            return [checked[n] for n in sorted(checked) if lo <= n <= hi]
        rows = self.db.execute(f"SELECT {_BLOCK_COLS}, mac FROM blocks WHERE inode=? AND blockno BETWEEN ? AND ?"
                               " ORDER BY blockno", (ino, lo, hi)).fetchall()
        if self.key is not None and not self._trusted(ino):
            for r in rows:
                if not ma.same(r[10], block_mac(self.key, r)):
                    self._forged(ino, f"block {r[1]} row")
        return [BlockRef(*r[:10]) for r in rows]

    def remove_patches(self, ino: int, blockno: int) -> None:
        """fsck's repair of patches whose block has no row (part of the caller's transaction)."""
        self._drop_patches(ino, blockno)

    def _drop_patches(self, ino: int, blockno: int) -> None:
        """A block got a new object (or none): its patches, which applied to the old one, go
        (their objects become garbage)."""
        lo, hi = patch_number(blockno, 0), patch_number(blockno, PATCH_SEQS - 1)
        self._first_blocks.pop(ino, None)
        rows = self.db.execute(f"SELECT {_BLOCK_COLS} FROM blocks WHERE inode=? AND blockno BETWEEN ? AND ?",
                               (ino, lo, hi)).fetchall()
        if not rows:
            return
        self.db.executemany("INSERT OR IGNORE INTO garbage (object_id) VALUES (?)", [(r[2],) for r in rows])
        self.garbage_made += 1
        self.db.execute("DELETE FROM blocks WHERE inode=? AND blockno BETWEEN ? AND ?", (ino, lo, hi))
        if self.key is not None:
            self._adjust(ino, sub=[block_mac(self.key, r) for r in rows])

    def stored_bytes_of(self, ino: int) -> int:
        """Plaintext bytes a file's block map holds (its st_blocks); patches not counted."""
        return self.db.execute("SELECT coalesce(sum(length), 0) FROM blocks WHERE inode=? AND blockno < ?",
                               (ino, PATCH_BASE)).fetchone()[0]

    def key_slot_of(self, object_id: bytes) -> tuple[int, bytes] | None:
        """The master-key version and key slot an object's row has now."""
        row = self.db.execute("SELECT key_version, key_slot FROM blocks WHERE object_id=?",
                              (object_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def _owns_nothing(self, ino: int) -> bool:
        """Whether `ino` owns no rows, as its set digest says: one checked against its rows in
        this mount (or made in it) and changed by this mount only since (no query)."""
        if self.key is None or ino not in self._verified:
            return False
        row = self._row(ino)
        return row is not None and self._digest(ino, row) == ma.ZERO

    def put_block(self, ref: BlockRef) -> BlockRef | None:
        """Point a block at a new object; the replaced object (if any) becomes garbage."""
        old = None if self._owns_nothing(ref.inode) else self.block(ref.inode, ref.blockno)
        self._first_blocks.pop(ref.inode, None)
        if old is not None:
            self.db.execute("INSERT OR IGNORE INTO garbage (object_id) VALUES (?)", (old.object_id,))
            self.garbage_made += 1
        mac = None if self.key is None else block_mac(self.key, ref)
        self.db.execute(
            f"INSERT OR REPLACE INTO blocks ({_BLOCK_COLS}, mac) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (ref.inode, ref.blockno, ref.object_id, ref.length, ref.obj_length, ref.hdr_len,
             ref.mode, ref.key_ref, ref.key_version, ref.key_slot, mac),
        )
        if mac is not None:
            self._adjust(ref.inode, add=[mac], sub=[] if old is None else [block_mac(self.key, old)])
        if is_patch(ref.blockno):
            self.has_patches(ref.inode)
            self._patched.add(ref.inode)
        elif old is not None and old.object_id != ref.object_id:
            self._drop_patches(ref.inode, ref.blockno)
        return old

    def truncate_blocks(self, ino: int, size: int, block_size: int) -> None:
        """Drop blocks wholly past `size` (and their patches) and shorten the one that
        straddles it (its patches stay: a read clips them to the row's length)."""
        first_gone = -(-size // block_size)
        self._first_blocks.pop(ino, None)
        # data blocks from first_gone, and the patches of those blocks
        gone = "inode=? AND ((blockno>=? AND blockno<?) OR blockno>=?)"
        args = (ino, first_gone, PATCH_BASE, patch_number(first_gone, 0))
        add, sub = [], []
        if self.key is not None:
            self._check_blocks(ino)
            sub = [block_mac(self.key, r) for r in self.db.execute(
                f"SELECT {_BLOCK_COLS} FROM blocks WHERE {gone}", args)]
        self.db.execute(f"INSERT OR IGNORE INTO garbage (object_id) SELECT object_id FROM blocks WHERE {gone}", args)
        self.garbage_made += 1
        self.db.execute(f"DELETE FROM blocks WHERE {gone}", args)
        if size % block_size:
            last = size // block_size
            old = self.block(ino, last) if self.key is not None else None
            if old is not None and old.length > size % block_size:
                new = dataclasses.replace(old, length=size % block_size)
                mac = block_mac(self.key, new)
                self.db.execute("UPDATE blocks SET length=?, mac=? WHERE inode=? AND blockno=?",
                                (new.length, mac, ino, last))
                add.append(mac)
                sub.append(block_mac(self.key, old))
            elif self.key is None:
                self.db.execute("UPDATE blocks SET length=min(length, ?) WHERE inode=? AND blockno=?",
                                (size % block_size, ino, last))
        if add or sub:
            self._adjust(ino, add=add, sub=sub)
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
        self._first_blocks.clear()  # which inode's row changes is known only below
        if self.key is not None:
            row = self.db.execute(f"SELECT {_BLOCK_COLS}, mac FROM blocks WHERE object_id=? AND key_slot=?",
                                  (object_id, old_slot)).fetchone()
            if row is None:
                return False
            old_mac = block_mac(self.key, row)
            if not ma.same(row[10], old_mac):  # never sign again what does not authenticate
                self._forged(row[0], f"block {row[1]} row")
            new = dataclasses.replace(BlockRef(*row[:10]), key_slot=new_slot, key_version=version)
            mac = block_mac(self.key, new)
            self.db.execute("UPDATE blocks SET key_slot=?, key_version=?, mac=? WHERE object_id=?",
                            (new_slot, version, mac, object_id))
            self._adjust(row[0], add=[mac], sub=[old_mac])
            return True
        cur = self.db.execute("UPDATE blocks SET key_slot = ?, key_version = ? "
                              "WHERE object_id = ? AND key_slot = ?",
                              (new_slot, version, object_id, old_slot))
        return cur.rowcount == 1

    def key_refs(self, ino: int) -> list[tuple[str, str]]:
        """The distinct (mode, key_ref) of a file's objects: the keys reading it needs."""
        checked = self._check_blocks(ino)
        if checked is not None:
            return list({(r.mode, r.key_ref) for r in checked.values()})
        return self.db.execute("SELECT DISTINCT mode, key_ref FROM blocks WHERE inode=?", (ino,)).fetchall()

    def key_versions(self, ino: int) -> list[tuple[str, str, int]]:
        self._check_blocks(ino)
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
    def garbage(self, limit: int, exclude: set[bytes] = frozenset()) -> list[bytes]:
        """Up to `limit` objects of the garbage table, none of `exclude`."""
        rows = self.db.execute("SELECT object_id FROM garbage LIMIT ?", (limit + len(exclude),))
        return [oid for (oid,) in rows if oid not in exclude][:limit]

    def add_garbage(self, object_id: bytes) -> None:
        self.db.execute("INSERT OR IGNORE INTO garbage (object_id) VALUES (?)", (object_id,))
        self.garbage_made += 1

    def forget_garbage(self, object_ids: list[bytes]) -> None:
        self.db.executemany("DELETE FROM garbage WHERE object_id=?", [(o,) for o in object_ids])

    # repairs (fsck --repair): each is part of the caller's transaction
    def remove_garbage(self, object_id: bytes) -> None:
        """Take an object off the deletion list (a row still references it)."""
        self.db.execute("DELETE FROM garbage WHERE object_id = ?", (object_id,))

    def drop_collected_garbage(self) -> None:
        """Forget deletion-list entries no row references (their objects are deleted)."""
        self.db.execute("DELETE FROM garbage WHERE object_id NOT IN (SELECT object_id FROM blocks)")

    def _remove_entries(self, where: str, args: tuple) -> None:
        """Remove the entries matching `where`, keeping their directories' digests."""
        if self.key is not None:
            for parent, name, ino in self.db.execute(
                    f"SELECT parent, name, inode FROM dentries WHERE {where}", args).fetchall():
                self.remove_entry(parent, name)
            return
        self.db.execute(f"DELETE FROM dentries WHERE {where}", args)

    def remove_dangling_entries(self) -> None:
        """Remove directory entries whose inode does not exist."""
        self._remove_entries("inode NOT IN (SELECT id FROM inodes)", ())

    def remove_stray_rows(self) -> None:
        """Remove xattrs and symlink targets of inodes that do not exist."""
        self.db.execute("DELETE FROM xattrs WHERE inode NOT IN (SELECT id FROM inodes)")
        self.db.execute("DELETE FROM symlinks WHERE inode NOT IN (SELECT id FROM inodes)")
        self._xattr_inodes = None

    def restore_inode(self, ino: int, mode: int, size: int, stored: int, now_ns: int) -> None:
        """Bring back a missing inode under its own number (its key slots are bound to it),
        owned by root, with one link. Its digest covers the block rows that authenticate."""
        digest = ma.ZERO
        if self.key is not None:
            digest = ma.digest_of(m for m, stored_mac in (
                (block_mac(self.key, r), r[10]) for r in self.db.execute(
                    f"SELECT {_BLOCK_COLS}, mac FROM blocks WHERE inode=?", (ino,))) if ma.same(stored_mac, m))
        row = (ino, mode, 0, 0, 1, size, 0, now_ns, now_ns, now_ns, stored, None, digest)
        self.db.execute(f"INSERT INTO inodes ({_INODE_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (*row, inode_mac(self.key, (*row, None)) if self.key is not None else None))
        self._rows.pop(ino, None)
        self._verified.discard(ino)
        self._first_blocks.pop(ino, None)

    def remove_entry_by_id(self, entry_id: int) -> None:
        self._remove_entries("id = ?", (entry_id,))

    def remove_entries_of(self, ino: int) -> None:
        """Remove every directory entry that names `ino`."""
        self._remove_entries("inode = ?", (ino,))

    def keep_oldest_entry(self, ino: int) -> None:
        """Remove every entry of `ino` but its oldest."""
        self._remove_entries("inode = ? AND id != (SELECT min(id) FROM dentries WHERE inode = ?)", (ino, ino))

    # authenticated metadata: the upgrade of an older store, and fsck's full check
    def _add_auth_columns(self) -> None:
        """A store made before authenticated metadata gets the (empty) columns on first open:
        the queries name them. Rows stay unsigned until authenticate_all."""
        for table in ("inodes", "dentries", "symlinks", "blocks"):
            cols = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if table == "inodes" and "digest" not in cols:
                self.db.execute("ALTER TABLE inodes ADD COLUMN digest BLOB")
            if "mac" not in cols:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN mac BLOB")

    def use_key(self, key: bytes) -> None:
        """Sign and check rows under `key` from now on (a connection opened before the
        keyring was read, as an S3 store's journal needs it from the start)."""
        self.key = key
        self._rows.clear()
        self._verified.clear()
        self._first_blocks.clear()

    def authenticate_all(self, key: bytes) -> int:
        """Sign every row of a store made before authenticated metadata (its rows as they
        are: the upgrade trusts the store it is given), in one transaction -> inodes signed.
        From then on this connection signs and checks under `key`."""
        with self.transaction():
            sums: dict[int, int] = {}

            def owned(ino: int, mac: bytes) -> None:
                sums[ino] = sums.get(ino, 0) + int.from_bytes(mac, "big")

            updates = []
            for r in self.db.execute(f"SELECT {_BLOCK_COLS} FROM blocks"):
                m = block_mac(key, r)
                owned(r[0], m)
                updates.append((m, r[0], r[1]))
            self.db.executemany("UPDATE blocks SET mac=? WHERE inode=? AND blockno=?", updates)
            updates = []
            for entry_id, parent, name, ino in self.db.execute("SELECT id, parent, name, inode FROM dentries"):
                m = ma.entry_mac(key, parent, name, ino)
                owned(parent, m)
                updates.append((m, entry_id))
            self.db.executemany("UPDATE dentries SET mac=? WHERE id=?", updates)
            updates = []
            for ino, target in self.db.execute("SELECT inode, target FROM symlinks"):
                m = ma.symlink_mac(key, ino, target)
                owned(ino, m)
                updates.append((m, ino))
            self.db.executemany("UPDATE symlinks SET mac=? WHERE inode=?", updates)
            updates = []
            for r in self.db.execute(f"SELECT {_INODE_COLS} FROM inodes"):
                digest = (sums.get(r[0], 0) % (1 << 256)).to_bytes(32, "big")
                row = (*r[:_DIGEST], digest, None)
                updates.append((digest, inode_mac(key, row), r[0]))
            self.db.executemany("UPDATE inodes SET digest=?, mac=? WHERE id=?", updates)
            self.set_state("schema_version", SCHEMA_VERSION)
        self.key = key
        self._rows.clear()
        self._verified.clear()
        self._first_blocks.clear()
        return len(updates)

    def reseal_entries(self, parent: int) -> int:
        """fsck --repair: drop a directory's entries that do not authenticate and make its
        digest the sum of those that do (entries it lost stay lost: their inodes are then
        disconnected, and reconnected in lost+found) -> entries dropped. The directory's own
        row must authenticate (it is not signed again otherwise)."""
        key = self.key
        assert key is not None
        good, bad = [], []
        for entry_id, name, ino, mac in self.db.execute(
                "SELECT id, name, inode, mac FROM dentries WHERE parent=?", (parent,)).fetchall():
            m = ma.entry_mac(key, parent, name, ino)
            (good if ma.same(mac, m) else bad).append(m if ma.same(mac, m) else entry_id)
        self.db.executemany("DELETE FROM dentries WHERE id=?", [(i,) for i in bad])
        self.update_inode(parent, digest=ma.digest_of(good))
        self._verified.discard(parent)
        return len(bad)

    def forged_records(self) -> list[tuple[int, str]]:
        """(inode, record) of every row that does not authenticate, and of every inode whose
        owned rows do not add up to its digest (fsck). Needs the key. A record naming an
        entry starts with "entry"."""
        key = self.key
        assert key is not None
        bad: list[tuple[int, str]] = []
        sums: dict[int, int] = {}

        def owned(ino: int, mac: bytes) -> None:
            sums[ino] = sums.get(ino, 0) + int.from_bytes(mac, "big")

        for r in self.db.execute(f"SELECT {_BLOCK_COLS}, mac FROM blocks"):
            m = block_mac(key, r)
            if not ma.same(r[10], m):
                bad.append((r[0], f"block {r[1]} row"))
            owned(r[0], m)
        for parent, name, ino, mac in self.db.execute("SELECT parent, name, inode, mac FROM dentries"):
            m = ma.entry_mac(key, parent, name, ino)
            if not ma.same(mac, m):
                bad.append((parent, f"entry {bytes(name)!r} (to inode {ino})"))
            owned(parent, m)
        symlinks = set()
        for ino, target, mac in self.db.execute("SELECT inode, target, mac FROM symlinks"):
            m = ma.symlink_mac(key, ino, target)
            if not ma.same(mac, m):
                bad.append((ino, "symlink target"))
            owned(ino, m)
            symlinks.add(ino)
        for r in self.db.execute(f"SELECT {_INODE_COLS} FROM inodes"):
            ino = r[0]
            if not ma.same(r[_MAC], inode_mac(key, r)):
                bad.append((ino, "inode row"))
            elif not ma.same(r[_DIGEST], (sums.get(ino, 0) % (1 << 256)).to_bytes(32, "big")):
                kind = r[1] & _S_IFMT
                what = ("entry list" if kind == _S_IFDIR else "symlink target" if kind == _S_IFLNK
                        else "block map")
                bad.append((ino, f"{what} (a row deleted, added or replayed)"))
            elif (r[1] & _S_IFMT) == _S_IFLNK and ino not in symlinks:
                bad.append((ino, "symlink target (missing)"))
        return bad

    def recount_stored_bytes(self) -> None:
        """Set every inode's stored_bytes to what its block-map rows hold."""
        self.db.execute("UPDATE inodes SET stored_bytes = coalesce((SELECT sum(length) FROM blocks b"
                        " WHERE b.inode = inodes.id AND b.blockno < ?), 0)", (PATCH_BASE,))
        self._rows.clear()
