"""The metadata journal as pure functions (s3fuse/journal.py): WAL frames of a real SQLite
database replayed onto a copy, records sealed and refused when moved, reordered, replayed,
copied to another store or altered, and the documented test vector."""

from __future__ import annotations

import os
import re
import sqlite3

import pytest

from s3fuse import journal
from s3fuse.errors import IntegrityError

from . import vectors

FORMAT_MD = os.path.join(os.path.dirname(__file__), "..", "docs", "FORMAT.md")
KEY = bytes(range(32))
STORE = vectors.STORE_ID
OTHER = bytes.fromhex("b1" * 16)


def _allow(name: str) -> bool:
    return name in ("keyring.bin", "audit.log")


def _db(path):
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    return db


def _reader(path):
    def read(off, size):
        with open(path, "rb") as f:
            f.seek(off)
            return f.read(size)
    return read


def _dump(path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return list(db.iterdump())
    finally:
        db.close()


def test_wal_frames_replayed_onto_a_copy_rebuild_the_database(tmp_path):
    """A copy taken at some point plus the frames from an earlier point on is the database
    now: the overlap is harmless (page images), deletes shrink the file (commit sizes)."""
    src = str(tmp_path / "meta.db")
    db = _db(src)
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
    for i in range(200):
        db.execute("INSERT INTO t VALUES (?, ?)", (i, os.urandom(300)))
    pos0 = journal.scan_wal(_reader(src + "-wal"), journal.WalPosition()).end
    db.execute("UPDATE t SET v = x'00' WHERE k < 50")
    copy = str(tmp_path / "copy.db")
    bak = sqlite3.connect(copy)
    db.backup(bak)
    bak.close()
    db.execute("DELETE FROM t WHERE k >= 100")
    db.execute("CREATE TABLE u (x)")
    db.execute("INSERT INTO u VALUES ('after the copy')")
    scan = journal.scan_wal(_reader(src + "-wal"), pos0)
    assert scan.frames and not scan.reset and scan.end.frames > pos0.frames
    with open(copy, "r+b") as f:
        journal.apply_frames(f, scan.page_size, scan.frames)
    assert _dump(copy) == _dump(src)
    assert sqlite3.connect(copy).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    # nothing new: an empty scan that stays where it was
    again = journal.scan_wal(_reader(src + "-wal"), scan.end)
    assert not again.frames and again.end == scan.end
    db.close()


def test_a_checkpoint_of_the_frames_replays_to_the_same_database(tmp_path):
    """A record keeps the newest image of each page: replayed onto the copy it rebuilds the
    database as every frame does, through a shrink (VACUUM) and growth after it, with each
    page once."""
    src = str(tmp_path / "meta.db")
    db = _db(src)
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
    db.execute("CREATE INDEX tv ON t (v)")
    for i in range(300):
        db.execute("INSERT INTO t VALUES (?, ?)", (i, os.urandom(200)))
    copy = str(tmp_path / "copy.db")
    bak = sqlite3.connect(copy)
    db.backup(bak)
    bak.close()
    pos0 = journal.scan_wal(_reader(src + "-wal"), journal.WalPosition()).end
    for i in range(300, 500):  # one transaction each, as small-file creates are
        db.execute("INSERT INTO t VALUES (?, ?)", (i, os.urandom(200)))
    db.execute("DELETE FROM t WHERE k < 400")
    db.execute("VACUUM")
    for i in range(500, 520):
        db.execute("INSERT INTO t VALUES (?, ?)", (i, os.urandom(200)))
    scan = journal.scan_wal(_reader(src + "-wal"), pos0, max_bytes=1 << 40)
    frames = journal.checkpoint_frames(scan.frames)
    pages = [p for p, _, _ in frames]
    assert pages == sorted(set(pages)) and len(frames) * 4 < len(scan.frames)
    assert [c for _, c, _ in frames[:-1]] == [0] * (len(frames) - 1)
    assert frames[-1][1] == scan.frames[-1][1] and max(pages) <= frames[-1][1]
    with open(copy, "r+b") as f:
        journal.apply_frames(f, scan.page_size, frames)
    assert os.path.getsize(copy) == frames[-1][1] * scan.page_size
    assert _dump(copy) == _dump(src)
    assert sqlite3.connect(copy).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()


def test_an_unfinished_transaction_and_a_torn_frame_are_not_taken(tmp_path):
    src = str(tmp_path / "meta.db")
    db = _db(src)
    db.execute("CREATE TABLE t (v)")
    db.execute("INSERT INTO t VALUES (1)")
    done = journal.scan_wal(_reader(src + "-wal"), journal.WalPosition())
    db.execute("INSERT INTO t VALUES (2)")
    wal = open(src + "-wal", "rb").read()
    db.close()
    frame = journal.FRAME_HEADER.size + done.page_size
    torn = bytearray(wal[:len(wal) - 100])  # the last frame cut short
    scan = journal.scan_wal(lambda o, n: bytes(torn[o:o + n]), done.end)
    assert scan.frames == [] and scan.end == done.end
    flipped = bytearray(wal)
    flipped[-1] ^= 1  # the last frame's page altered: its checksum fails
    scan = journal.scan_wal(lambda o, n: bytes(flipped[o:o + n]), done.end)
    assert scan.frames == []
    assert (len(wal) - journal.WAL_HEADER.size) % frame == 0


def test_frames_below_the_size_the_writer_left_are_taken_with_their_header_checksums(tmp_path):
    """The daemon's own WAL, below the size it saw between its transactions: the same frames
    and position as a full check; frames past that size wait for the next scan, which checks
    them in full when it has no size."""
    src = str(tmp_path / "meta.db")
    db = _db(src)
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
    for i in range(50):
        db.execute("INSERT INTO t VALUES (?, ?)", (i, os.urandom(300)))
    size = os.path.getsize(src + "-wal")
    checked = journal.scan_wal(_reader(src + "-wal"), journal.WalPosition())
    trusted = journal.scan_wal(_reader(src + "-wal"), journal.WalPosition(), written=size)
    assert trusted.frames == checked.frames and trusted.end == checked.end
    db.execute("INSERT INTO t VALUES (1000, x'01')")
    wal = bytearray(open(src + "-wal", "rb").read())
    db.close()
    later = journal.scan_wal(lambda o, n: bytes(wal[o:o + n]), trusted.end, written=size)
    assert later.frames == [] and later.end == trusted.end  # committed after the size was seen
    wal[-1] ^= 1  # a frame past the size seen: its checksum is checked, and fails
    scan = journal.scan_wal(lambda o, n: bytes(wal[o:o + n]), trusted.end)
    assert scan.frames == [] and scan.end == trusted.end
    wal[-1] ^= 1
    scan = journal.scan_wal(lambda o, n: bytes(wal[o:o + n]), trusted.end, written=len(wal))
    assert len(scan.frames) >= 1 and scan.end.frames > trusted.end.frames


def test_a_checkpointed_and_restarted_wal_is_reported(tmp_path):
    src = str(tmp_path / "meta.db")
    db = _db(src)
    db.execute("CREATE TABLE t (v)")
    pos = journal.scan_wal(_reader(src + "-wal"), journal.WalPosition()).end
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("INSERT INTO t VALUES (1)")
    scan = journal.scan_wal(_reader(src + "-wal"), pos)
    assert scan.reset and not scan.frames
    # from "whatever WAL comes next" it is read from its start
    assert journal.scan_wal(_reader(src + "-wal"), journal.WalPosition()).frames
    db.close()


def test_scan_stops_at_the_byte_bound_on_a_commit(tmp_path):
    src = str(tmp_path / "meta.db")
    db = _db(src)
    db.execute("CREATE TABLE t (v)")
    for _ in range(30):
        db.execute("INSERT INTO t VALUES (?)", (os.urandom(3000),))
    first = journal.scan_wal(_reader(src + "-wal"), journal.WalPosition(), max_bytes=4096)
    assert first.frames and first.frames[-1][1]
    rest = journal.scan_wal(_reader(src + "-wal"), first.end)
    assert rest.frames
    whole = journal.scan_wal(_reader(src + "-wal"), journal.WalPosition())
    assert first.frames + rest.frames != [] and len(first.frames) + len(rest.frames) <= len(whole.frames)
    db.close()


def _entries():
    return journal.Entries(page_size=512, frames=[(1, 0, bytes(512)), (2, 2, b"\x01" * 512)],
                           files=[journal.FileEntry("audit.log", 10, b"tail"),
                                  journal.FileEntry("keyring.bin", 0, b"sealed")])


def test_record_round_trip_and_binding():
    prev = journal.link(b"snapshot header")
    blob = journal.seal(KEY, STORE, 7, 1, prev, _entries())
    got = journal.open_record(KEY, STORE, 7, 1, prev, blob, _allow)
    assert got == _entries()
    cases = {
        "another store": lambda: journal.open_record(KEY, OTHER, 7, 1, prev, blob, _allow),
        "reordered/replayed": lambda: journal.open_record(KEY, STORE, 7, 2, prev, blob, _allow),
        "another epoch": lambda: journal.open_record(KEY, STORE, 8, 1, prev, blob, _allow),
        "another history": lambda: journal.open_record(KEY, STORE, 7, 1, journal.link(b"x"), blob, _allow),
        "wrong key": lambda: journal.open_record(bytes(32), STORE, 7, 1, prev, blob, _allow),
        "names not allowed": lambda: journal.open_record(KEY, STORE, 7, 1, prev, blob, lambda n: False),
    }
    for what, call in cases.items():
        with pytest.raises(IntegrityError):
            call()
            pytest.fail(what)
    # a header rewritten to claim another position fails authentication
    forged = bytearray(blob)
    forged[32:40] = (2).to_bytes(8, "big")
    with pytest.raises(IntegrityError, match="authentication"):
        journal.open_record(KEY, STORE, 7, 2, prev, bytes(forged), _allow)
    for i in (0, journal.HEADER.size + 3, len(blob) - 1):
        bad = bytearray(blob)
        bad[i] ^= 0x40
        with pytest.raises(IntegrityError):
            journal.open_record(KEY, STORE, 7, 1, prev, bytes(bad), _allow)
    with pytest.raises(IntegrityError):
        journal.open_record(KEY, STORE, 7, 1, prev, blob[:-1], _allow)


def test_file_entries_continue_and_replace(tmp_path):
    p = str(tmp_path / "audit.log")
    open(p, "wb").write(b"0123456789junk")
    journal.apply_file(p, journal.FileEntry("audit.log", 10, b"tail"))
    assert open(p, "rb").read() == b"0123456789tail"
    journal.apply_file(p, journal.FileEntry("audit.log", 0, b"new"))
    assert open(p, "rb").read() == b"new"
    with pytest.raises(IntegrityError):
        journal.apply_file(p, journal.FileEntry("audit.log", 99, b"x"))


def vector_record() -> bytes:
    e = journal.Entries(page_size=512, frames=[(1, 1, bytes(range(256)) * 2)],
                        files=[journal.FileEntry("audit.log", 3, b"abc")])
    return journal.seal(bytes(range(32)), STORE, 1, 1, journal.link(b"S3FSNAP1"), e,
                        nonce=bytes(range(12)))


def test_record_matches_documented_vector():
    text = open(FORMAT_MD).read()
    section = text.split("Journal record (`tests/test_journal.py`", 1)[1]
    block = re.search(r"```\n([0-9a-f\n]+)```", section).group(1)
    assert vector_record() == bytes.fromhex(block.replace("\n", ""))


def test_journal_key_is_bound_to_the_store():
    assert journal.journal_key(KEY, STORE) != journal.journal_key(KEY, OTHER)
    assert len(journal.journal_key(KEY, STORE)) == 32
