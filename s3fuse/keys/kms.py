"""The built-in KMS: named keys with versions, states, policies and rotation, modelled on AWS KMS.

SSE-KMS objects are encrypted under a per-object data key; this module mints
those data keys and wraps them under a named, versioned *backing key*. The
filesystem talks to it only through `KmsProvider`, so an external KMS (Vault or
OpenBao Transit, KMIP) can replace `BuiltinKms` without touching its callers.
The module is pure and synchronous: its only I/O is loading and saving its own
sealed keystore file. It is not thread-safe; the caller serialises calls.

Keystore file, version 2 (sealed by the store's 32-byte root key, like the SSE-S3 keyring):
a header and a log of records, so a change appends one record instead of resealing every key::

    "S3KM" | u8 version (2) | file id (16 random bytes, new at each full rewrite)
    record* = u32be len | nonce (12) | AES-256-GCM(root key, nonce, msgpack body, AAD)
    AAD = "s3fuse/v2/kms" | store_id | file id | u64be record number (0, 1, 2, ...)

    record 0:   {"keys": {key_id: record}}          every key
    record n>0: {"put": {key_id: record}, "del": [key_id]}   the keys one change touched

The file id and the record number in the AAD keep records in their file and their place: none
can be moved, dropped from the middle or taken from another copy of the file. A trailing
record cut short by a crash is ignored (its change never returned) and cut off at the next
append. When the log holds many more records than keys, the file is rewritten (atomically)
as one record 0. Version 1 files (``"S3KM" | u8 1 | nonce | AES-256-GCM(root key, nonce,
{"keys": ...}, "s3fuse/v1/kms" | store_id)``) still load; the first change rewrites them as
version 2. Key records::

    record = {
        "alias":         str | None,     # "alias/..."; unique
        "description":   str,
        "created":       int,            # unix seconds
        "state":         "Enabled" | "Disabled" | "PendingDeletion",
        "deletion_date": int | None,     # unix seconds; set only in PendingDeletion
        "policy":        {"encrypt" | "decrypt" | "admin": {"uids": [int | "*"], "gids": [int]}},
        "versions":      {int: bin32},   # backing-key material by version, 1 at creation
        "current":       int,            # the version new data keys are wrapped under
        "rotation":      {"enabled": bool, "period_days": int, "next": int | None},
        "managed":       bool,           # the service-managed default key "alias/aws/s3"
        "creator":       int,            # the uid that created it (absent in older records)
    }

Every change is on disk (fsync) before it returns; if the write fails the in-memory
keystore is rolled back, so memory never runs ahead of the disk. Each uid but root may
hold at most `key_quota` keys it created (store.json "kms" "key_quota", default 100;
EDQUOT beyond), so no local user can grow the keystore without bound.

Data-key ciphertext blob (what the filesystem stores next to an object)::

    "KMS1" | u16be len(key_id) | key_id (utf-8) | u32be version | nonce (12)
           | AES-256-GCM(backing key[version], nonce, data key, AAD)
    AAD = "s3fuse/v1/kms-datakey" | canonical(context)

    canonical(context) = msgpack([[k, v] for k, v in sorted(context.items())])

The encryption context is AWS KMS's AAD: the filesystem passes
``{"store": hex, "object": hex}``, so a blob copied to another object or store
does not decrypt. The blob names its key id and version, so decryption needs no
hint and survives rotation (all old versions are kept, as in AWS KMS). Each wrap
uses a random 96-bit nonce; rotate a key well before 2**32 wraps per version.

Key policy (deliberately simpler than IAM JSON)::

    {"encrypt": {"uids": [...], "gids": [...]},   # generate_data_key
     "decrypt": {"uids": [...], "gids": [...]},   # decrypt
     "admin":   {"uids": [...], "gids": [...]}}   # enable, disable, deletion, policy, rotation

A principal matches a section if its uid is listed, if ``"*"`` is listed in
``uids`` (everyone), or if its primary gid or one of its supplementary groups is
in ``gids``. Root (uid 0) matches every section of every policy, like the AWS
account root: root can read the root key and this keystore anyway, so a policy
denying it would be theatre, and it guarantees no key can be locked out for good
(AWS needs a "lockout safety check" for that). A new key's policy names its
creator's uid in all three sections. Anyone may create keys. Reading metadata
(`describe`, `list_keys`, `get_policy`) needs no permission: it never contains
key material.

Key states are not policy: a Disabled or PendingDeletion key refuses
`generate_data_key` and `decrypt` for everyone, root included (EKEYREVOKED);
administration of such keys still works. Transitions AWS refuses with
KMSInvalidStateException (e.g. enabling a key pending deletion without
cancelling) raise EINVAL.

The service-managed key (alias ``alias/aws/s3``, created on first use by
`default_key`) mirrors an AWS managed key: everyone may encrypt and decrypt with
it, it rotates automatically every 365 days, and its lifecycle is fixed - it
cannot be disabled, scheduled for deletion, re-policied or have its rotation
changed, even by root (EPERM). On-demand `rotate` by root is allowed, since it
loses nothing.

Errno map (README.md, "The command line", says what each means to a user):

* unknown key or alias, purged key, missing backing version -> ENOKEY
* key Disabled or PendingDeletion (data-key operations)      -> EKEYREVOKED
* policy denies use, or administration by a non-admin          -> EACCES
* ciphertext or context does not authenticate, malformed blob -> EIO
* bad argument or invalid state transition                     -> EINVAL
* alias already in use                                         -> EEXIST
* operation not allowed on the service-managed key            -> EPERM

Rotation periods: AWS accepts 90..2560 days; this KMS accepts 1..2560 so tests
and small deployments can rotate often. `rotate` (on demand) does not move the
automatic schedule, as in AWS. Key material is never part of any returned dict,
repr or exception message.
"""

from __future__ import annotations

import abc
import copy
import errno
import os
import re
import struct
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import S3fuseError, StoreError
from ..util import atomic_write

if TYPE_CHECKING:
    import trio

KEYSTORE_MAGIC = b"S3KM"
KEYSTORE_VERSION = 2
KEYSTORE_AAD_V1 = b"s3fuse/v1/kms"
KEYSTORE_AAD = b"s3fuse/v2/kms"
_KEYSTORE_PREFIX = struct.Struct(">4sB")
FILE_ID_LEN = 16
_RECORD_LEN = struct.Struct(">I")
MAX_RECORD = 64 << 20
DEFAULT_KEY_QUOTA = 100  # keys one uid (not root) may have created and not yet deleted
COMPACT_RECORDS = 256  # the log is rewritten as one record past this many (or 2 per key)

BLOB_MAGIC = b"KMS1"
DATAKEY_AAD = b"s3fuse/v1/kms-datakey"
NONCE_LEN = 12
TAG_LEN = 16
KEY_LEN = 32

ENABLED = "Enabled"
DISABLED = "Disabled"
PENDING_DELETION = "PendingDeletion"

MANAGED_ALIAS = "alias/aws/s3"
_RESERVED_ALIAS_PREFIX = "alias/aws/"
_ALIAS_RE = re.compile(r"alias/[A-Za-z0-9/_-]+")
MAX_ALIAS_LEN = 256
MAX_DESCRIPTION_LEN = 1024  # AWS allows 8192; with the key quota it bounds the keystore
MAX_POLICY_ENTRIES = 1024  # per uids/gids list: keeps the keystore small

DELETION_DAYS = (7, 30)  # AWS's bounds for the deletion waiting period
ROTATION_DAYS = (1, 2560)  # AWS: 90..2560; relaxed so tests and small setups can rotate often
DEFAULT_ROTATION_DAYS = 365
MANAGED_ROTATION_DAYS = 365
DAY = 86400

POLICY_SECTIONS = ("encrypt", "decrypt", "admin")
_ID_MAX = 2**32 - 1


def _error(message: str, err: int) -> S3fuseError:
    return S3fuseError(message, err)


@dataclass(frozen=True)
class Principal:
    """The caller of a KMS operation: its uid, primary gid and supplementary gids."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Accept any iterable of gids but keep the dataclass hashable.
        object.__setattr__(self, "groups", tuple(self.groups))


class KmsProvider(abc.ABC):
    """What the filesystem needs from a KMS; `BuiltinKms` and `transit.TransitKms` implement it.

    A provider whose calls wait on the network sets `blocking = True` and offers a trio
    `limiter`: the filesystem then calls it from worker threads (crypto.KeyManager).
    """

    blocking: bool = False

    name: str

    @abc.abstractmethod
    def generate_data_key(
        self, key: str, context: dict[str, str], who: Principal
    ) -> tuple[bytes, bytes, str, int]:
        """Mint a data key under `key` -> (plaintext 32-byte key, blob, key id, version)."""

    def generate_data_key_accepted(
        self, key: str, context: dict[str, str], who: Principal
    ) -> tuple[bytes, bytes, str, int]:
        """`generate_data_key` for data `who` wrote through a handle opened while the key
        checks passed, as S3 checks a PUT once when it arrives: a key disabled, scheduled
        for deletion or denied by its policy since then still takes that data. A provider
        that cannot skip its checks (a network KMS decides on its own side) checks again."""
        return self.generate_data_key(key, context, who)

    def decrypt_accepted(
        self, blob: bytes, context: dict[str, str], who: Principal
    ) -> tuple[bytes, str, int]:
        """`decrypt` of a block of a file `who` is writing through a handle opened while the
        key checks passed, to merge a write into it (see `generate_data_key_accepted`)."""
        return self.decrypt(blob, context, who)

    @abc.abstractmethod
    def decrypt(
        self, blob: bytes, context: dict[str, str], who: Principal
    ) -> tuple[bytes, str, int]:
        """Unwrap a blob from `generate_data_key` -> (plaintext data key, key id, version)."""

    @abc.abstractmethod
    def authorize(self, key: str, action: str, who: Principal) -> str:
        """Check that `who` may `action` ("encrypt" or "decrypt") with `key` now -> key id.

        The same checks as the data-key operations, without minting or unwrapping a key:
        the filesystem asks at open and create, before it accepts the request.
        """

    @abc.abstractmethod
    def resolve(self, key: str) -> str:
        """Alias or key id -> key id; ENOKEY if unknown."""

    @abc.abstractmethod
    def describe(self, key: str) -> dict:
        """Metadata of a key as a plain dict, never its material."""

    # -- optional abilities: defaults for a local provider, overridden by the others

    #: the Transit provider behind this one (KmsRouter), if any
    transit: KmsProvider | None = None

    @property
    def limiter(self) -> trio.CapacityLimiter | None:
        """Bounds the worker threads of a blocking provider's calls; None: not blocking."""
        return None

    def blocks(self, key: str | None = None, blob: bytes | None = None) -> bool:
        """Whether a call for this key (or key slot) waits on the network."""
        return self.blocking

    def for_key(self, key: str | None) -> KmsProvider:
        """The provider that serves `key` (a router's choice; itself otherwise)."""
        return self

    def for_blob(self, blob: bytes) -> KmsProvider:
        """The provider that unwraps `blob` (a router's choice; itself otherwise)."""
        return self

    def is_transit(self, key: str | None) -> bool:
        """Whether `key` is a Transit key."""
        return False


@dataclass
class _Key:
    """One key record in memory; field meanings are the body schema in the module docstring."""

    key_id: str
    alias: str | None
    description: str
    created: int
    state: str
    deletion_date: int | None
    policy: dict[str, dict[str, list]]
    versions: dict[int, bytes] = field(repr=False)  # material: never in repr
    current: int
    rotation: dict[str, Any]
    managed: bool
    creator: int | None = None

    def to_body(self) -> dict:
        body = {
            "alias": self.alias,
            "description": self.description,
            "created": self.created,
            "state": self.state,
            "deletion_date": self.deletion_date,
            "policy": self.policy,
            "versions": self.versions,
            "current": self.current,
            "rotation": self.rotation,
            "managed": self.managed,
        }
        if self.creator is not None:
            body["creator"] = self.creator
        return body

    @classmethod
    def from_body(cls, key_id: str, rec: dict) -> "_Key":
        return cls(
            key_id=key_id,
            alias=rec["alias"],
            description=rec["description"],
            created=rec["created"],
            state=rec["state"],
            deletion_date=rec["deletion_date"],
            policy=rec["policy"],
            versions={int(v): bytes(m) for v, m in rec["versions"].items()},
            current=rec["current"],
            rotation=dict(rec["rotation"]),
            managed=rec["managed"],
            creator=rec.get("creator"),
        )

    def describe(self) -> dict:
        return {
            "id": self.key_id,
            "alias": self.alias,
            "description": self.description,
            "created": self.created,
            "state": self.state,
            "deletion_date": self.deletion_date,
            "policy": copy.deepcopy(self.policy),
            "versions": sorted(self.versions),
            "current_version": self.current,
            "rotation": dict(self.rotation),
            "managed": self.managed,
        }

    @property
    def label(self) -> str:
        """How messages name the key: its id, and its alias if it has one."""
        return f"{self.key_id} ({self.alias})" if self.alias else self.key_id


# --------------------------------------------------------------------------
# argument validation
# --------------------------------------------------------------------------

def _now(now: float | None) -> float:
    return time.time() if now is None else now


def _int_in(value: Any, lo: int, hi: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _error(f"{what} must be an integer from {lo} to {hi}, not {value!r}", errno.EINVAL)
    return value


def validate_alias(alias: Any) -> str:
    """Check AWS's alias rules (prefix, characters, length); the caller checks reserved names."""
    if not isinstance(alias, str) or not _ALIAS_RE.fullmatch(alias) or len(alias) > MAX_ALIAS_LEN:
        raise _error(
            f"invalid alias {alias!r}: it must start with 'alias/', use only A-Z a-z 0-9 / _ -, "
            f"and be at most {MAX_ALIAS_LEN} characters",
            errno.EINVAL,
        )
    return alias


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _ID_MAX


def validate_policy(policy: Any) -> dict[str, dict[str, list]]:
    """Check a policy's shape and return it normalised: every section with sorted, unique
    lists. A section left out is empty: nobody but root."""
    if not isinstance(policy, dict) or not set(policy) <= set(POLICY_SECTIONS):
        sections = ", ".join(POLICY_SECTIONS)
        raise _error(f"a key policy must be a dict with only the sections {sections} "
                     "(a section left out: nobody but root)", errno.EINVAL)
    out: dict[str, dict[str, list]] = {}
    for section in POLICY_SECTIONS:
        body = policy.get(section, {})
        if not isinstance(body, dict) or not set(body) <= {"uids", "gids"}:
            raise _error(
                f"policy section {section!r} must be a dict with only 'uids' and 'gids'",
                errno.EINVAL,
            )
        norm: dict[str, list] = {}
        for field_name in ("uids", "gids"):
            entries = body.get(field_name, [])
            if not isinstance(entries, (list, tuple)) or len(entries) > MAX_POLICY_ENTRIES:
                raise _error(
                    f"policy {section}.{field_name} must be a list of at most "
                    f"{MAX_POLICY_ENTRIES} ids",
                    errno.EINVAL,
                )
            star = False
            ids: set[int] = set()
            for entry in entries:
                if entry == "*" and field_name == "uids":
                    star = True
                elif _is_id(entry):
                    ids.add(entry)
                else:
                    allowed = "ids or '*'" if field_name == "uids" else "ids"
                    raise _error(
                        f"policy {section}.{field_name} may hold only {allowed}, not {entry!r}",
                        errno.EINVAL,
                    )
            norm[field_name] = (["*"] if star else []) + sorted(ids)
        out[section] = norm
    return out


def policy_allows(policy: dict[str, dict[str, list]], section: str, who: Principal) -> bool:
    """Whether `who` matches `section` of `policy`; root matches everything (module docstring)."""
    if who.uid == 0:
        return True
    body = policy.get(section, {})
    uids = body.get("uids", [])
    if "*" in uids or who.uid in uids:
        return True
    gids = set(body.get("gids", []))
    return who.gid in gids or any(g in gids for g in who.groups)


def _owner_policy(uid: int) -> dict[str, dict[str, list]]:
    return {s: {"uids": [uid], "gids": []} for s in POLICY_SECTIONS}


def _managed_policy() -> dict[str, dict[str, list]]:
    return {
        "encrypt": {"uids": ["*"], "gids": []},
        "decrypt": {"uids": ["*"], "gids": []},
        "admin": {"uids": [0], "gids": []},
    }


def canonical_context(context: Any) -> bytes:
    """The encryption context as AAD bytes: msgpack of its items sorted by key."""
    if not isinstance(context, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in context.items()
    ):
        raise _error("an encryption context must be a dict of str to str", errno.EINVAL)
    try:
        return msgpack.packb([[k, v] for k, v in sorted(context.items())])
    except (UnicodeEncodeError, ValueError) as exc:
        raise _error(f"encryption context cannot be encoded: {exc}", errno.EINVAL) from None


def encode_blob(key_id: str, version: int, nonce: bytes, sealed: bytes) -> bytes:
    kid = key_id.encode()
    return b"".join(
        [BLOB_MAGIC, struct.pack(">H", len(kid)), kid, struct.pack(">I", version), nonce, sealed]
    )


def parse_blob(blob: bytes) -> tuple[str, int, bytes, bytes]:
    """Split a data-key blob -> (key id, version, nonce, ciphertext and tag); EIO if malformed."""
    bad = _error("KMS ciphertext blob is malformed", errno.EIO)
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise bad
    blob = bytes(blob)
    if len(blob) < 6 or blob[:4] != BLOB_MAGIC:
        raise bad
    (kid_len,) = struct.unpack_from(">H", blob, 4)
    pos = 6 + kid_len
    if len(blob) != pos + 4 + NONCE_LEN + KEY_LEN + TAG_LEN:
        raise bad
    try:
        key_id = blob[6:pos].decode()
    except UnicodeDecodeError:
        raise bad from None
    (version,) = struct.unpack_from(">I", blob, pos)
    pos += 4
    return key_id, version, blob[pos : pos + NONCE_LEN], blob[pos + NONCE_LEN :]


# --------------------------------------------------------------------------
# the built-in KMS
# --------------------------------------------------------------------------

class BuiltinKms(KmsProvider):
    """The built-in KMS: a keystore of named, versioned keys sealed by the root key."""

    name = "builtin"

    def __init__(
        self, path: str, root_key: bytes, store_id: bytes, keys: dict[str, _Key] | None = None
    ) -> None:
        if not isinstance(root_key, (bytes, bytearray)) or len(root_key) != KEY_LEN:
            raise _error("the root key must be 32 bytes", errno.EINVAL)
        self.path = path
        self._root_key = bytes(root_key)
        self.store_id = bytes(store_id)
        self._keys: dict[str, _Key] = keys if keys is not None else {}
        self._log: tuple[bytes, int, int] | None = None  # (file id, next record number, valid size)
        self.key_quota = DEFAULT_KEY_QUOTA

    def __repr__(self) -> str:
        return f"BuiltinKms(path={self.path!r}, keys={len(self._keys)})"

    # ---- persistence ----------------------------------------------------

    @classmethod
    def load(cls, path: str, root_key: bytes, store_id: bytes) -> "BuiltinKms":
        """Open the keystore at `path`; absent -> an empty keystore, written on first change."""
        kms = cls(path, root_key, store_id)
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            return kms
        kms._keys = kms._unseal(blob)
        return kms

    def has_key(self, key_id: str) -> bool:
        """Whether `key_id` names a key in this keystore (in any state)."""
        return key_id in self._keys

    def reseal(self, path: str, root_key: bytes) -> None:
        """Write the same keys to `path`, sealed under another root key (rekey-root)."""
        BuiltinKms(path, root_key, self.store_id, self._keys).save()

    def save(self) -> None:
        """Write the whole keystore as a new version-2 file, atomically (the old or the new
        file survives a crash)."""
        file_id = os.urandom(FILE_ID_LEN)
        body = {"keys": {kid: k.to_body() for kid, k in self._keys.items()}}
        head = _KEYSTORE_PREFIX.pack(KEYSTORE_MAGIC, KEYSTORE_VERSION) + file_id
        record = self._record(file_id, 0, body)
        atomic_write(self.path, head + record, mode=0o600)
        self._log = (file_id, 1, len(head) + len(record))

    def _aad(self, file_id: bytes, number: int) -> bytes:
        return KEYSTORE_AAD + self.store_id + file_id + struct.pack(">Q", number)

    def _record(self, file_id: bytes, number: int, body: dict) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        sealed = nonce + AESGCM(self._root_key).encrypt(nonce, msgpack.packb(body), self._aad(file_id, number))
        return _RECORD_LEN.pack(len(sealed)) + sealed

    def _append(self, changed: dict[str, "_Key | None"]) -> None:
        """Make one change durable: a record of the keys it touched, appended to the log
        (or the whole keystore rewritten, when the log has grown long or is version 1)."""
        log_state = self._log
        if log_state is None or log_state[1] > max(COMPACT_RECORDS, 2 * len(self._keys)):
            self.save()
            return
        file_id, number, size = log_state
        body = {"put": {kid: k.to_body() for kid, k in changed.items() if k is not None},
                "del": [kid for kid, k in changed.items() if k is None]}
        record = self._record(file_id, number, body)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)  # a record a crash cut short: its change never returned
            os.pwrite(fd, record, size)
            os.fsync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise
        finally:
            os.close(fd)
        self._log = (file_id, number + 1, size + len(record))

    def _unseal(self, blob: bytes) -> dict[str, _Key]:
        if len(blob) < _KEYSTORE_PREFIX.size:
            raise StoreError(f"KMS keystore {self.path} is truncated")
        magic, version = _KEYSTORE_PREFIX.unpack_from(blob)
        if magic == KEYSTORE_MAGIC and version == 1:
            self._log = None  # rewritten as version 2 at the first change
            return self._bodies_to_keys(self._open_v1(blob)["keys"])
        if magic != KEYSTORE_MAGIC or version != KEYSTORE_VERSION:
            raise StoreError(f"KMS keystore {self.path} has an unknown format")
        start = _KEYSTORE_PREFIX.size
        file_id = blob[start:start + FILE_ID_LEN]
        pos, number = start + FILE_ID_LEN, 0
        keys: dict[str, dict] = {}
        while pos + _RECORD_LEN.size <= len(blob):
            (n,) = _RECORD_LEN.unpack_from(blob, pos)
            if n > MAX_RECORD or pos + _RECORD_LEN.size + n > len(blob):
                break  # cut short by a crash: ignored, and cut off at the next append
            sealed = blob[pos + _RECORD_LEN.size:pos + _RECORD_LEN.size + n]
            body = self._open_record(sealed, file_id, number)
            try:
                if number == 0:
                    keys = dict(body["keys"])
                else:
                    keys.update(body["put"])
                    for kid in body["del"]:
                        keys.pop(kid, None)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise StoreError(f"KMS keystore {self.path}: record {number} is malformed "
                                 f"({type(exc).__name__})") from None
            pos += _RECORD_LEN.size + n
            number += 1
        if number == 0:
            raise StoreError(f"KMS keystore {self.path} is truncated")
        self._log = (file_id, number, pos)
        return self._bodies_to_keys(keys)

    def _open_record(self, sealed: bytes, file_id: bytes, number: int) -> dict:
        try:
            if len(sealed) < NONCE_LEN + TAG_LEN:
                raise InvalidTag()
            body = AESGCM(self._root_key).decrypt(sealed[:NONCE_LEN], sealed[NONCE_LEN:],
                                                  self._aad(file_id, number))
        except InvalidTag:
            if number == 0:
                # GCM cannot tell a wrong key from a damaged file; the wrong key is far more likely.
                raise StoreError(
                    f"wrong root key: the KMS keystore {self.path} does not authenticate "
                    "(or it belongs to another store, or it is damaged)",
                    errno.EACCES,
                ) from None
            raise StoreError(f"KMS keystore {self.path}: record {number} does not authenticate "
                             "(damaged, moved or from another copy of the file)", errno.EIO) from None
        try:
            data = msgpack.unpackb(body, strict_map_key=False)
        except ValueError as exc:
            raise StoreError(f"KMS keystore {self.path}: record {number} is malformed ({exc})") from None
        if not isinstance(data, dict):
            raise StoreError(f"KMS keystore {self.path}: record {number} is malformed")
        return data

    def _open_v1(self, blob: bytes) -> dict:
        if len(blob) < _KEYSTORE_PREFIX.size + NONCE_LEN + TAG_LEN:
            raise StoreError(f"KMS keystore {self.path} is truncated")
        start = _KEYSTORE_PREFIX.size
        try:
            nonce, sealed = blob[start : start + NONCE_LEN], blob[start + NONCE_LEN :]
            body = AESGCM(self._root_key).decrypt(nonce, sealed, KEYSTORE_AAD_V1 + self.store_id)
        except InvalidTag:
            raise StoreError(
                f"wrong root key: the KMS keystore {self.path} does not authenticate "
                "(or it belongs to another store, or it is damaged)",
                errno.EACCES,
            ) from None
        try:
            data = msgpack.unpackb(body, strict_map_key=False)
            return {"keys": dict(data["keys"])}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreError(
                f"KMS keystore {self.path} has a malformed body: {type(exc).__name__}"
            ) from None

    def _bodies_to_keys(self, bodies: dict) -> dict[str, _Key]:
        try:
            return {kid: _Key.from_body(kid, rec) for kid, rec in bodies.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreError(
                f"KMS keystore {self.path} has a malformed body: {type(exc).__name__}"
            ) from None

    @contextmanager
    def _change(self, *key_ids: str) -> Iterator[None]:
        """Apply a mutation of these keys and make it durable; on any failure restore them
        as they were. Costs what the touched keys cost, not what the keystore holds."""
        before = {kid: copy.deepcopy(self._keys.get(kid)) for kid in key_ids}
        try:
            yield
            self._append({kid: self._keys.get(kid) for kid in key_ids})
        except BaseException:
            for kid, k in before.items():
                if k is None:
                    self._keys.pop(kid, None)
                else:
                    self._keys[kid] = k
            raise

    # ---- lookup ---------------------------------------------------------

    def resolve(self, key: str) -> str:
        """Alias ("alias/...") or key id -> key id; ENOKEY if no such key (or it was purged)."""
        if isinstance(key, str):
            if key.startswith("alias/"):
                for k in self._keys.values():
                    if k.alias == key:
                        return k.key_id
            elif key in self._keys:
                return key
        raise _error(f"KMS key {key!r} does not exist", errno.ENOKEY)

    def _get(self, key: str) -> _Key:
        return self._keys[self.resolve(key)]

    def describe(self, key: str) -> dict:
        """Metadata of one key: id, alias, description, created, state, deletion_date, policy,
        versions (numbers only), current_version, rotation, managed."""
        return self._get(key).describe()

    def list_keys(self) -> list[dict]:
        """`describe` of every key, oldest first."""
        ordered = sorted(self._keys.values(), key=lambda k: (k.created, k.key_id))
        return [k.describe() for k in ordered]

    def get_policy(self, key: str) -> dict:
        return copy.deepcopy(self._get(key).policy)

    # ---- creation -------------------------------------------------------

    def _check_alias_free(self, alias: str) -> None:
        if any(k.alias == alias for k in self._keys.values()):
            raise _error(f"alias {alias} is already in use", errno.EEXIST)

    def _new_key(
        self, alias: str | None, description: str, policy: dict, now: float, managed: bool,
        creator: int | None = None,
    ) -> _Key:
        created = int(now)
        rotation: dict[str, Any] = {
            "enabled": False, "period_days": DEFAULT_ROTATION_DAYS, "next": None
        }
        if managed:
            rotation = {
                "enabled": True,
                "period_days": MANAGED_ROTATION_DAYS,
                "next": created + MANAGED_ROTATION_DAYS * DAY,
            }
        key = _Key(
            key_id=str(uuid.uuid4()),
            alias=alias,
            description=description,
            created=created,
            state=ENABLED,
            deletion_date=None,
            policy=policy,
            versions={1: os.urandom(KEY_LEN)},
            current=1,
            rotation=rotation,
            managed=managed,
            creator=creator,
        )
        with self._change(key.key_id):
            self._keys[key.key_id] = key
        return key

    def create_key(
        self,
        who: Principal,
        alias: str | None = None,
        description: str = "",
        now: float | None = None,
        policy: dict | None = None,
    ) -> dict:
        """Create an Enabled key with backing version 1 -> its `describe`.

        The default policy grants admin, encrypt and decrypt to `who.uid` (and, as always, root).
        """
        if alias is not None:
            validate_alias(alias)
            if alias.startswith(_RESERVED_ALIAS_PREFIX):
                raise _error(
                    f"alias {alias}: the prefix {_RESERVED_ALIAS_PREFIX} is reserved "
                    "for the service-managed key",
                    errno.EINVAL,
                )
            self._check_alias_free(alias)
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_LEN:
            raise _error(
                f"a description must be a string of at most {MAX_DESCRIPTION_LEN} characters",
                errno.EINVAL,
            )
        policy = validate_policy(policy) if policy is not None else _owner_policy(who.uid)
        if who.uid != 0:
            held = sum(1 for k in self._keys.values() if k.creator == who.uid)
            if held >= self.key_quota:
                raise _error(f"uid {who.uid} has created {held} KMS keys, its quota: delete one "
                             "first (kms schedule-deletion), or raise \"key_quota\" in store.json "
                             "\"kms\"", errno.EDQUOT)
        return self._new_key(alias, description, policy, _now(now), managed=False,
                             creator=who.uid).describe()

    def default_key(self, who: Principal, now: float | None = None) -> str:
        """The service-managed key `alias/aws/s3` (created on first use) -> its key id.

        Anyone may call this; `who` is accepted for the caller's audit record.
        """
        for k in self._keys.values():
            if k.managed and k.alias == MANAGED_ALIAS:
                return k.key_id
        description = "Default key that protects SSE-KMS objects when no key is named"
        key = self._new_key(MANAGED_ALIAS, description, _managed_policy(), _now(now), managed=True)
        return key.key_id

    # ---- administration -------------------------------------------------

    def _admin(self, key: str, who: Principal, action: str) -> _Key:
        k = self._get(key)
        if not policy_allows(k.policy, "admin", who):
            raise _error(
                f"uid {who.uid} may not {action} KMS key {k.label}: "
                "the key policy does not grant admin",
                errno.EACCES,
            )
        return k

    @staticmethod
    def _not_managed(k: _Key, action: str) -> None:
        if k.managed:
            raise _error(f"cannot {action} the service-managed key {k.label}", errno.EPERM)

    @staticmethod
    def _not_pending(k: _Key, action: str) -> None:
        if k.state == PENDING_DELETION:
            raise _error(
                f"cannot {action} KMS key {k.label}: it is pending deletion "
                "(cancel the deletion first)",
                errno.EINVAL,
            )

    def enable(self, key: str, who: Principal) -> dict:
        """Disabled -> Enabled (no-op if already Enabled) -> `describe`."""
        k = self._admin(key, who, "enable")
        self._not_pending(k, "enable")
        with self._change(k.key_id):
            k.state = ENABLED
        return self.describe(k.key_id)

    def disable(self, key: str, who: Principal) -> dict:
        """Enabled -> Disabled: data-key operations fail with EKEYREVOKED until enabled again."""
        k = self._admin(key, who, "disable")
        self._not_managed(k, "disable")
        self._not_pending(k, "disable")
        with self._change(k.key_id):
            k.state = DISABLED
        return self.describe(k.key_id)

    def schedule_deletion(
        self, key: str, days: int, who: Principal, now: float | None = None
    ) -> dict:
        """Put the key in PendingDeletion for `days` (7..30); `purge_expired` deletes it then."""
        k = self._admin(key, who, "schedule deletion of")
        _int_in(days, *DELETION_DAYS, "the deletion waiting period in days")
        self._not_managed(k, "schedule deletion of")
        self._not_pending(k, "schedule deletion of")
        with self._change(k.key_id):
            k.state = PENDING_DELETION
            k.deletion_date = int(_now(now)) + days * DAY
        return self.describe(k.key_id)

    def cancel_deletion(self, key: str, who: Principal) -> dict:
        """PendingDeletion -> Disabled (as AWS does: enable it explicitly afterwards)."""
        k = self._admin(key, who, "cancel deletion of")
        if k.state != PENDING_DELETION:
            raise _error(f"KMS key {k.label} is not pending deletion", errno.EINVAL)
        with self._change(k.key_id):
            k.state = DISABLED
            k.deletion_date = None
        return self.describe(k.key_id)

    def set_policy(self, key: str, policy: dict, who: Principal) -> dict:
        """Replace the key policy (shape checked: EINVAL) -> `describe`."""
        k = self._admin(key, who, "set the policy of")
        normalised = validate_policy(policy)
        self._not_managed(k, "change the policy of")
        with self._change(k.key_id):
            k.policy = normalised
        return self.describe(k.key_id)

    def rotate(self, key: str, who: Principal, now: float | None = None) -> dict:
        """Add a backing version and make it current; old versions stay for decryption.

        On demand, so the automatic schedule does not move (as in AWS); `now` is
        accepted for symmetry with the other time-aware methods.
        """
        k = self._admin(key, who, "rotate")
        self._not_pending(k, "rotate")
        with self._change(k.key_id):
            self._add_version(k)
        return self.describe(k.key_id)

    @staticmethod
    def _add_version(k: _Key) -> None:
        version = max(k.versions) + 1
        k.versions[version] = os.urandom(KEY_LEN)
        k.current = version

    def enable_rotation(
        self, key: str, days: int, who: Principal, now: float | None = None
    ) -> dict:
        """Rotate automatically every `days` (1..2560; AWS allows 90..2560), first at now + days."""
        k = self._admin(key, who, "enable rotation of")
        _int_in(days, *ROTATION_DAYS, "the rotation period in days")
        self._not_managed(k, "change rotation of")
        self._not_pending(k, "enable rotation of")
        with self._change(k.key_id):
            k.rotation = {"enabled": True, "period_days": days, "next": int(_now(now)) + days * DAY}
        return self.describe(k.key_id)

    def disable_rotation(self, key: str, who: Principal) -> dict:
        """Stop automatic rotation (the period is remembered, as in AWS)."""
        k = self._admin(key, who, "disable rotation of")
        self._not_managed(k, "change rotation of")
        with self._change(k.key_id):
            k.rotation = {"enabled": False, "period_days": k.rotation["period_days"], "next": None}
        return self.describe(k.key_id)

    # ---- the daemon's scheduler -----------------------------------------

    def due_rotations(self, now: float | None = None) -> list[str]:
        """Enabled keys with automatic rotation on whose next date has passed.

        Disabled and PendingDeletion keys are not rotated; a key enabled again
        after its date rotates at the next run, as AWS does.
        """
        t = _now(now)
        return sorted(
            k.key_id
            for k in self._keys.values()
            if k.state == ENABLED
            and k.rotation["enabled"]
            and k.rotation["next"] is not None
            and k.rotation["next"] <= t
        )

    def rotate_due(self, now: float | None = None) -> list[str]:
        """Rotate every due key and set its next date to now + period -> the rotated key ids."""
        t = _now(now)
        due = self.due_rotations(t)
        if due:
            with self._change(*due):
                for kid in due:
                    k = self._keys[kid]
                    self._add_version(k)
                    k.rotation["next"] = int(t) + k.rotation["period_days"] * DAY
        return due

    def purge_expired(self, now: float | None = None) -> list[str]:
        """Delete for good the PendingDeletion keys whose date has passed -> their ids.

        Their material leaves the keystore file (rewritten atomically); blobs
        under them fail with ENOKEY from now on.
        """
        t = _now(now)
        expired = sorted(
            k.key_id
            for k in self._keys.values()
            if k.state == PENDING_DELETION and k.deletion_date is not None and k.deletion_date <= t
        )
        if expired:
            with self._change(*expired):
                for kid in expired:
                    del self._keys[kid]
        return expired

    # ---- data keys ------------------------------------------------------

    def _usable(self, k: _Key, section: str, who: Principal) -> None:
        if k.state != ENABLED:
            raise _error(f"KMS key {k.label} is {k.state}", errno.EKEYREVOKED)
        if not policy_allows(k.policy, section, who):
            raise _error(
                f"uid {who.uid} may not {section} with KMS key {k.label}: "
                "denied by the key policy",
                errno.EACCES,
            )

    def authorize(self, key: str, action: str, who: Principal) -> str:
        if action not in ("encrypt", "decrypt"):
            raise _error(f"unknown KMS action {action!r}", errno.EINVAL)
        k = self._get(key)
        self._usable(k, action, who)
        return k.key_id

    def generate_data_key(
        self, key: str, context: dict[str, str], who: Principal
    ) -> tuple[bytes, bytes, str, int]:
        """Mint a random 32-byte data key wrapped under the key's current version.

        -> (plaintext data key, ciphertext blob, key id, version). ENOKEY if the key
        is unknown, EKEYREVOKED unless Enabled, EACCES unless the policy grants encrypt.
        """
        k = self._get(key)
        self._usable(k, "encrypt", who)
        return self._mint(k, context)

    def _mint(self, k: _Key, context: dict[str, str]) -> tuple[bytes, bytes, str, int]:
        aad = DATAKEY_AAD + canonical_context(context)
        data_key = os.urandom(KEY_LEN)
        nonce = os.urandom(NONCE_LEN)
        sealed = AESGCM(k.versions[k.current]).encrypt(nonce, data_key, aad)
        return data_key, encode_blob(k.key_id, k.current, nonce, sealed), k.key_id, k.current

    def generate_data_key_accepted(
        self, key: str, context: dict[str, str], who: Principal
    ) -> tuple[bytes, bytes, str, int]:
        """Mint a data key for accepted data: the key must still exist (ENOKEY once it is
        deleted), its state and policy are not checked again."""
        k = self._get(key)
        return self._mint(k, context)

    def decrypt(
        self, blob: bytes, context: dict[str, str], who: Principal
    ) -> tuple[bytes, str, int]:
        """Unwrap a blob under the key id and version it names -> (data key, key id, version).

        EIO if the blob is malformed or the ciphertext/context does not authenticate;
        ENOKEY if the key or version is gone; EKEYREVOKED unless Enabled; EACCES
        unless the policy grants decrypt.
        """
        return self._unwrap(blob, context, who, check=True)

    def decrypt_accepted(
        self, blob: bytes, context: dict[str, str], who: Principal
    ) -> tuple[bytes, str, int]:
        """`decrypt` without the state and policy checks (the key must still exist)."""
        return self._unwrap(blob, context, who, check=False)

    def _unwrap(self, blob: bytes, context: dict[str, str], who: Principal, check: bool
                ) -> tuple[bytes, str, int]:
        aad = DATAKEY_AAD + canonical_context(context)
        key_id, version, nonce, sealed = parse_blob(blob)
        k = self._keys.get(key_id)
        if k is None:
            raise _error(f"KMS key {key_id!r} named by the ciphertext does not exist", errno.ENOKEY)
        if check:
            self._usable(k, "decrypt", who)
        material = k.versions.get(version)
        if material is None:
            raise _error(f"KMS key {k.label} has no backing version {version}", errno.ENOKEY)
        try:
            data_key = AESGCM(material).decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise _error(
                f"KMS decrypt under key {k.label} version {version} failed: "
                "the ciphertext or the encryption context does not match",
                errno.EIO,
            ) from None
        return data_key, key_id, version
