"""ETags: S3's values, with no plaintext digest stored in the clear.

- A PUT through the API records its ETag (the plaintext MD5 for SSE-S3, an HMAC of it for
  SSE-KMS and SSE-C, `<md5 of part md5s>-N` for multipart) sealed in a hidden xattr of
  the file (`user.s3fuse.s3api.etag`), bound to the inode, size and object ids of the
  file's blocks as committed: any later change of content makes new objects, the record
  no longer opens, and the file falls back to the derived value below.
- Any other file (written through the mount) has `<32 hex>-1`: an HMAC of its inode, size,
  mtime and object ids under the store's ETag key. It changes whenever the content does;
  like a multipart ETag it is not an MD5, so clients that check MD5s (rclone) skip it.

Record: nonce (12) | AES-256-GCM(etag key, nonce, etag text, AAD), AAD = "s3fuse/v1/s3etag"
| store_id | u64be inode | sha256(u64be size | object ids in block order).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

XATTR = b"user.s3fuse.s3api.etag"
AAD = b"s3fuse/v1/s3etag"


def _binding(size: int, object_ids: list[bytes]) -> bytes:
    return hashlib.sha256(struct.pack(">Q", size) + b"".join(object_ids)).digest()


def seal(key: bytes, store_id: bytes, ino: int, size: int, object_ids: list[bytes], etag: str,
         nonce: bytes | None = None) -> bytes:
    nonce = nonce or os.urandom(12)
    aad = AAD + store_id + struct.pack(">Q", ino) + _binding(size, object_ids)
    return nonce + AESGCM(key).encrypt(nonce, etag.encode(), aad)


def unseal(key: bytes, store_id: bytes, ino: int, size: int, object_ids: list[bytes],
           record: bytes) -> str | None:
    aad = AAD + store_id + struct.pack(">Q", ino) + _binding(size, object_ids)
    try:
        return AESGCM(key).decrypt(record[:12], record[12:], aad).decode()
    except (InvalidTag, ValueError, UnicodeDecodeError):
        return None


def derived(key: bytes, ino: int, size: int, mtime_ns: int, object_ids: list[bytes]) -> str:
    msg = b"s3fuse/v1/etag" + struct.pack(">QQq", ino, size, mtime_ns) + b"".join(object_ids)
    return hmac.new(key, msg, hashlib.sha256).hexdigest()[:32] + "-1"


def opaque(key: bytes, md5_hex: str) -> str:
    """The ETag of an SSE-KMS or SSE-C object: 32 hex digits that are not its MD5."""
    return hmac.new(key, b"s3fuse/v1/etag-opaque" + md5_hex.encode(), hashlib.sha256).hexdigest()[:32]


def multipart(part_md5s: list[bytes]) -> str:
    return f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"
