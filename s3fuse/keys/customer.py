"""SSE-C: customer keys held in the daemon's memory only.

A key arrives over the control socket, lives in a `bytearray` (wiped on removal),
and is never written anywhere: not the store, the database, the logs or the audit
trail. A restart forgets every key.

Objects record only a randomly salted HMAC of the key (the "verifier", as S3 keeps),
and their data key is wrapped under a key derived from the customer key and the salt.
The *fingerprint* (an unsalted HMAC, shown by `key list` and stored in directory
settings) identifies a key without revealing anything about it.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hmac
import os
import time
from dataclasses import dataclass, field
from hashlib import sha256

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import S3fuseError

KEY_LEN = 32
SALT_LEN = 16


def parse_key(raw: bytes) -> bytes:
    """32 raw bytes, or their base64 (a trailing newline is ignored)."""
    if len(raw) == KEY_LEN:
        return raw
    text = raw.strip()
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_LEN:
        raise S3fuseError("a customer key is 32 raw bytes or their base64 encoding", errno.EINVAL)
    return key


def fingerprint(key: bytes | bytearray) -> str:
    return hmac.new(bytes(key), b"s3fuse/v1/ssec-fingerprint", sha256).hexdigest()[:32]


def verifier(key: bytes | bytearray, salt: bytes) -> str:
    """The salted HMAC an object records: `salt hex ':' hmac hex`."""
    tag = hmac.new(bytes(key), b"s3fuse/v1/ssec-verify" + salt, sha256).hexdigest()
    return f"{salt.hex()}:{tag}"


def new_verifier(key: bytes | bytearray) -> str:
    return verifier(key, os.urandom(SALT_LEN))


def matches(key: bytes | bytearray, recorded: str) -> bool:
    try:
        salt_hex, _ = recorded.split(":", 1)
        salt = bytes.fromhex(salt_hex)
    except ValueError:
        return False
    return hmac.compare_digest(verifier(key, salt), recorded)


def wrapping_key(key: bytes | bytearray, recorded: str, object_id: bytes) -> bytes:
    salt = bytes.fromhex(recorded.split(":", 1)[0])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                info=b"s3fuse/v1/ssec-kek" + object_id).derive(bytes(key))


@dataclass(eq=False)
class CustomerKey:
    name: str
    material: bytearray = field(repr=False)
    owner_uid: int
    is_global: bool
    fingerprint: str
    added: float

    def visible_to(self, uid: int) -> bool:
        return self.is_global or uid == self.owner_uid

    def wipe(self) -> None:
        for i in range(len(self.material)):
            self.material[i] = 0

    def describe(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "owner_uid": self.owner_uid,
                "global": self.is_global, "added": int(self.added)}


class CustomerKeys:
    """Loaded customer keys. Names are unique per owner (a global key is owned by root)."""

    def __init__(self) -> None:
        self._keys: list[CustomerKey] = []

    def add(self, name: str, raw: bytes, uid: int, is_global: bool) -> CustomerKey:
        if not name or len(name) > 128 or any(c in name for c in "/\0\n:"):
            raise S3fuseError("a key name is 1-128 characters without '/', ':', NUL or newline", errno.EINVAL)
        if is_global and uid != 0:
            raise S3fuseError("only root may load a key for everyone (--global)", errno.EPERM)
        material = bytearray(parse_key(raw))
        owner = 0 if is_global else uid
        for existing in self._keys:
            if existing.name == name and existing.owner_uid == owner:
                raise S3fuseError(f"a key named {name!r} is already loaded", errno.EEXIST)
        key = CustomerKey(name, material, owner, is_global, fingerprint(material), time.time())
        self._keys.append(key)
        return key

    def remove(self, name: str, uid: int) -> CustomerKey:
        for key in self._keys:
            if key.name == name and (key.owner_uid == uid or uid == 0):
                self._keys.remove(key)
                key.wipe()
                return key
        raise S3fuseError(f"no key named {name!r} is loaded for you", errno.ENOKEY)

    def visible(self, uid: int) -> list[CustomerKey]:
        return [k for k in self._keys if k.visible_to(uid)]

    def list(self, uid: int) -> list[dict]:
        return [k.describe() for k in (self._keys if uid == 0 else self.visible(uid))]

    def find(self, uid: int, name_or_fingerprint: str) -> CustomerKey | None:
        """A key the caller may use, by name (own keys first) or by fingerprint."""
        candidates = sorted(self.visible(uid), key=lambda k: k.owner_uid != uid)
        for key in candidates:
            if key.name == name_or_fingerprint or hmac.compare_digest(key.fingerprint, name_or_fingerprint):
                return key
        return None

    def for_object(self, uid: int, recorded: str) -> CustomerKey | None:
        """The caller's key whose salted HMAC matches an object's verifier."""
        for key in self.visible(uid):
            if matches(key.material, recorded):
                return key
        return None

    def clear(self) -> None:
        for key in self._keys:
            key.wipe()
        self._keys.clear()
