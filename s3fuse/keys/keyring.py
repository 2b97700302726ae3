"""The SSE-S3 master keyring: numbered 256-bit master keys sealed by the root key.

File layout (docs/FORMAT.md, "Keyring")::

    magic "S3FK" | u8 version | nonce (12) | AES-256-GCM(root key, msgpack body)
    AAD = "s3fuse/v1/keyring" | store_id

    body = {"current": int, "keys": {version: key32},
            "created": {version: unix seconds}, "retired": {version: unix seconds},
            "meta": key32}   # the metadata key (s3fuse/metaauth.py); absent before format 2

Versions are numbered from 1 and never reused: a rotation adds max(every version ever,
retired included) + 1. Retiring a version erases its key and remembers only its number
and the time. The keyring is rewritten atomically (temporary file, fsync, rename, fsync
of the directory), so a crash leaves either the old or the new keyring. The methods
that change it return a new Keyring, so the caller saves it before it becomes current.
"""

from __future__ import annotations

import os
import struct
import time

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import StoreError
from ..util import atomic_write

MAGIC = b"S3FK"
VERSION = 1
_PREFIX = struct.Struct(">4sB")


class Keyring:
    """Master-key versions in memory; `current` is the version new objects use."""

    def __init__(self, keys: dict[int, bytes], current: int, created: dict[int, int] | None = None,
                 retired: dict[int, int] | None = None, meta_key: bytes | None = None) -> None:
        self.keys = keys
        self.current = current
        self.created = created if created is not None else {}
        self.retired = retired if retired is not None else {}
        # authenticates the metadata rows and store.json's key settings (docs/FORMAT.md); in
        # the keyring so that rekey-root re-seals it with the rest, in one step
        self.meta_key = meta_key

    def __repr__(self) -> str:  # never the key bytes
        return f"Keyring(current={self.current}, versions={sorted(self.keys)}, retired={sorted(self.retired)})"

    @classmethod
    def new(cls, now: float | None = None) -> "Keyring":
        return cls({1: os.urandom(32)}, 1, {1: int(time.time() if now is None else now)}, meta_key=os.urandom(32))

    def with_meta_key(self, meta_key: bytes) -> "Keyring":
        """A copy that holds a metadata key (the upgrade of an older store)."""
        return Keyring(dict(self.keys), self.current, dict(self.created), dict(self.retired), meta_key)

    def key(self, version: int) -> bytes:
        try:
            return self.keys[version]
        except KeyError:
            if version in self.retired:
                raise KeyError(f"master key version {version} was retired") from None
            raise KeyError(f"master key version {version} is not in the keyring") from None

    def created_at(self, version: int) -> int | None:
        return self.created.get(version)

    def rotated(self, now: float | None = None) -> "Keyring":
        """A copy with a new random version that is current."""
        version = max([*self.keys, *self.retired]) + 1
        created = dict(self.created)
        created[version] = int(time.time() if now is None else now)
        return Keyring({**self.keys, version: os.urandom(32)}, version, created, dict(self.retired),
                       self.meta_key)

    def without(self, versions: list[int], now: float | None = None) -> "Keyring":
        """A copy with these (non-current) versions' keys erased and recorded as retired."""
        if self.current in versions:
            raise ValueError("the current master key version cannot be retired")
        t = int(time.time() if now is None else now)
        keys = {v: k for v, k in self.keys.items() if v not in versions}
        retired = {**self.retired, **{v: t for v in versions}}
        return Keyring(keys, self.current, dict(self.created), retired, self.meta_key)

    def seal(self, root_key: bytes, store_id: bytes) -> bytes:
        fields = {"current": self.current, "keys": self.keys, "created": self.created, "retired": self.retired}
        if self.meta_key is not None:
            fields["meta"] = self.meta_key
        body = msgpack.packb(fields)
        nonce = os.urandom(12)
        aad = b"s3fuse/v1/keyring" + store_id
        return _PREFIX.pack(MAGIC, VERSION) + nonce + AESGCM(root_key).encrypt(nonce, body, aad)

    @classmethod
    def unseal(cls, blob: bytes, root_key: bytes, store_id: bytes) -> "Keyring":
        if len(blob) < _PREFIX.size + 12 + 16:
            raise StoreError("keyring file is truncated")
        magic, version = _PREFIX.unpack_from(blob)
        if magic != MAGIC or version != VERSION:
            raise StoreError("keyring file has an unknown format")
        nonce = blob[_PREFIX.size : _PREFIX.size + 12]
        try:
            body = AESGCM(root_key).decrypt(nonce, blob[_PREFIX.size + 12 :], b"s3fuse/v1/keyring" + store_id)
        except InvalidTag:
            raise StoreError("wrong root key: the keyring does not authenticate") from None
        data = msgpack.unpackb(body, strict_map_key=False)
        meta_key = data.get("meta")
        if meta_key is not None and (not isinstance(meta_key, bytes) or len(meta_key) != 32):
            raise StoreError("keyring file holds a malformed metadata key")
        return cls({int(k): v for k, v in data["keys"].items()}, data["current"],
                   {int(k): int(v) for k, v in data.get("created", {}).items()},
                   {int(k): int(v) for k, v in data.get("retired", {}).items()},
                   meta_key)

    def save(self, path: str, root_key: bytes, store_id: bytes) -> None:
        atomic_write(path, self.seal(root_key, store_id), mode=0o600)
