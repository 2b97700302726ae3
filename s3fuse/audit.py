"""The audit trail: one hash-chained JSON line per use or administration of a key.

Every use of a KMS key (data-key generation and decryption), every KMS
administration action, every SSE-C key load and removal and every master-key
rotation appends one record to the store's audit log. A record is one line of ASCII
JSON whose members come in this order::

    seq      1, 2, 3, ... (the record's line number in an intact log)
    time     UTC, RFC 3339 with microseconds: "2026-11-27T22:50:01.123456Z"
    op       what was done, as SERVICE:Action (OPS lists them): "kms:Decrypt",
             "ssec:AddKey", "sse-s3:RotateMasterKey", "s3:CreateAccessKey", ...
    ...      the caller's fields, known ones first in FIELD_ORDER (key_id,
             key_version, alias, key_name, fingerprint, uid, gid, pid, process,
             path, object_id, errno), then any others in the order given; None
             values omitted
    outcome  "allowed" or "denied" (a denied record carries `errno`)
    prev     SHA-256 (hex) of the previous line's bytes without its newline;
             64 zeros for the first record

The hash of the last line is the *head*. Whoever keeps the head somewhere else
(the daemon keeps it with its checkpoints) can later prove with `verify` that the
log was neither edited, nor had records inserted or deleted, nor was cut short.
The chain carries no key: it detects tampering of part of the log, not an
attacker who rewrites everything after the point he edits *and* the kept head.

Records carry identifiers (key ids, versions, fingerprints, object ids), never a
secret: `AuditLog.append` refuses bytes values and field names that suggest key
material, so a careless call site fails in the tests rather than leaking a key.

One daemon writes the log (the store lock guarantees it); readers (`read`,
`follow`, `verify`) may run at any time, since each record is written by a single
`write(2)` on an O_APPEND descriptor and readers only trust complete lines.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from hashlib import sha256
from typing import BinaryIO

from .errors import S3fuseError
from .util import fsync_dir

ZERO_HASH = "0" * 64
ALLOWED = "allowed"
DENIED = "denied"
OUTCOMES = (ALLOWED, DENIED)

# Known fields come in this order whatever the order of the call's keywords, so
# that every record of the log reads the same way; unknown fields follow them.
FIELD_ORDER = (
    "key_id", "key_version", "alias", "key_name", "fingerprint",
    "uid", "gid", "pid", "process", "path", "object_id", "errno",
)
# Every op the code writes, SERVICE:Action as AWS CloudTrail names events. `kms:` actions
# take AWS KMS's names where AWS has the operation.
KMS_ACTIONS = {
    "create-key": "CreateKey", "enable": "EnableKey", "disable": "DisableKey",
    "schedule-deletion": "ScheduleKeyDeletion", "cancel-deletion": "CancelKeyDeletion",
    "set-policy": "PutKeyPolicy", "rotate": "RotateKey", "enable-rotation": "EnableKeyRotation",
    "disable-rotation": "DisableKeyRotation", "rewrap": "ReEncrypt",
    "set-min-decryption-version": "SetMinDecryptionVersion", "delete": "DeleteKey",
    # reads that the control socket answers without a record, named for completeness
    "list": "ListKeys", "describe": "DescribeKey", "get-policy": "GetKeyPolicy",
}
OPS = frozenset(
    {f"kms:{a}" for a in KMS_ACTIONS.values()}
    | {"kms:GenerateDataKey", "kms:Decrypt", "ssec:AddKey", "ssec:RemoveKey",
       "sse-s3:RotateMasterKey", "sse-s3:RetireMasterKey", "sse-s3:PauseRewrap",
       "sse-s3:ResumeRewrap", "sse-s3:RewrapDone", "root:RekeyRoot", "root:SealSettings",
       "s3:CreateAccessKey", "s3:DeleteAccessKey", "s3:Presign"})
# Names that earlier versions wrote: readers of old logs map them with `canonical_op`.
LEGACY_OPS = {
    **{f"kms:{old}": f"kms:{new}" for old, new in KMS_ACTIONS.items()},
    "sse-s3:rotate": "sse-s3:RotateMasterKey", "sse-s3:retire": "sse-s3:RetireMasterKey",
    "sse-s3:pause-sweep": "sse-s3:PauseRewrap", "sse-s3:resume-sweep": "sse-s3:ResumeRewrap",
    "sse-s3:rewrap-done": "sse-s3:RewrapDone", "root:rekey": "root:RekeyRoot",
}


def kms_op(action: str) -> str:
    """The op of a KMS administration action of the control socket ("create-key", ...)."""
    return f"kms:{KMS_ACTIONS[action]}"


def canonical_op(op: str) -> str:
    """A record's op under today's name (an old log's records carry the old ones)."""
    return LEGACY_OPS.get(op, op)


# The members the log itself writes; a caller may not pass them as fields.
RESERVED = frozenset({"seq", "time", "op", "outcome", "prev"})
# `read --key K` matches a record whose one of these members equals K.
MATCH_FIELDS = ("key_id", "alias", "key_name", "fingerprint")

# Field names that suggest key material. `key_id`, `key_version`, `key_name` and
# `fingerprint` identify a key without revealing it and are allowed.
_SECRET_NAMES = frozenset({"key", "kek", "dek", "key_bytes", "data_key", "secret", "material",
                           "plaintext", "password", "passphrase"})
_SECRET_SUFFIXES = ("_key", "_kek", "_dek", "_bytes")
_SECRET_WORDS = ("secret", "plaintext", "material", "password", "passphrase", "private")

_READ_CHUNK = 64 << 10
DEFAULT_POLL = 0.25


class AuditError(S3fuseError):
    """The audit log cannot be read or written, or a record in it is malformed."""

    errno = errno.EIO


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int  # complete lines read
    first_bad: int | None  # 1-based line number of the first bad record, None if ok
    reason: str  # one line, for `s3fuse audit verify`
    head: str = ZERO_HASH  # SHA-256 hex of the last complete line (ZERO_HASH if none)


def line_hash(line: bytes) -> str:
    """The chain hash of one record line (without its newline)."""
    return sha256(line).hexdigest()


def rfc3339(ns: int) -> str:
    sec, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{rest // 1000:06d}Z"


def process_name(pid: int) -> str | None:
    """The command name of `pid` (/proc/PID/comm), or None if it is gone or unknown."""
    if pid <= 0:  # FUSE reports pid 0 for requests the kernel makes on its own
        return None
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # comm is at most 15 arbitrary bytes; "replace" keeps the record valid UTF-8.
    return raw.rstrip(b"\n").decode("utf-8", "replace")


def caller(uid: int, gid: int, pid: int) -> dict:
    """The caller fields of a record (uid, gid, pid, process), e.g. from a FUSE request context.

    Read the process name now: by the time anyone looks at the log the process
    may be gone, or its pid reused.
    """
    return {"uid": uid, "gid": gid, "pid": pid, "process": process_name(pid)}


def _check_field(name: str, value: object) -> None:
    lowered = name.lower()
    if (lowered in _SECRET_NAMES or lowered.endswith(_SECRET_SUFFIXES)
            or any(word in lowered for word in _SECRET_WORDS)):
        raise ValueError(f"audit field {name!r} looks like key material: records carry "
                         "identifiers (key_id, key_version, fingerprint), never secrets")
    if name in RESERVED:
        raise ValueError(f"audit field {name!r} is written by the log itself")
    _check_value(name, value)


def _check_value(name: str, value: object) -> None:
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"audit field {name!r} is bytes: records carry identifiers, never "
                         "secrets (pass a fingerprint or id as str; a path through os.fsdecode)")
    if isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, (list, tuple)):
                raise ValueError(f"audit field {name!r} nests lists")
            _check_value(name, item)
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"audit field {name!r} is not a finite number")
    # No dicts: a nested object could hide a secret under a name this guard never sees.
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"audit field {name!r} has type {type(value).__name__}; "
                         "use str, int, float, bool or a list of them")


def _encode(record: dict) -> bytes:
    # ensure_ascii: every line is pure ASCII, and a newline or any control or
    # non-ASCII character in a path or process name is escaped, so one record is
    # always exactly one line.
    text = json.dumps(record, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text.encode("ascii")


class AuditLog:
    """The append side of the audit trail: open with `AuditLog.open(path)`."""

    def __init__(self, path: str, fd: int, seq: int, head: str,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.path = path
        self._fd = fd
        self._seq = seq
        self._head = head
        self._clock = clock
        # FUSE handlers may run in worker threads: seq, head and the write must
        # advance together.
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str, *, repair: bool = False,
             clock: Callable[[], int] = time.time_ns) -> AuditLog:
        """Create the log (mode 0600; its directory 0700 if created) or open it and
        recover the chain head and sequence number from its last record.

        The rest of the log is not read: proving it intact is `verify`'s job. A
        log that ends in a partial line (a power loss cut a write short, or someone
        edited the file) is refused, so the next record is never glued to it,
        unless `repair` is set: then that partial line, which can hold no complete
        record, is cut off.
        """
        path = os.path.abspath(path)
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            try:
                os.makedirs(parent, mode=0o700)
                os.chmod(parent, 0o700)  # makedirs' mode is filtered by the umask
            except FileExistsError:
                pass
            except OSError as exc:
                raise AuditError(f"cannot create {parent} for the audit log: {exc.strerror}",
                                 exc.errno) from None
        flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                fd = os.open(path, flags)
            else:
                os.fchmod(fd, 0o600)  # whatever the umask
                fsync_dir(parent)  # the new name outlives a crash
        except OSError as exc:
            raise AuditError(f"cannot open the audit log {path}: {exc.strerror}",
                             exc.errno) from None
        try:
            seq, head = _recover(fd, path, repair)
        except OSError as exc:
            os.close(fd)
            raise AuditError(f"cannot read the audit log {path}: {exc.strerror}",
                             exc.errno) from None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, seq, head, clock)

    @property
    def head(self) -> str:
        """SHA-256 hex of the last record's line (ZERO_HASH while the log is empty)."""
        return self._head

    @property
    def seq(self) -> int:
        """The last record's sequence number (0 while the log is empty)."""
        return self._seq

    def append(self, op: str, outcome: str = ALLOWED, **fields: object) -> dict:
        """Write one record and return it (as written, with seq, time and prev).

        Raises ValueError for a field that could carry a secret (bytes, or a name
        such as `key` or `plaintext`), a field the log writes itself, an unknown
        outcome, or a denial without an errno; AuditError if the write fails, in
        which case the log is left as it was and the chain does not advance.
        """
        if not isinstance(op, str) or not op:
            raise ValueError("audit op must be a non-empty string")
        if outcome not in OUTCOMES:
            raise ValueError(f"audit outcome must be one of {OUTCOMES}, not {outcome!r}")
        given = {name: value for name, value in fields.items() if value is not None}
        for name, value in given.items():
            _check_field(name, value)
        if outcome == DENIED and not isinstance(given.get("errno"), int):
            raise ValueError("a denied audit record must carry the errno")
        ordered = {name: given.pop(name) for name in FIELD_ORDER if name in given}
        ordered.update(given)
        with self._lock:
            if self._fd < 0:
                raise AuditError(f"the audit log {self.path} is closed", errno.EBADF)
            record = {"seq": self._seq + 1, "time": rfc3339(self._clock()), "op": op,
                      **ordered, "outcome": outcome, "prev": self._head}
            line = _encode(record)
            self._write(line + b"\n")
            self._seq += 1
            self._head = line_hash(line)
        return record

    def _write(self, data: bytes) -> None:
        # One write(2) on an O_APPEND descriptor: the record lands whole at the
        # end of the file, never interleaved with another. No fsync here: the
        # daemon calls sync() at its checkpoints and when it stops.
        try:
            n = os.write(self._fd, data)
        except OSError as exc:
            raise AuditError(f"cannot append to the audit log {self.path}: {exc.strerror}",
                             exc.errno) from None
        if n == len(data):
            return
        # A short write (the disk filled up): cut the partial record off again,
        # or the next one would be glued to it and the chain broken for good.
        try:
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - n)
        except OSError as exc:
            os.close(self._fd)
            self._fd = -1
            raise AuditError(f"the audit log {self.path} ends in a partial record that cannot be "
                             f"removed ({exc.strerror}); closed it", errno.EIO) from None
        raise AuditError(f"cannot append to the audit log {self.path}: short write "
                         f"({n} of {len(data)} bytes)", errno.ENOSPC)

    def sync(self) -> None:
        """Make every record appended so far durable."""
        with self._lock:
            if self._fd >= 0:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    raise AuditError(f"cannot sync the audit log {self.path}: {exc.strerror}",
                                     exc.errno) from None

    def close(self) -> None:
        """Sync and close; further appends raise AuditError. Closing twice is harmless."""
        self.sync()
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _line_start(fd: int, end: int) -> int:
    """Offset just past the last newline before `end` (0 if none): where that line starts."""
    pos = end
    while pos > 0:
        step = min(4096, pos)
        i = os.pread(fd, step, pos - step).rfind(b"\n")
        if i >= 0:
            return pos - step + i + 1
        pos -= step
    return 0


def _recover(fd: int, path: str, repair: bool) -> tuple[int, str]:
    """(seq, head) of the log's last record, reading only the end of the file."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0, ZERO_HASH
    if os.pread(fd, 1, size - 1) != b"\n":
        if not repair:
            raise AuditError(f"the audit log {path} ends in a partial record (a write was cut "
                             "short, or the file was edited); `s3fuse audit verify` shows where",
                             errno.EIO)
        os.ftruncate(fd, _line_start(fd, size))
        os.fsync(fd)
        return _recover(fd, path, repair=False)
    start = _line_start(fd, size - 1)
    last = os.pread(fd, size - 1 - start, start)
    record = _parse(last)
    if record is None:
        raise AuditError(f"the last record of the audit log {path} is malformed; "
                         "`s3fuse audit verify` shows where", errno.EIO)
    return record["seq"], line_hash(last)


def _parse(line: bytes) -> dict | None:
    """The record a line holds, or None if it is not a well-formed record."""
    try:
        record = json.loads(line)
    except ValueError:  # includes UnicodeDecodeError
        return None
    if not isinstance(record, dict):
        return None
    seq, prev = record.get("seq"), record.get("prev")
    if (type(seq) is not int or seq < 1 or not isinstance(prev, str) or len(prev) != 64
            or not isinstance(record.get("op"), str) or not isinstance(record.get("time"), str)
            or record.get("outcome") not in OUTCOMES):
        return None
    return record


class KeyFilter:
    """The records `--key K` selects: those whose key_id, alias, key_name or fingerprint
    equals K. For an alias K, also those of every key id a record shows carrying K (the
    key's creation and administration through the alias name both), and of `ids` (the
    key the alias names now): records of a key's use name only its id. An alias thus
    matches every key it named at any time, not only the one it names now."""

    def __init__(self, key: str, ids: tuple[str, ...] = ()) -> None:
        self.names = {key, *ids}
        self.alias = key if key.startswith("alias/") else None

    def learn(self, record: dict) -> None:
        if self.alias is not None and record.get("alias") == self.alias:
            key_id = record.get("key_id")
            if isinstance(key_id, str):
                self.names.add(key_id)

    def __call__(self, record: dict) -> bool:
        self.learn(record)
        return any(record.get(name) in self.names for name in MATCH_FIELDS)


def _filter(path: str, key: "str | KeyFilter | None") -> "KeyFilter | None":
    """A filter for `key`; for an alias, one that knows every key id the log shows
    carrying it, so records written before the first such record match too."""
    if key is None:
        return None
    matcher = key if isinstance(key, KeyFilter) else KeyFilter(key)
    if matcher.alias is not None:
        for record in read(path):
            matcher.learn(record)
    return matcher


def _matches(record: dict, key: "KeyFilter | None") -> bool:
    return key is None or key(record)


def _open_for_reading(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {path}: {exc.strerror}", exc.errno) from None


def read(path: str, key: "str | KeyFilter | None" = None) -> Iterator[dict]:
    """The records of the log, in order; with `key`, only those `KeyFilter` selects.

    A trailing partial line is skipped (it may be a record being written); any
    other malformed line raises AuditError. This does not check the chain: see
    `verify`.
    """
    key = _filter(path, key)
    with _open_for_reading(path) as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                return
            record = _parse(raw[:-1])
            if record is None:
                raise AuditError(f"line {number} of the audit log {path} is not an audit record; "
                                 "`s3fuse audit verify` checks the whole log", errno.EIO)
            if _matches(record, key):
                yield record


def follow(path: str, key: "str | KeyFilter | None" = None, poll: float = DEFAULT_POLL, *,
           existing: bool = True, sleep: Callable[[float], None] = time.sleep) -> Iterator[dict]:
    """Yield the log's records as they are appended, like `tail -f`, until KeyboardInterrupt.

    With `existing` (the default) the records already in the log come first; without,
    only those appended from now on. `key` filters as in `read`.

    The file is polled: read to its end, sleep `poll` seconds, read again. That is
    what `s3fuse audit --follow` needs (a person watching a terminal), costs one
    read and one stat a poll, and needs no inotify. Only complete lines are
    yielded: a reader can catch a record half written, and keeps that half until
    the rest arrives. A KeyboardInterrupt during the sleep ends the generator
    quietly; a log that shrinks or is replaced while followed raises AuditError,
    since the daemon only ever appends.
    """
    key = _filter(path, key)
    with _open_for_reading(path) as f:
        ino = os.fstat(f.fileno()).st_ino
        pending = b""
        number = 0
        if not existing:
            number = None  # line numbers are unknown from here
            end = f.seek(0, os.SEEK_END)
            if end and os.pread(f.fileno(), 1, end - 1) != b"\n":
                # A record is being written right now: start with it, whole.
                f.seek(_line_start(f.fileno(), end), os.SEEK_SET)
        try:
            while True:
                data = f.read(_READ_CHUNK)
                if data:
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        if number is not None:
                            number += 1
                        record = _parse(line)
                        if record is None:
                            where = f"line {number}" if number is not None else "a line"
                            raise AuditError(f"{where} of the audit log {path} is not an "
                                             "audit record", errno.EIO)
                        if _matches(record, key):
                            yield record
                    continue
                try:
                    st = os.stat(path)
                except OSError as exc:
                    raise AuditError(f"the audit log {path} went away while followed: "
                                     f"{exc.strerror}", exc.errno) from None
                if st.st_ino != ino or st.st_size < f.tell():
                    raise AuditError(f"the audit log {path} was truncated or replaced while "
                                     "followed", errno.EIO)
                sleep(poll)
        except KeyboardInterrupt:
            return


class _Line:
    """One complete line of the log as `verify` sees it."""

    __slots__ = ("raw", "hash", "record")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.hash = line_hash(raw)
        self.record = _parse(raw)

    @property
    def seq(self) -> int | None:
        return self.record["seq"] if self.record else None

    @property
    def prev(self) -> str | None:
        return self.record["prev"] if self.record else None


def verify(path: str, expected_head: str | None = None,
           expected_seq: int | None = None) -> VerifyResult:
    """Check the whole chain and say where the first tampering is.

    In an intact log line i holds seq i and the hash of line i-1 (64 zeros for
    line 1). The first line that breaks this (line j) is classified by looking
    one line behind and one ahead, each pattern being what a single tampering
    leaves:

    * inserted line j: line j+1 holds seq j and chains to line j-1, i.e. it is
      the genuine record j (and the intruder may be garbage, a copy or a fake);
    * inserted line j-1: line j holds seq j-1 and chains to line j-2 (a fake
      that imitated record j-1's seq and prev perfectly);
    * deleted record(s) before line j: line j's seq jumps ahead and its prev is
      not the hash of line j-1;
    * edited line j: it is not a record, or its seq is wrong while it still
      chains, or its prev is wrong (then line j+1 does not chain to it either);
    * edited line j-1: its hash changed, so line j's prev does not match, but
      line j itself is intact (line j+1 chains to it).

    An edit of the last line, a deleted tail or records appended after the fact
    leave the chain itself intact; only the head kept elsewhere reveals them.
    With `expected_head` the log must end at that hash; with `expected_seq`
    (the kept sequence number) too, a cut tail is told apart from an edited last
    record. Records after the kept head are reported as inserted after it
    (first_bad = expected_seq + 1): after a crash they may instead be genuine
    records written since the head was last kept, which only the caller can know.
    The log is read once, keeping three lines in memory.
    """
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {path}: {exc.strerror}", exc.errno) from None
    if expected_head is not None:
        expected_head = expected_head.lower()
    with f:
        return _verify(iter(f), expected_head, expected_seq)


def _verify(raw_lines: Iterator[bytes], expected_head: str | None,
            expected_seq: int | None) -> VerifyResult:
    before: list[_Line | None] = [None, None]  # lines j-2 and j-1
    head_at: int | None = None  # line whose hash is expected_head
    partial = False
    n = 0
    line: _Line | None = None
    for raw in raw_lines:
        if not raw.endswith(b"\n"):
            partial = True
            break
        line = _Line(raw[:-1])
        n += 1
        prev_hash = before[1].hash if before[1] else ZERO_HASH
        if line.seq != n or line.prev != prev_hash:
            ahead = next(raw_lines, None)
            after = _Line(ahead[:-1]) if ahead is not None and ahead.endswith(b"\n") else None
            first_bad, reason = _classify(n, before[0], before[1], line, after, expected_head)
            # Read on, so that `records` and `head` describe the whole log.
            last, total = line.raw, n
            for raw in itertools.chain([ahead] if ahead is not None else [], raw_lines):
                if raw.endswith(b"\n"):
                    last, total = raw[:-1], total + 1
            return VerifyResult(False, total, first_bad, reason, line_hash(last))
        if line.hash == expected_head:
            head_at = n
        before = [before[1], line]
    head = line.hash if line else ZERO_HASH
    if partial:
        return VerifyResult(False, n, n + 1, f"line {n + 1} is a partial record (no newline ends "
                            "it): a write was cut short, or the log was edited", head)
    if expected_seq is not None and head_at is not None and head_at != expected_seq:
        return VerifyResult(False, n, min(head_at, expected_seq),
                            f"the expected head is record {head_at}'s hash but the expected "
                            f"seq is {expected_seq}", head)
    if expected_head is not None and head != expected_head:
        if head_at is not None:
            return VerifyResult(False, n, head_at + 1,
                                f"{_records(head_at + 1, n)} inserted after the expected head "
                                f"(record {head_at})", head)
        if expected_seq is None:
            return VerifyResult(False, n, n + 1,
                                f"the log does not end at the expected head: records after record "
                                f"{n} were deleted, or record {n} was edited", head)
        if n < expected_seq:
            return VerifyResult(False, n, n + 1, f"{_records(n + 1, expected_seq)} deleted "
                                "(the log was cut short)", head)
        if n == expected_seq:
            return VerifyResult(False, n, n, f"record {n} was edited (its hash is not the "
                                "expected head)", head)
        return VerifyResult(False, n, expected_seq,
                            f"record {expected_seq} is not the expected head: the log was "
                            f"rewritten from record {expected_seq} or before", head)
    if expected_seq is not None and n != expected_seq:
        if n < expected_seq:
            return VerifyResult(False, n, n + 1, f"{_records(n + 1, expected_seq)} deleted "
                                "(the log was cut short)", head)
        return VerifyResult(False, n, expected_seq + 1,
                            f"{_records(expected_seq + 1, n)} inserted after the expected "
                            f"end (record {expected_seq})", head)
    at = " and ends at the expected head" if expected_head is not None else ""
    return VerifyResult(True, n, None, f"{n} records, chain intact{at}", head)


def _records(first: int, last: int) -> str:
    return f"record {first} was" if first == last else f"records {first}-{last} were"


def _classify(j: int, back2: _Line | None, back1: _Line | None, line: _Line, after: _Line | None,
              expected_head: str | None) -> tuple[int, str]:
    """(first bad line, reason) when line j is the first that breaks the chain."""
    h2 = back2.hash if back2 else ZERO_HASH  # hash of line j-2 (zeros before line 1)
    h1 = back1.hash if back1 else ZERO_HASH  # hash of line j-1
    if after is not None and after.seq == j and after.prev == h1:
        if line.raw == (back1.raw if back1 else None):
            return j, f"line {j} was inserted (a copy of record {j - 1})"
        return j, f"line {j} was inserted (line {j + 1} is record {j} and follows record {j - 1})"
    if after is None and expected_head is not None and j > 1 and h1 == expected_head:
        return j, f"line {j} was inserted after the expected head (record {j - 1})"
    if j > 1 and line.seq == j - 1 and line.prev == h2:
        if back1 is not None and line.raw == back1.raw:
            return j, f"line {j} was inserted (a copy of record {j - 1})"
        return j - 1, (f"line {j - 1} was inserted (line {j} is record {j - 1} and follows "
                       f"record {j - 2})")
    if line.record is None:
        return j, f"record {j} was edited (line {j} is not a well-formed audit record)"
    seq = line.seq
    assert seq is not None
    if seq > j and line.prev != h1:
        return j, f"{_records(j, seq - 1)} deleted (line {j} holds record {seq})"
    if seq != j:
        return j, f"record {j} was edited (its seq is {seq})"
    # Line j's seq is right but its prev is not the hash of line j-1: either line
    # j-1 changed (its hash did) or line j's prev did (and with it line j's hash).
    if j == 1:
        return 1, "record 1 was edited (its prev is not 64 zeros)"
    if after is not None:
        if after.prev != line.hash:
            return j, f"record {j} was edited (its prev no longer matches record {j - 1}'s hash)"
        return j - 1, f"record {j - 1} was edited (its hash no longer matches record {j}'s prev)"
    if expected_head is not None:
        if line.hash != expected_head:
            return j, f"record {j} was edited (its prev no longer matches record {j - 1}'s hash)"
        return j - 1, f"record {j - 1} was edited (its hash no longer matches record {j}'s prev)"
    return j - 1, (f"record {j - 1} was edited (its hash no longer matches record {j}'s prev), "
                   f"or record {j}'s prev was")
