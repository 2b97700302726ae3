"""The recovery area: written data that a stop could not store, kept encrypted for the next mount.

A stop (umount, SIGTERM, SIGINT) stores everything that can be stored. What cannot (the
backend is unreachable, the disk is full, a KMS key is refused) is written here, one file
per inode (`recovery/<inode>.rec` in the store directory, or an S3 store's state
directory), sealed with a key slot of its own, made as an object's would be: under the file's
own encryption (for SSE-C with the key copy its open kept, `crypto.WriteGrant`), or, when a
KMS refuses, under the SSE-S3 master key, which seals the built-in KMS's keystore too. Space
is reserved up front (`recovery/reserve`, as large as the write-back buffer, preallocated),
so that a full disk cannot also take this area: the reserve is given back before records are
written. The next mount stores the records first, before it answers FUSE requests, then
deletes them and makes the reserve again. A record is stored only while the file is as the
stop left it (size and ctime), and only where `allowed` (the S3 store's divergence check)
agrees; otherwise it stays, reported by `s3fuse status`, the log and `s3fuse fsck`.

The record's bytes are specified in docs/FORMAT.md ("Recovery records").
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .crypto import SYSTEM, Caller, KeyManager, WrappedKey, WriteGrant
from .errors import S3fuseError
from .policy import SSE_C, SSE_S3, Policy

log = logging.getLogger(__name__)

MAGIC = b"S3FREC1\n"
RECORD_ID_LEN = 16
# the block number a record's key slot is bound to: no object's block is negative
RECOVERY_BLOCK = -1
NONCE_LEN = 12
SUFFIX = ".rec"
RESERVE = "reserve"
MAX_HEADER = 64 << 10


@dataclass
class Record:
    """A record's clear header (the data stays sealed until `open`)."""

    path: str  # of the record file
    inode: int
    file_path: str
    reason: str
    nbytes: int

    def describe(self) -> dict:
        return {"inode": self.inode, "path": self.file_path, "reason": self.reason, "bytes": self.nbytes}


def seal(record_id: bytes, inode: int, data_key: bytes, wrapped: WrappedKey, clear: dict, body: dict) -> bytes:
    """A record's bytes: MAGIC, u32 header length, msgpack header (clear: where, why, the key
    slot), then the body's msgpack sealed with AES-256-GCM under the data key, with a random
    nonce (each data key seals one record) and MAGIC plus the header as associated data."""
    header = msgpack.packb({"v": 1, "id": record_id, "inode": inode, "mode": wrapped.mode,
                            "key_ref": wrapped.key_ref, "key_version": wrapped.key_version,
                            "key_slot": wrapped.key_slot, **clear})
    nonce = os.urandom(NONCE_LEN)
    prefix = MAGIC + len(header).to_bytes(4, "big") + header
    return prefix + nonce + AESGCM(data_key).encrypt(nonce, msgpack.packb(body), prefix)


def parse_header(blob: bytes, whole: bool = True) -> tuple[dict, int]:
    """-> (header, its end). Raises ValueError for anything that is not a record (`whole`:
    `blob` is the whole record, not just its beginning)."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise ValueError("not a recovery record")
    n = int.from_bytes(blob[len(MAGIC):len(MAGIC) + 4], "big")
    end = len(MAGIC) + 4 + n
    if n > MAX_HEADER or len(blob) < end + (NONCE_LEN + 16 if whole else 0):
        raise ValueError("recovery record cut short")
    header = msgpack.unpackb(blob[len(MAGIC) + 4:end])
    if not isinstance(header, dict) or header.get("v") != 1:
        raise ValueError("unknown recovery record version")
    return header, end


def open_body(data_key: bytes, blob: bytes, end: int) -> dict:
    nonce = blob[end:end + NONCE_LEN]
    return msgpack.unpackb(AESGCM(data_key).decrypt(nonce, blob[end + NONCE_LEN:], blob[:end]),
                           strict_map_key=False)


class RecoveryArea:
    def __init__(self, base_dir: str, keys: KeyManager, reserve_bytes: int,
                 allowed: Callable[[dict], bool] | None = None) -> None:
        self.dir = os.path.join(base_dir, "recovery")
        self.keys = keys
        self.reserve_bytes = reserve_bytes
        # the S3 store's divergence check (S3Mount.recovery_allowed); None: a local store
        self.allowed = allowed
        self.problems: dict[int, str] = {}  # inode -> why its record is not stored yet

    # ------------------------------------------------------------------ the reserve
    def reserve(self) -> None:
        """Make (or complete) the preallocated reserve; a failure is logged, not fatal."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.dir, RESERVE)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < self.reserve_bytes:
                    os.posix_fallocate(fd, 0, self.reserve_bytes)
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("could not reserve %d MiB for the recovery area in %s: %s",
                        self.reserve_bytes >> 20, self.dir, exc)

    def _release_reserve(self) -> None:
        try:
            os.unlink(os.path.join(self.dir, RESERVE))
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ records
    def records(self) -> list[Record]:
        out = []
        try:
            names = sorted(os.listdir(self.dir))
        except (FileNotFoundError, NotADirectoryError):
            return out
        for name in names:
            if not name.endswith(SUFFIX):
                continue
            path = os.path.join(self.dir, name)
            try:
                with open(path, "rb") as f:
                    header, _ = parse_header(f.read(len(MAGIC) + 4 + MAX_HEADER), whole=False)
                out.append(Record(path, int(header["inode"]), str(header.get("path", "?")),
                                  str(header.get("reason", "")), int(header.get("bytes", 0))))
            except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
                out.append(Record(path, -1, "?", f"unreadable record: {exc}", 0))
        return out

    def pending(self) -> list[dict]:
        return [{**r.describe(), "waiting_for": self.problems.get(r.inode, "the next mount")}
                for r in self.records()]

    async def keep(self, *, inode: int, file_path: str, reason: str, policy: Policy, writer: Caller,
                   grant: WriteGrant | None, body: dict) -> str:
        """Seal and write one file's unstored data; -> the record's path. Raises OSError or
        S3fuseError if even that fails."""
        record_id = os.urandom(RECORD_ID_LEN)
        try:
            data_key, wrapped = await self.keys.new_data_key(policy, record_id, inode, RECOVERY_BLOCK,
                                                             writer, file_path, grant)
        except S3fuseError as exc:
            if policy.mode == SSE_C:
                raise  # an SSE-C file's data is never sealed under anything but its own key
            log.warning("inode %d (%s): its KMS key could not seal the recovery record (%s); "
                        "sealed under the master key", inode, file_path, exc)
            data_key, wrapped = await self.keys.new_data_key(Policy(SSE_S3), record_id, inode, RECOVERY_BLOCK, SYSTEM)
        nbytes = (sum(len(b) for _, b in body["blocks"])
                  + sum(len(d) for _, runs in body.get("patches", ()) for _, d in runs))
        blob = seal(record_id, inode, data_key, wrapped,
                    {"path": file_path, "reason": reason, "bytes": nbytes, "uid": writer.uid,
                     "gid": writer.gid}, body)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self._release_reserve()  # the space set aside for this
        path = os.path.join(self.dir, f"{inode}{SUFFIX}")
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return path

    async def open(self, record: Record) -> tuple[dict, dict]:
        """Unwrap and authenticate a record -> (header, body). Raises S3fuseError (a key not
        loaded or refused: ENOKEY and friends; a record that does not authenticate: EIO)."""
        with open(record.path, "rb") as f:
            blob = f.read()
        try:
            header, end = parse_header(blob)
        except (ValueError, msgpack.UnpackException) as exc:
            raise S3fuseError(f"recovery record {record.path}: {exc}", errno.EIO) from None
        wrapped = WrappedKey(header["mode"], header["key_ref"], header["key_version"], header["key_slot"])
        who = Caller(int(header.get("uid", 0)), int(header.get("gid", 0)))
        data_key = await self.keys.open_data_key(header["id"], int(header["inode"]), RECOVERY_BLOCK,
                                                 wrapped, who if wrapped.mode == SSE_C else SYSTEM)
        try:
            body = open_body(data_key, blob, end)
        except Exception:  # noqa: BLE001 - InvalidTag or a malformed body: not authentic
            raise S3fuseError(f"recovery record {record.path} does not authenticate", errno.EIO) from None
        return header, body

    def done(self, record: Record) -> None:
        os.unlink(record.path)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.problems.pop(record.inode, None)

    # ------------------------------------------------------------------ stop and start
    async def keep_unstored(self, data, meta, reason: str) -> list[int]:
        """At a stop: write a record for every file with data the stop could not store.
        -> inodes whose data could not even be kept (the caller marks them damaged)."""
        lost = []
        for fs in data.unstored():
            row = meta.inode(fs.ino)
            if row is None or row.nlink == 0:
                continue  # deleted: its data goes with it
            file_path = data.describe(fs.ino)
            why = fs.failure or reason
            body = {"size": fs.size, "mtime_ns": fs.mtime_ns, "ctime_ns": fs.ctime_ns,
                    "db_size": row.size, "db_ctime_ns": row.ctime_ns,
                    "blocks": [[b, bytes(blk.data)] for b, blk in sorted(fs.blocks.items()) if blk.runs is None],
                    "patches": [[b, [[off, bytes(d)] for off, d in blk.runs.items()]]
                                for b, blk in sorted(fs.blocks.items()) if blk.runs is not None]}
            try:
                path = await self.keep(inode=fs.ino, file_path=file_path, reason=why, policy=fs.policy,
                                       writer=fs.writer, grant=fs.grant, body=body)
            except (OSError, S3fuseError) as exc:
                log.error("inode %d (%s): its unstored data could not be kept in the recovery area "
                          "either (%s); it is lost, and the file is marked damaged", fs.ino, file_path, exc)
                lost.append(fs.ino)
                continue
            log.error("inode %d (%s): %d bytes could not be stored (%s); kept in %s, stored at the "
                      "next mount", fs.ino, file_path, sum(len(b) for _, b in body["blocks"]), why, path)
        return lost

    async def restore(self, data, meta) -> int:
        """Store what earlier stops kept (at mount, before FUSE requests, and again when a
        key is added). -> records still waiting."""
        waiting = 0
        for record in self.records():
            try:
                await self._restore_one(record, data, meta)
            except S3fuseError as exc:
                waiting += 1
                why = str(exc)
                if self.problems.get(record.inode) != why:
                    log.error("recovery record of inode %d (%s) is not stored yet: %s", record.inode,
                              record.file_path, why)
                self.problems[record.inode] = why
        self.reserve()
        return waiting

    async def _restore_one(self, record: Record, data, meta) -> None:
        header, body = await self.open(record)
        ino = int(header["inode"])
        row = meta.inode(ino)
        if row is None or row.nlink == 0:
            log.warning("recovery record of inode %d (%s): the file is gone; record dropped", ino, record.file_path)
            self.done(record)
            return
        entry = {"inode": ino, "path": record.file_path, "db_size": body["db_size"],
                 "db_ctime_ns": body["db_ctime_ns"]}
        if (row.size, row.ctime_ns) != (body["db_size"], body["db_ctime_ns"]):
            raise S3fuseError("the file changed after the stop that kept this data; not stored over it "
                              f"(the record stays in {record.path})", errno.ESTALE)
        if self.allowed is not None and not self.allowed(entry):
            raise S3fuseError("the store's metadata came from the bucket at this mount: the record may be "
                              f"older than writes of another host (it stays in {record.path})", errno.ESTALE)
        policy = Policy.decode(row.sse)
        grant = None
        if header["mode"] == SSE_C and policy is not None and policy.mode == SSE_C:
            key = self.keys.customer.for_object(int(header.get("uid", 0)), header["key_ref"])
            if key is not None:
                grant = WriteGrant(policy, bytearray(key.material), key.fingerprint)
        await data.restore(ino, body, Caller(int(header.get("uid", 0)), int(header.get("gid", 0))), grant)
        self.done(record)
        log.info("stored the data of inode %d (%s) that a stop had kept in the recovery area", ino,
                 record.file_path)
