"""The metadata journal of an S3 store in the bucket: shipping and replay (docs/S3.md, "Metadata journal").

Records (journal.py) go to PREFIX/journal/<epoch>/<seq>, epoch being the snapshot they
follow. What has been shipped is kept in the state directory's journal.json: the bucket's
head this machine knows (epoch, seq, and the link the next record must carry), where
shipping stands in the local WAL, and the shipped state of the other files. The methods
here block (S3 requests, file I/O): the daemon runs them in worker threads, one at a time.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field

from . import journal
from .backends.s3 import S3Client
from .errors import IntegrityError, StoreError
from .util import atomic_write

log = logging.getLogger(__name__)

STATE_FILE = "journal.json"
# the local WAL is checkpointed (and emptied) once this many shipped frames are in it
CHECKPOINT_FRAMES = 8192


def record_key(s3: S3Client, epoch: int, seq: int) -> str:
    return s3.loc.key(f"journal/{epoch:020d}/{seq:020d}")


def list_records(s3: S3Client, epoch: int | None = None) -> list[tuple[int, int]]:
    """(epoch, seq) of the records in the bucket (of one epoch, or all), in order."""
    prefix = s3.loc.key("journal/" + (f"{epoch:020d}/" if epoch is not None else ""))
    base = s3.loc.key("journal/")
    out = []
    for key, _ in s3.list_all(prefix):
        parts = key[len(base):].split("/")
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            out.append((int(parts[0]), int(parts[1])))
    return sorted(out)


def bucket_head(s3: S3Client, newest_snapshot: int) -> tuple[int, int]:
    """(epoch, seq) of the bucket's newest state: its newest snapshot and the records after
    it, which must be 1..n without a gap (a missing record is refused, not skipped)."""
    seqs = [q for _, q in list_records(s3, newest_snapshot)]
    for want, got in enumerate(seqs, 1):
        if got != want:
            raise StoreError(f"the metadata journal in {s3.loc.url} after snapshot {newest_snapshot} has a gap: "
                             f"record {want} is missing (deleted or tampered with?); refusing to mount",
                             errno.EIO)
    return newest_snapshot, len(seqs)


@dataclass
class JournalState:
    epoch: int = 0
    seq: int = 0
    prev: bytes = b""
    wal: journal.WalPosition = field(default_factory=journal.WalPosition)
    files: dict = field(default_factory=dict)  # sealed file name -> [size, mtime_ns] as shipped
    audit_len: int = 0
    unshipped: bool = False  # the database changed in a way the WAL no longer shows (see finish)

    @property
    def head(self) -> tuple[int, int]:
        return self.epoch, self.seq

    @classmethod
    def load(cls, state_dir: str) -> "JournalState | None":
        try:
            with open(os.path.join(state_dir, STATE_FILE)) as f:
                d = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {os.path.join(state_dir, STATE_FILE)}: {exc}") from None
        return cls(int(d["epoch"]), int(d["seq"]), bytes.fromhex(d["prev"]),
                   journal.WalPosition.from_json(d["wal"]), d.get("files", {}), int(d.get("audit_len", 0)),
                   bool(d.get("unshipped", False)))

    def save(self, state_dir: str) -> None:
        d = {"format": 1, "epoch": self.epoch, "seq": self.seq, "prev": self.prev.hex(),
             "wal": self.wal.to_json(), "files": self.files, "audit_len": self.audit_len,
             "unshipped": self.unshipped}
        atomic_write(os.path.join(state_dir, STATE_FILE), (json.dumps(d) + "\n").encode())


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns]


class Journal:
    """Ships the local state's changes as records, and replays snapshot + records."""

    def __init__(self, cfg, s3: S3Client, root_key: bytes, snapshots, allowed) -> None:
        self.cfg, self.s3, self.snapshots = cfg, s3, snapshots
        self.key = journal.journal_key(root_key, cfg.store_id)
        self.allowed = allowed  # which file names a record may carry
        self.state = JournalState.load(cfg.path)
        self.wal_path = cfg.meta_path + "-wal"
        self.records = 0  # shipped by this mount
        self.compactions = 0

    # -- what the local state holds that the bucket lacks ------------------------------

    def _sealed_paths(self) -> list[str]:
        return [self.cfg.keyring_path, self.cfg.kms_path, self.cfg.sealed_path("s3keys")]

    def _audit_path(self) -> str:
        return os.path.join(self.cfg.path, "audit.log")

    def _read_wal(self, off: int, size: int) -> bytes:
        with self._wal_reader() as read:
            return read(off, size)

    @contextlib.contextmanager
    def _wal_reader(self):
        """`read(offset, size)` over the WAL file, open for one scan (b"" if there is none)."""
        try:
            fd = os.open(self.wal_path, os.O_RDONLY)
        except FileNotFoundError:
            yield lambda off, size: b""
            return
        try:
            yield lambda off, size: os.pread(fd, size, off)
        finally:
            os.close(fd)

    def _file_entries(self) -> tuple[list[journal.FileEntry], dict, int]:
        st = self.state
        entries, files = [], dict(st.files)
        for p in self._sealed_paths():
            name, now = os.path.basename(p), _stat(p)
            if now is not None and now != st.files.get(name):
                with open(p, "rb") as f:
                    entries.append(journal.FileEntry(name, 0, f.read()))
                files[name] = now
        audit_len = st.audit_len
        now = _stat(self._audit_path())
        if now is not None and now[0] != st.audit_len:
            base = st.audit_len if now[0] > st.audit_len else 0
            with open(self._audit_path(), "rb") as f:
                f.seek(base)
                data = f.read(now[0] - base)
            entries.append(journal.FileEntry("audit.log", base, data))
            audit_len = base + len(data)
        return entries, files, audit_len

    def local_changes(self) -> str | None:
        """Why the local state differs from what was shipped (None: it does not). Blocking."""
        st = self.state
        if st is None:
            return None
        if st.unshipped:
            return "changes made while the bucket could not be written"
        with self._wal_reader() as read:
            scan = journal.scan_wal(read, st.wal)
        if scan.reset:
            return "a database checkpointed without its changes shipped"
        if scan.frames:
            return f"{len(scan.frames)} unshipped database page(s)"
        files, _, _ = self._file_entries()
        if files:
            return "unshipped " + ", ".join(f.name for f in files)
        return None

    # -- shipping ----------------------------------------------------------------------

    def ship(self, wal_size: int | None = None) -> int:
        """Ship every committed change as records (a snapshot instead when the WAL no longer
        holds them). Returns the number of records written. Blocking. `wal_size`: the WAL's
        size seen on the daemon's own connection between transactions (journal.scan_wal's
        `written`)."""
        st = self.state
        if st is None or st.unshipped:
            self.compact()
            return 0
        written = 0
        while True:
            with self._wal_reader() as read:
                scan = journal.scan_wal(read, st.wal, written=wal_size)
            if scan.reset:
                log.info("the local WAL was checkpointed before its frames were shipped: taking a snapshot")
                self.compact()
                return written
            files, file_state, audit_len = self._file_entries() if not written else ([], st.files, st.audit_len)
            entries = journal.Entries(scan.page_size, journal.checkpoint_frames(scan.frames), files)
            if not entries:
                return written
            seq = st.seq + 1
            blob = journal.seal(self.key, self.cfg.store_id, st.epoch, seq, st.prev, entries)
            if len(blob) > journal.MAX_RECORD:  # one huge transaction: a snapshot holds it instead
                self.compact()
                return written
            self._put(record_key(self.s3, st.epoch, seq), blob)
            st.seq, st.prev, st.wal, st.files, st.audit_len = seq, journal.link(blob), scan.end, file_state, audit_len
            st.save(self.cfg.path)
            written += 1
            self.records += 1

    def _put(self, key: str, blob: bytes) -> None:
        import botocore.exceptions as bex

        from .backends.s3 import client_error

        try:
            self.s3.put(key, bytearray(blob), IfNoneMatch="*")
        except bex.ClientError as exc:
            if client_error(exc)[1] in (409, 412):
                raise StoreError(f"journal record {key} already exists: another daemon writes to "
                                 f"{self.s3.loc.url}", errno.EIO) from None
            raise StoreError(f"S3 PUT {key}: {client_error(exc)[0]}", errno.EIO) from None

    def checkpoint_due(self, wal_size: int) -> bool:
        """True when the WAL holds many frames, all shipped, and nothing after them (the
        size says so: frames are only appended until a checkpoint)."""
        st = self.state
        if st is None or st.wal.salts is None or st.wal.frames < CHECKPOINT_FRAMES:
            return False
        page = int.from_bytes(self._read_wal(8, 4), "big")
        return wal_size == journal.WAL_HEADER.size + st.wal.frames * (journal.FRAME_HEADER.size + page)

    def checkpointed(self) -> None:
        """The WAL was emptied with every frame in it shipped: shipping goes on from the next one."""
        self.state.wal = journal.WalPosition()
        self.state.save(self.cfg.path)

    def compact(self) -> int:
        """Take a snapshot: the journal's next epoch starts at it. Blocking."""
        start = self.state.wal if self.state is not None and not self.state.unshipped else journal.WalPosition()
        with self._wal_reader() as read:
            scan = journal.scan_wal(read, start, max_bytes=1 << 62)
            if scan.reset:
                scan = journal.scan_wal(read, journal.WalPosition(), max_bytes=1 << 62)
        # everything committed up to `scan.end` is in the snapshot (taken after it); the next
        # record starts there, and any overlap with the snapshot replays the same page images
        files = {os.path.basename(p): _stat(p) for p in self._sealed_paths() if _stat(p) is not None}
        audit = _stat(self._audit_path())
        seq = self.snapshots.take()
        st = JournalState(seq, 0, journal.link(self.snapshots.last_header), scan.end, files,
                          audit[0] if audit else 0)
        st.save(self.cfg.path)
        self.state = st
        self.compactions += 1
        for epoch, q in list_records(self.s3):
            if epoch < seq:
                self.s3.delete(record_key(self.s3, epoch, q))
        return seq

    def finish_closed(self, all_shipped: bool) -> None:
        """The database was closed (its WAL checkpointed away): if everything had been shipped,
        shipping goes on from the next WAL; otherwise the next ship must be a snapshot."""
        if self.state is None:
            return
        self.state.wal = journal.WalPosition()
        self.state.unshipped = self.state.unshipped or not all_shipped
        self.state.save(self.cfg.path)

    # -- replay ------------------------------------------------------------------------

    def restore(self, head: tuple[int, int]) -> None:
        """Replace the local state by the bucket's snapshot `head[0]` plus records 1..head[1].
        Everything is fetched, authenticated and replayed in a temporary directory first: a
        refused record changes nothing. Blocking."""
        epoch, n = head
        tmp = os.path.join(self.cfg.path, ".restore")
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp, 0o700)
        try:
            names, header = self.snapshots.restore_into(epoch, tmp)
            prev = journal.link(header)
            names = set(names)
            for seq in range(1, n + 1):
                body, _ = self.s3.get(record_key(self.s3, epoch, seq))
                try:
                    entries = journal.open_record(self.key, self.cfg.store_id, epoch, seq, prev, body, self.allowed)
                except IntegrityError as exc:
                    raise StoreError(f"{exc}; refusing to mount {self.s3.loc.url} (nothing was changed)",
                                     errno.EIO) from None
                prev = journal.link(body)
                if entries.frames:
                    with open(os.path.join(tmp, "meta.db"), "r+b") as f:
                        journal.apply_frames(f, entries.page_size, entries.frames)
                for fe in entries.files:
                    journal.apply_file(os.path.join(tmp, fe.name), fe)
                    names.add(fe.name)
            for name in names:
                fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for suffix in ("-wal", "-shm"):
                if os.path.exists(self.cfg.meta_path + suffix):
                    os.unlink(self.cfg.meta_path + suffix)
            for name in names:
                os.replace(os.path.join(tmp, name), os.path.join(self.cfg.path, name))
            self.snapshots.adopt(sorted(names), epoch)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        files = {os.path.basename(p): _stat(p) for p in self._sealed_paths() if _stat(p) is not None}
        audit = _stat(self._audit_path())
        self.state = JournalState(epoch, n, prev, journal.WalPosition(), files, audit[0] if audit else 0)
        self.state.save(self.cfg.path)

    def keep_aside(self) -> str:
        """Move this machine's diverged state into diverged-<time>/ of the state directory
        (a state directory of its own, for inspection); returns its path."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = os.path.join(self.cfg.path, f"diverged-{stamp}")
        os.mkdir(aside, 0o700)
        for name in sorted(os.listdir(self.cfg.path)):
            src = os.path.join(self.cfg.path, name)
            if name.startswith("meta.db") or name in (STATE_FILE, "snapshot.seq"):
                os.rename(src, os.path.join(aside, name))
            elif os.path.isfile(src) and (self.allowed(name) or name == "store.json"):
                shutil.copy2(src, os.path.join(aside, name))
        self.state = None
        return aside


def diverged_paths(copy: str) -> list[tuple[str, bytes, str]]:
    """What the kept copy `copy` (STATE_DIR/diverged-TIME) holds that the state directory's
    current metadata lacks or holds otherwise: (mark, path, what), mark + (only in the copy),
    ~ (different in the copy), - (not in the copy)."""
    from .metaquery import path_listing

    kept = path_listing(os.path.join(copy, "meta.db"))
    current = path_listing(os.path.join(os.path.dirname(copy.rstrip("/")), "meta.db"))
    out = []
    for path in sorted(set(kept) | set(current)):
        a, b = kept.get(path), current.get(path)
        if b is None:
            out.append(("+", path, f"only in the copy ({a[1]} bytes)"))
        elif a is None:
            out.append(("-", path, "not in the copy"))
        elif a != b:
            out.append(("~", path, f"differs: {a[1]} bytes in the copy, {b[1]} now"))
    return out


def check_bucket(cfg, s3: S3Client, root_key: bytes, snapshots, allowed) -> list[tuple[str, str]]:
    """fsck: authenticate the bucket's newest snapshot and every record after it, as a mount
    would replay them, and compare the head with this machine's; (kind, text) per problem.
    Blocking; changes nothing but a temporary directory."""
    from .s3store import list_snapshots

    snaps = list_snapshots(s3)
    if not snaps:
        return [("journal", f"{s3.loc.url} holds no metadata snapshot")]
    try:
        head = bucket_head(s3, snaps[-1])
    except StoreError as exc:
        return [("journal", str(exc))]
    problems = []
    j = Journal(cfg, s3, root_key, snapshots, allowed)
    local = j.state
    if local is not None and head < local.head:
        problems.append(("journal", f"the bucket's head is snapshot {head[0]} record {head[1]}, older than "
                                    f"snapshot {local.epoch} record {local.seq} this machine has seen "
                                    "(rolled back or deleted?)"))
    tmp = os.path.join(cfg.path, ".fsck-journal")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp, 0o700)
    try:
        _, header = snapshots.restore_into(head[0], tmp)
        prev = journal.link(header)
        for seq in range(1, head[1] + 1):
            body, _ = s3.get(record_key(s3, head[0], seq))
            journal.open_record(j.key, cfg.store_id, head[0], seq, prev, body, allowed)
            prev = journal.link(body)
    except IntegrityError as exc:
        problems.append(("journal", str(exc)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return problems
