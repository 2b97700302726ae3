"""The SSE-S3 master keyring: numbered 256-bit master keys sealed by the root key.

File layout (docs/FORMAT.md, "Keyring")::

    magic "S3FK" | u8 version | nonce (12) | AES-256-GCM(root key, msgpack body)
    AAD = "s3fuse/v1/keyring" | store_id

The keyring is rewritten atomically (temporary file, fsync, rename, fsync of the
directory), so a crash leaves either the old or the new keyring.
"""

from __future__ import annotations

import os
import struct

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

    def __init__(self, keys: dict[int, bytes], current: int) -> None:
        self.keys = keys
        self.current = current

    @classmethod
    def new(cls) -> "Keyring":
        return cls({1: os.urandom(32)}, 1)

    def key(self, version: int) -> bytes:
        try:
            return self.keys[version]
        except KeyError:
            raise KeyError(f"master key version {version} is not in the keyring") from None

    def seal(self, root_key: bytes, store_id: bytes) -> bytes:
        body = msgpack.packb({"current": self.current, "keys": self.keys})
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
        return cls({int(k): v for k, v in data["keys"].items()}, data["current"])

    def save(self, path: str, root_key: bytes, store_id: bytes) -> None:
        atomic_write(path, self.seal(root_key, store_id), mode=0o600)
