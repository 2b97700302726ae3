"""Read-only queries of the metadata database that only checking tools need: fsck's checks,
and what the CLI reads from an unmounted store. Every query that changes the database is in
meta.py; nothing here writes (a temporary table of fsck's lives in SQLite's temp schema).
"""

from __future__ import annotations

import errno
import os
import sqlite3

from .errors import S3fuseError
from .format import PATCH_BASE, PATCH_SEQS
from .meta import BLOCK_COLUMNS, BlockRef

# block-map rows of data blocks (patches are numbered from PATCH_BASE)
_DATA = f"blockno < {PATCH_BASE}"

META_NAME = "meta.db"


def stored_audit_head(store: str) -> tuple[str | None, int | None]:
    """The audit trail's head and sequence number the daemon recorded at its last clean stop;
    (None, None) if the store is mounted or was not stopped cleanly (the trail may have run
    past the head). Opens the database read-only."""
    db_path = os.path.join(store, META_NAME)
    if not os.path.exists(db_path):
        raise S3fuseError(f"{store} is not an s3fuse store", errno.EINVAL)
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = dict(db.execute(
            "SELECT key, value FROM state WHERE key IN ('audit_head', 'audit_seq', 'clean')"))
    finally:
        db.close()
    if not rows.get("clean"):
        return None, None
    return rows.get("audit_head"), rows.get("audit_seq")


_S_IFMT = 0o170000
_S_IFDIR = 0o040000
_S_IFREG = 0o100000
_S_IFLNK = 0o120000
_IS_DIR = f"(mode & {_S_IFMT}) = {_S_IFDIR}"


class MetaQuery:
    """fsck's questions about one metadata database (a `Meta`'s connection), each a named
    query. Rows come back as tuples, block-map rows as `meta.BlockRef`."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self.db.execute(sql, args).fetchall()

    def _one(self, sql: str, args: tuple = ()):
        return self.db.execute(sql, args).fetchone()[0]

    # ---- the database and the namespace
    def integrity_check(self, quick: bool) -> list[str]:
        """SQLite's own check: ["ok"], or what is wrong."""
        return [r[0] for r in self._all("PRAGMA quick_check" if quick else "PRAGMA integrity_check")]

    def count_inodes(self) -> int:
        return self._one("SELECT count(*) FROM inodes")

    def count_directories(self) -> int:
        return self._one(f"SELECT count(*) FROM inodes WHERE {_IS_DIR}")

    def count_files(self) -> int:
        return self._one(f"SELECT count(*) FROM inodes WHERE (mode & {_S_IFMT}) = {_S_IFREG}")

    def dangling_entries(self) -> list[tuple[int, int, bytes, int]]:
        """(entry id, parent, name, inode) of entries whose inode does not exist."""
        return self._all("SELECT id, parent, name, inode FROM dentries"
                         " WHERE inode NOT IN (SELECT id FROM inodes)")

    def misplaced_entries(self) -> list[tuple[int, int, bytes, int]]:
        """(entry id, parent, name, inode) of entries in a missing inode or a non-directory."""
        return self._all(
            "SELECT d.id, d.parent, d.name, d.inode FROM dentries d LEFT JOIN inodes p ON p.id = d.parent"
            f" WHERE p.id IS NULL OR (p.mode & {_S_IFMT}) != {_S_IFDIR}")

    def is_linked(self, ino: int) -> bool:
        """Whether any directory entry names `ino`."""
        return self.db.execute("SELECT 1 FROM dentries WHERE inode = ? LIMIT 1", (ino,)).fetchone() is not None

    def entry_names(self, ino: int) -> list[bytes]:
        return [r[0] for r in self._all("SELECT name FROM dentries WHERE inode = ?", (ino,))]

    def directories_with_several_entries(self) -> list[tuple[int, int]]:
        """(inode, entries) of directories with more than one entry."""
        return self._all(
            "SELECT d.inode, count(*) FROM dentries d JOIN inodes i ON i.id = d.inode"
            f" WHERE (i.mode & {_S_IFMT}) = {_S_IFDIR} GROUP BY d.inode HAVING count(*) > 1")

    def unreachable(self, root: int) -> list[int]:
        """Inodes with entries or links that no path from `root` reaches. Uses a table in
        SQLite's temp schema (this connection only, never the store's file)."""
        self.db.execute("DROP TABLE IF EXISTS temp.reach")
        self.db.execute(
            "CREATE TEMP TABLE reach AS WITH RECURSIVE r(ino) AS (SELECT ? UNION"
            " SELECT d.inode FROM dentries d JOIN r ON d.parent = r.ino) SELECT ino FROM r", (root,))
        return [r[0] for r in self._all(
            "SELECT id FROM inodes WHERE id NOT IN (SELECT ino FROM temp.reach)"
            " AND (nlink > 0 OR id IN (SELECT inode FROM dentries)) ORDER BY id")]

    def link_counts(self) -> list[tuple[int, int, int, int]]:
        """(inode, mode, nlink, the link count its entries call for) of every inode."""
        return self._all(
            "SELECT i.id, i.mode, i.nlink,"
            f" CASE WHEN (i.mode & {_S_IFMT}) = {_S_IFDIR} THEN 2 + (SELECT count(*) FROM dentries d"
            f"   JOIN inodes c ON c.id = d.inode WHERE d.parent = i.id AND (c.mode & {_S_IFMT}) = {_S_IFDIR})"
            "  ELSE (SELECT count(*) FROM dentries d WHERE d.inode = i.id) END"
            " FROM inodes i")

    def symlinks_without_target(self) -> list[int]:
        return [r[0] for r in self._all(
            f"SELECT id FROM inodes i WHERE (mode & {_S_IFMT}) = {_S_IFLNK}"
            " AND NOT EXISTS (SELECT 1 FROM symlinks s WHERE s.inode = i.id)")]

    def stray_xattr_rows(self) -> int:
        return self._one("SELECT count(*) FROM xattrs WHERE inode NOT IN (SELECT id FROM inodes)")

    def stray_symlink_rows(self) -> int:
        return self._one("SELECT count(*) FROM symlinks WHERE inode NOT IN (SELECT id FROM inodes)")

    def inodes_with_xattr(self, name: bytes) -> set[int]:
        return {r[0] for r in self._all("SELECT inode FROM xattrs WHERE name = ?", (name,))}

    def encryption_settings(self) -> list[tuple[int, bytes]]:
        """(inode, encoded policy) of every inode with its own encryption setting."""
        return self._all("SELECT id, sse FROM inodes WHERE sse IS NOT NULL")

    # ---- the block map
    def count_blocks(self) -> int:
        return self._one("SELECT count(*) FROM blocks")

    def blocks_of_missing_inodes(self) -> list[tuple[int, int]]:
        """(inode, rows) of block-map rows whose inode does not exist."""
        return self._all("SELECT inode, count(*) FROM blocks WHERE inode NOT IN (SELECT id FROM inodes)"
                         " GROUP BY inode")

    def extent_of_blocks(self, ino: int, block_size: int) -> tuple[int, int]:
        """(the size its rows reach, the bytes they hold) of an inode's block-map rows."""
        size = self._one(f"SELECT max(blockno * ? + length) FROM blocks WHERE inode = ? AND {_DATA}",
                         (block_size, ino))
        stored = self._one(f"SELECT sum(length) FROM blocks WHERE inode = ? AND {_DATA}", (ino,))
        return size or 0, stored or 0

    def blocks_of_non_files(self) -> list[tuple[int, int]]:
        """(inode, mode) of inodes that have block-map rows but are not regular files."""
        return self._all(
            "SELECT DISTINCT i.id, i.mode FROM blocks b JOIN inodes i ON i.id = b.inode"
            f" WHERE (i.mode & {_S_IFMT}) != {_S_IFREG}")

    def impossible_block_rows(self, block_size: int, max_header: int) -> list[BlockRef]:
        """Rows whose numbers no flush writes: lengths, header length, object id."""
        return [BlockRef(*r) for r in self._all(
            f"SELECT {BLOCK_COLUMNS} FROM blocks WHERE blockno < 0 OR length <= 0 OR length > obj_length"
            " OR obj_length > ? OR hdr_len < 39 OR hdr_len > ? OR length(object_id) != 16",
            (block_size, max_header))]

    def stray_patches(self) -> list[BlockRef]:
        """Patch rows whose block has no row (nothing they could apply to)."""
        return [BlockRef(*r) for r in self._all(
            f"SELECT {BLOCK_COLUMNS} FROM blocks p WHERE p.blockno >= ? AND NOT EXISTS (SELECT 1 FROM blocks b"
            " WHERE b.inode = p.inode AND b.blockno = (p.blockno - ?) / ?)", (PATCH_BASE, PATCH_BASE, PATCH_SEQS))]

    def blocks_past_size(self, block_size: int) -> list[tuple[int, int, int]]:
        """(inode, blockno, size) of rows that start at or past their file's size."""
        return self._all(
            "SELECT b.inode, b.blockno, i.size FROM blocks b JOIN inodes i ON i.id = b.inode"
            f" WHERE b.{_DATA} AND b.blockno * ? >= i.size", (block_size,))

    def blocks_over_size(self, block_size: int) -> list[tuple[int, int, int, int]]:
        """(inode, blockno, length, size) of rows that start inside their file and end past it."""
        return self._all(
            "SELECT b.inode, b.blockno, b.length, i.size FROM blocks b JOIN inodes i ON i.id = b.inode"
            f" WHERE b.{_DATA} AND b.blockno * ? < i.size AND b.blockno * ? + b.length > i.size",
            (block_size, block_size))

    def files_with_blocks_past_size(self, block_size: int) -> list[tuple[int, int]]:
        """(inode, size) of files with a row that ends past their size."""
        return self._all(
            "SELECT DISTINCT i.id, i.size FROM blocks b JOIN inodes i ON i.id = b.inode"
            f" WHERE b.{_DATA} AND b.blockno * ? + b.length > i.size", (block_size,))

    def stored_bytes(self) -> list[tuple[int, int, int]]:
        """(inode, stored bytes it records, bytes its rows hold) of every inode."""
        return self._all(
            "SELECT i.id, i.stored_bytes, coalesce((SELECT sum(length) FROM blocks b WHERE b.inode = i.id"
            f" AND b.{_DATA}), 0)"
            " FROM inodes i")

    def referenced_garbage(self) -> list[bytes]:
        """Objects on the deletion list that a row still references."""
        return [r[0] for r in self._all(
            "SELECT object_id FROM garbage WHERE object_id IN (SELECT object_id FROM blocks)")]

    def referenced_objects(self) -> set[bytes]:
        return {r[0] for r in self._all("SELECT object_id FROM blocks")}

    def garbage_objects(self) -> set[bytes]:
        return {r[0] for r in self._all("SELECT object_id FROM garbage")}

    def all_blocks(self) -> list[BlockRef]:
        """Every block-map row, by inode and block number."""
        return [BlockRef(*r) for r in self._all(f"SELECT {BLOCK_COLUMNS} FROM blocks ORDER BY inode, blockno")]

    # ---- keys
    def master_key_versions(self, mode: str, skip_xattr: bytes) -> list[tuple[int, int]]:
        """(key version, rows) of `mode`'s rows, leaving out inodes that carry `skip_xattr`."""
        return self._all(
            "SELECT key_version, count(*) FROM blocks WHERE mode = ?"
            " AND inode NOT IN (SELECT inode FROM xattrs WHERE name = ?) GROUP BY key_version",
            (mode, skip_xattr))

    def kms_key_versions(self, mode: str, skip_xattr: bytes) -> list[tuple[str, int, int]]:
        """(key id, version, rows) of `mode`'s rows, leaving out inodes that carry `skip_xattr`."""
        return self._all(
            "SELECT key_ref, key_version, count(*) FROM blocks WHERE mode = ?"
            " AND inode NOT IN (SELECT inode FROM xattrs WHERE name = ?) GROUP BY key_ref, key_version",
            (mode, skip_xattr))

    def key_refs(self, mode: str) -> list[tuple[str, int]]:
        """(key reference, rows) of `mode`'s rows."""
        return self._all("SELECT key_ref, count(*) FROM blocks WHERE mode = ? GROUP BY key_ref", (mode,))


def path_listing(db_path: str) -> dict[bytes, tuple]:
    """Every path of a metadata database (opened read-only) with what tells versions of it
    apart: (mode, size, mtime_ns, the objects holding its blocks)."""
    if not os.path.exists(db_path):
        raise S3fuseError(f"{db_path} does not exist", errno.ENOENT)
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        inodes = {row[0]: row[1:] for row in db.execute("SELECT id, mode, size, mtime_ns FROM inodes")}
        objects: dict[int, list[bytes]] = {}
        for ino, oid in db.execute("SELECT inode, object_id FROM blocks ORDER BY inode, blockno"):
            objects.setdefault(ino, []).append(oid)
        children: dict[int, list[tuple[bytes, int]]] = {}
        for parent, name, ino in db.execute("SELECT parent, name, inode FROM dentries"):
            children.setdefault(parent, []).append((bytes(name), ino))
    finally:
        db.close()
    out: dict[bytes, tuple] = {}
    stack, seen = [(b"", 1)], {1}
    while stack:
        prefix, ino = stack.pop()
        for name, child in children.get(ino, ()):
            path = prefix + b"/" + name
            mode, size, mtime = inodes.get(child, (0, 0, 0))
            out[path] = (mode, size, mtime, tuple(objects.get(child, ())))
            if (mode & _S_IFMT) == _S_IFDIR and child not in seen:
                seen.add(child)
                stack.append((path, child))
    return out
