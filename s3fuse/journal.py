"""The metadata journal of an S3 store (docs/FORMAT.md, "Metadata journal"): sans-I/O.

Between two snapshots, the changes of the local state go to the bucket as records. The
database's changes are SQLite's own WAL frames (page images, with the commit marks), so
every metadata change is covered with no code per operation; the other files a snapshot
carries (sealed keyring and keystores: whole; the audit trail: its appended tail) go as
file entries. Replaying a snapshot plus its records in order rebuilds the state.

    record = header | AES-256-GCM(K, nonce, entries, aad = header)
    header = "S3FJRNL1" | store id (16) | epoch (u64 BE) | seq (u64 BE) | prev (32) | nonce (12)

epoch is the sequence number of the snapshot the record follows, seq counts from 1 within
it, prev is SHA-256 of the previous record (of the snapshot's header for seq 1): a record
cannot be moved to another store, position or history without failing the checks.

This module parses the WAL, encodes and decodes records and applies them to files; the
bucket and the daemon's timing are s3store.py's.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import IntegrityError

MAGIC = b"S3FJRNL1"
HEADER = struct.Struct(">8s16sQQ32s12s")
TAG = 16
KIND_WAL, KIND_FILE = 1, 2
# what one record may hold, and what a reader accepts (a bound on every input)
MAX_RECORD = 64 << 20
MAX_FRAMES_BYTES = 16 << 20

WAL_HEADER = struct.Struct(">IIIIIIII")
FRAME_HEADER = struct.Struct(">IIIIII")
WAL_MAGICS = (0x377F0682, 0x377F0683)


def journal_key(root_key: bytes, store_id: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=store_id,
                info=b"s3fuse metadata journal v1").derive(root_key)


def link(blob: bytes) -> bytes:
    """What the next record's `prev` holds: SHA-256 of a record, or of a snapshot's header."""
    return hashlib.sha256(blob).digest()


# -- the WAL ---------------------------------------------------------------------------

def _checksum(data: bytes | memoryview, big: bool, s0: int, s1: int) -> tuple[int, int]:
    """SQLite's WAL checksum (two 32-bit sums over 32-bit words) continued from (s0, s1)."""
    words = struct.unpack(f"{'>' if big else '<'}{len(data) // 4}I", data)
    m = 0xFFFFFFFF
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & m
        s1 = (s1 + words[i + 1] + s0) & m
    return s0, s1


@dataclass
class WalPosition:
    """Where shipping stands in a WAL: after `frames` frames of the WAL with these salts;
    `cksum` is the running checksum there. salts None: at the start of whatever WAL comes
    next (the previous one was checkpointed with every frame shipped)."""
    salts: tuple[int, int] | None = None
    frames: int = 0
    cksum: tuple[int, int] = (0, 0)

    def to_json(self) -> dict:
        return {"salts": list(self.salts) if self.salts else None, "frames": self.frames,
                "cksum": list(self.cksum)}

    @classmethod
    def from_json(cls, d: dict) -> "WalPosition":
        s = d.get("salts")
        return cls(tuple(s) if s else None, int(d.get("frames", 0)), tuple(d.get("cksum", (0, 0))))


@dataclass
class WalScan:
    page_size: int = 0
    frames: list[tuple[int, int, bytes]] = field(default_factory=list)  # (page, commit size, image)
    end: WalPosition | None = None  # after the last commit frame taken
    reset: bool = False  # the WAL is not the one `start` names: frames before were lost


def parse_wal_header(head: bytes) -> tuple[int, bool, tuple[int, int], tuple[int, int]] | None:
    """(page size, big-endian checksums, salts, header checksum), or None if no valid header."""
    if len(head) < WAL_HEADER.size:
        return None
    magic, _version, page_size, _ckpt, salt1, salt2, c0, c1 = WAL_HEADER.unpack_from(head)
    if magic not in WAL_MAGICS or page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        return None
    big = bool(magic & 1)
    if _checksum(head[:24], big, 0, 0) != (c0, c1):
        return None
    return page_size, big, (salt1, salt2), (c0, c1)


def scan_wal(read, start: WalPosition, max_bytes: int = MAX_FRAMES_BYTES,
             written: int | None = None) -> WalScan:
    """The committed frames after `start`, up to about max_bytes (whole transactions; a
    single larger one is returned whole). `read(offset, size)` reads the WAL file.

    A frame counts when its salts are the header's and its running checksum holds, as in
    SQLite's own recovery; frames after the last commit frame are a transaction still being
    written and are left for the next scan. `written`: the WAL's size as this process's own
    connection left it, seen between its transactions; frames wholly below it were written
    whole by SQLite, so their checksums are taken from their headers, not recomputed (the
    recomputation is pure Python and would hold the GIL for about 150 us per page); frames
    past it are left for the next scan, so that a shipment covers what was committed before
    it began and does not chase a writer that keeps committing."""
    out = WalScan(end=start)
    hdr = parse_wal_header(read(0, WAL_HEADER.size))
    if hdr is None:
        out.reset = start.salts is not None
        return out
    page_size, big, salts, cksum = hdr
    out.page_size = page_size
    if start.salts is None:
        pos = WalPosition(salts, 0, cksum)
    elif start.salts != salts:
        out.reset = True
        return out
    else:
        pos = start
    out.end = pos
    frame_size = FRAME_HEADER.size + page_size
    n, s = pos.frames, pos.cksum
    pending: list[tuple[int, int, bytes]] = []
    taken = 0
    while True:
        buf = read(WAL_HEADER.size + n * frame_size, frame_size)
        if len(buf) < frame_size:
            break
        pgno, commit, salt1, salt2, c0, c1 = FRAME_HEADER.unpack_from(buf)
        if (salt1, salt2) != salts or pgno == 0:
            break
        if written is not None:
            if WAL_HEADER.size + (n + 1) * frame_size > written:
                break
            s = (c0, c1)
        else:
            s = _checksum(memoryview(buf)[:8], big, *s)
            s = _checksum(memoryview(buf)[FRAME_HEADER.size:], big, *s)
            if s != (c0, c1):
                break
        n += 1
        pending.append((pgno, commit, bytes(buf[FRAME_HEADER.size:])))
        if commit:
            out.frames += pending
            taken += len(pending) * page_size
            pending = []
            out.end = WalPosition(salts, n, s)
            if taken >= max_bytes:
                break
    return out


def checkpoint_frames(frames: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """What a checkpoint of these committed frames (ending with a commit) writes, as frames:
    the newest image of each page within the last commit's database size, in page order,
    that size on the last frame and 0 on the others. Replaying them leaves the database file
    as replaying every frame would, as SQLite's own checkpoint does; a page changed by many
    transactions goes once."""
    if not frames:
        return []
    size = frames[-1][1]
    newest = {pgno: image for pgno, _commit, image in frames}
    pages = sorted(p for p in newest if p <= size)
    out = [(p, 0, newest[p]) for p in pages]
    out[-1] = (pages[-1], size, newest[pages[-1]])
    return out


# -- records ---------------------------------------------------------------------------

@dataclass
class FileEntry:
    """Set file `name` to its first `base` bytes followed by `data`."""
    name: str
    base: int
    data: bytes


@dataclass
class Entries:
    page_size: int = 0
    frames: list[tuple[int, int, bytes]] = field(default_factory=list)
    files: list[FileEntry] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.frames or self.files)


def encode_entries(e: Entries) -> bytes:
    parts = [struct.pack(">I", (1 if e.frames else 0) + len(e.files))]
    if e.frames:
        parts.append(struct.pack(">BII", KIND_WAL, e.page_size, len(e.frames)))
        for pgno, commit, page in e.frames:
            if len(page) != e.page_size:
                raise ValueError("a WAL frame's page has the wrong size")
            parts.append(struct.pack(">II", pgno, commit))
            parts.append(page)
    for f in e.files:
        raw = f.name.encode()
        parts.append(struct.pack(">BH", KIND_FILE, len(raw)) + raw + struct.pack(">QQ", f.base, len(f.data)))
        parts.append(f.data)
    return b"".join(parts)


def decode_entries(buf: bytes, allowed) -> Entries:
    """The entries of an authenticated record; `allowed(name)` says which file names may appear."""
    view = memoryview(buf)
    out = Entries()
    try:
        (count,) = struct.unpack_from(">I", view, 0)
        off = 4
        for _ in range(count):
            kind = view[off]
            off += 1
            if kind == KIND_WAL and not out.frames:
                page_size, n = struct.unpack_from(">II", view, off)
                off += 8
                if page_size < 512 or page_size > 65536 or page_size & (page_size - 1) or not n:
                    raise IntegrityError("journal record: bad WAL entry")
                if off + n * (8 + page_size) > len(view):
                    raise IntegrityError("journal record is truncated")
                out.page_size = page_size
                for _ in range(n):
                    pgno, commit = struct.unpack_from(">II", view, off)
                    if pgno == 0:
                        raise IntegrityError("journal record: page 0")
                    out.frames.append((pgno, commit, bytes(view[off + 8:off + 8 + page_size])))
                    off += 8 + page_size
                if not out.frames[-1][1]:
                    raise IntegrityError("journal record: the frames do not end with a commit")
            elif kind == KIND_FILE:
                (nlen,) = struct.unpack_from(">H", view, off)
                name = bytes(view[off + 2:off + 2 + nlen]).decode()
                off += 2 + nlen
                base, size = struct.unpack_from(">QQ", view, off)
                off += 16
                if not allowed(name) or "/" in name or off + size > len(view):
                    raise IntegrityError(f"journal record: unexpected file entry {name!r}")
                out.files.append(FileEntry(name, base, bytes(view[off:off + size])))
                off += size
            else:
                raise IntegrityError(f"journal record: unknown entry kind {kind}")
    except (struct.error, IndexError, UnicodeDecodeError):
        raise IntegrityError("journal record is malformed") from None
    if off != len(view):
        raise IntegrityError("journal record has bytes after its entries")
    return out


def seal(key: bytes, store_id: bytes, epoch: int, seq: int, prev: bytes, entries: Entries,
         nonce: bytes | None = None) -> bytes:
    nonce = os.urandom(12) if nonce is None else nonce
    header = HEADER.pack(MAGIC, store_id, epoch, seq, prev, nonce)
    return header + AESGCM(key).encrypt(nonce, encode_entries(entries), header)


def read_header(blob: bytes) -> tuple[bytes, int, int, bytes]:
    """(store id, epoch, seq, prev) of a record, not yet authenticated."""
    if len(blob) < HEADER.size + TAG:
        raise IntegrityError("journal record is too short")
    magic, store_id, epoch, seq, prev, _ = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise IntegrityError("not an s3fuse journal record")
    return store_id, epoch, seq, prev


def open_record(key: bytes, store_id: bytes, epoch: int, seq: int, prev: bytes, blob: bytes,
                allowed) -> Entries:
    """Authenticate and decode the record expected at (epoch, seq) after `prev`; any
    mismatch (another store, position or history, or altered bytes) is an IntegrityError."""
    if len(blob) > MAX_RECORD:
        raise IntegrityError(f"journal record {epoch}/{seq} is too large")
    got_store, got_epoch, got_seq, got_prev = read_header(blob)
    if got_store != store_id:
        raise IntegrityError(f"journal record {epoch}/{seq} belongs to store {got_store.hex()}")
    if (got_epoch, got_seq) != (epoch, seq):
        raise IntegrityError(f"journal record {epoch}/{seq} holds record {got_epoch}/{got_seq} "
                             "(moved, reordered or replayed)")
    if got_prev != prev:
        raise IntegrityError(f"journal record {epoch}/{seq} does not follow the record or snapshot before it")
    header = blob[:HEADER.size]
    nonce = HEADER.unpack_from(blob)[5]
    try:
        plain = AESGCM(key).decrypt(nonce, blob[HEADER.size:], header)
    except InvalidTag:
        raise IntegrityError(f"journal record {epoch}/{seq} failed authentication: "
                             "wrong root key, or the record was altered") from None
    return decode_entries(plain, allowed)


# -- replay ----------------------------------------------------------------------------

def apply_frames(f, page_size: int, frames: list[tuple[int, int, bytes]]) -> None:
    """Write WAL frames into a database file (open r+b), in order, truncating at each commit to
    the database size it records: what an SQLite checkpoint of them does."""
    for pgno, commit, page in frames:
        f.seek((pgno - 1) * page_size)
        f.write(page)
        if commit:
            f.truncate(commit * page_size)


def apply_file(path: str, entry: FileEntry) -> None:
    """Apply a file entry to `path` (which must hold at least `base` bytes)."""
    have = os.path.getsize(path) if os.path.exists(path) else 0
    if have < entry.base:
        raise IntegrityError(f"journal: {entry.name} has {have} bytes, the record continues it at {entry.base}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, entry.base)
        os.pwrite(fd, entry.data, entry.base)
    finally:
        os.close(fd)
