"""S3 access keys: access key id -> secret, uid and groups, sealed in the store (s3keys.bin).

File (sealed by the store's root key, like the KMS keystore; docs/FORMAT.md)::

    "S3AK" | u8 version (1) | nonce (12) | AES-256-GCM(root key, nonce, body, AAD)
    AAD = "s3fuse/v1/s3keys" | store_id
    body = msgpack({"etag_key": bin32,
                    "keys": {access_key_id: {"secret": str, "uid": int, "gid": int,
                                             "groups": [int], "created": int}}})

`etag_key` keys the HMACs and seals behind object ETags (s3api/etag.py). The file is
rewritten atomically at each change; a failed write leaves memory as it was.
"""

from __future__ import annotations

import base64
import errno
import hmac
import os
import pwd
import secrets
import struct
import time
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import S3fuseError, StoreError
from ..util import atomic_write

MAGIC = b"S3AK"
VERSION = 1
AAD = b"s3fuse/v1/s3keys"
NONCE_LEN = 12
_PREFIX = struct.Struct(">4sB")
MAX_KEYS = 10000
ID_PREFIX = "AKS3F"


@dataclass(frozen=True)
class AccessKey:
    access_key_id: str
    secret: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    created: int

    def describe(self) -> dict:
        return {"AccessKeyId": self.access_key_id, "uid": self.uid, "gid": self.gid,
                "created": self.created}


def groups_of(uid: int) -> tuple[int, tuple[int, ...]]:
    """The primary gid and supplementary groups of a uid (from the user database, if it has one)."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return uid, ()
    try:
        return pw.pw_gid, tuple(sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid))))
    except OSError:
        return pw.pw_gid, ()


def new_access_key_id() -> str:
    return ID_PREFIX + base64.b32encode(os.urandom(10)).decode()[:15]


def seal(body: dict, root_key: bytes, store_id: bytes, nonce: bytes | None = None) -> bytes:
    nonce = nonce or os.urandom(NONCE_LEN)
    return (_PREFIX.pack(MAGIC, VERSION) + nonce
            + AESGCM(root_key).encrypt(nonce, msgpack.packb(body), AAD + store_id))


def unseal(blob: bytes, root_key: bytes, store_id: bytes, path: str = "s3keys.bin") -> dict:
    if len(blob) < _PREFIX.size + NONCE_LEN + 16:
        raise StoreError(f"S3 key store {path} is truncated")
    magic, version = _PREFIX.unpack_from(blob)
    if magic != MAGIC or version != VERSION:
        raise StoreError(f"S3 key store {path} has an unknown format")
    nonce = blob[_PREFIX.size:_PREFIX.size + NONCE_LEN]
    try:
        body = AESGCM(root_key).decrypt(nonce, blob[_PREFIX.size + NONCE_LEN:], AAD + store_id)
    except InvalidTag:
        raise StoreError(f"S3 key store {path} does not authenticate (wrong root key, another "
                         "store's file, or damage)", errno.EACCES) from None
    data = msgpack.unpackb(body, strict_map_key=False)
    if not isinstance(data, dict) or len(data.get("etag_key", b"")) != 32:
        raise StoreError(f"S3 key store {path} has a malformed body")
    return data


class AccessKeys:
    """The access keys of one store, in memory, saved sealed at every change."""

    def __init__(self, path: str, root_key: bytes, store_id: bytes) -> None:
        self.path = path
        self._root_key = bytes(root_key)
        self.store_id = bytes(store_id)
        self._keys: dict[str, AccessKey] = {}
        self.etag_key = os.urandom(32)
        self._loaded = False

    @classmethod
    def load(cls, path: str, root_key: bytes, store_id: bytes) -> "AccessKeys":
        ks = cls(path, root_key, store_id)
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            return ks
        data = unseal(blob, root_key, store_id, path)
        ks.etag_key = bytes(data["etag_key"])
        for akid, rec in data.get("keys", {}).items():
            ks._keys[akid] = AccessKey(akid, rec["secret"], int(rec["uid"]), int(rec["gid"]),
                                       tuple(int(g) for g in rec.get("groups", ())), int(rec["created"]))
        ks._loaded = True
        return ks

    def save(self) -> None:
        body = {"etag_key": self.etag_key,
                "keys": {k.access_key_id: {"secret": k.secret, "uid": k.uid, "gid": k.gid,
                                           "groups": list(k.groups), "created": k.created}
                         for k in self._keys.values()}}
        atomic_write(self.path, seal(body, self._root_key, self.store_id), mode=0o600)
        self._loaded = True

    def reseal(self, path: str, root_key: bytes) -> None:
        """Write the same keys sealed under another root key (rekey-root)."""
        other = AccessKeys(path, root_key, self.store_id)
        other._keys, other.etag_key = dict(self._keys), self.etag_key
        other.save()

    def ensure_saved(self) -> None:
        """The ETag key must survive a restart before any ETag depends on it."""
        if not self._loaded:
            self.save()

    def get(self, access_key_id: str) -> AccessKey | None:
        return self._keys.get(access_key_id)

    def secret_for(self, access_key_id: str) -> str | None:
        key = self._keys.get(access_key_id)
        return key.secret if key is not None else None

    def add(self, uid: int, requester_uid: int, allow_root: bool = False) -> AccessKey:
        if requester_uid != 0 and requester_uid != uid:
            raise S3fuseError("only root may create access keys for another uid", errno.EPERM)
        if uid == 0 and not allow_root:
            raise S3fuseError("a key for uid 0 passes every permission and KMS policy: "
                              "give --allow-root to create one", errno.EPERM)
        if not 0 <= uid < 2**32 - 1:
            raise S3fuseError(f"uid {uid} is out of range", errno.EINVAL)
        if len(self._keys) >= MAX_KEYS:
            raise S3fuseError(f"the store has {MAX_KEYS} access keys already", errno.ENOSPC)
        gid, groups = groups_of(uid)
        key = AccessKey(new_access_key_id(), secrets.token_urlsafe(30), uid, gid, groups, int(time.time()))
        self._keys[key.access_key_id] = key
        try:
            self.save()
        except BaseException:
            del self._keys[key.access_key_id]
            raise
        return key

    def list(self, requester_uid: int) -> list[dict]:
        return [k.describe() for k in self._keys.values() if requester_uid in (0, k.uid)]

    def owned_by(self, uid: int) -> list[AccessKey]:
        return [k for k in self._keys.values() if k.uid == uid]

    def remove(self, access_key_id: str, requester_uid: int) -> AccessKey:
        key = self._keys.get(access_key_id)
        if key is None or requester_uid not in (0, key.uid):
            raise S3fuseError(f"no access key {access_key_id!r} of yours exists", errno.ENOENT)
        del self._keys[access_key_id]
        try:
            self.save()
        except BaseException:
            self._keys[access_key_id] = key
            raise
        return key

    def matches(self, access_key_id: str, secret: str) -> bool:
        key = self._keys.get(access_key_id)
        return key is not None and hmac.compare_digest(key.secret.encode(), secret.encode())
