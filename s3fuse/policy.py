"""Per-directory encryption settings, in S3's vocabulary, and their xattr interface.

A directory's setting (`user.s3fuse.sse`) applies to files created below it
afterwards; the nearest ancestor with a setting wins and the store's default applies
at the top. A file records the setting it was created with and keeps it: a rename
never re-encrypts. Values:

    AES256                    SSE-S3: a data key per object, wrapped by the master key
    aws:kms                   SSE-KMS with the service-managed default key (alias/aws/s3)
    aws:kms:<key id|alias>    SSE-KMS with that KMS key
    SSE-C:<name|fingerprint>  SSE-C with that customer key (loaded with `s3fuse key add`)
"""

from __future__ import annotations

import errno
import functools
import re
from dataclasses import dataclass

import msgpack

from .errors import S3fuseError

SSE_S3 = "AES256"
SSE_KMS = "aws:kms"
SSE_C = "SSE-C"
MODES = (SSE_S3, SSE_KMS, SSE_C)

# The one writable setting, on directories and (to re-encrypt) on files.
XATTR_SSE = b"user.s3fuse.sse"
# Read-only descriptions of a regular file's actual encryption.
XATTR_MODE = b"user.s3fuse.mode"
XATTR_MASTER_VERSION = b"user.s3fuse.master-key-version"
XATTR_KMS_KEY = b"user.s3fuse.kms-key-id"
XATTR_KMS_VERSION = b"user.s3fuse.kms-key-version"
XATTR_FINGERPRINT = b"user.s3fuse.sse-c-fingerprint"
READ_ONLY = (XATTR_MODE, XATTR_MASTER_VERSION, XATTR_KMS_KEY, XATTR_KMS_VERSION, XATTR_FINGERPRINT)
RESERVED_PREFIX = b"user.s3fuse."
# the S3 API's own records (a sealed ETag): never listed, read or written through the mount
HIDDEN_PREFIX = b"user.s3fuse.s3api."
# set by `s3fuse fsck --repair` on a quarantined file: what is damaged (readable; removable by
# the owner once the file is salvaged; never set through the mount)
XATTR_DAMAGE = b"user.s3fuse.damage"
# its value on a file whose unstored data a stop had to drop (reads fail: EIO)
LOST_AT_STOP = b"lost-at-stop: "

_KEY_ID = re.compile(r"^[A-Za-z0-9/_:.-]{1,256}$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Policy:
    mode: str
    key: str = ""  # KMS key id (resolved), or the SSE-C key fingerprint
    name: str = ""  # SSE-C: the key name given when the setting was made (a hint)

    def to_xattr(self) -> bytes:
        if self.mode == SSE_S3:
            return b"AES256"
        if self.mode == SSE_KMS:
            return f"aws:kms:{self.key}".encode() if self.key else b"aws:kms"
        return f"SSE-C:{self.key}".encode()

    def encode(self) -> bytes:
        return _encode(self)

    @classmethod
    def decode(cls, blob: bytes | None) -> "Policy | None":
        if blob is None:
            return None
        return _decode(blob)


# Every file's row carries its policy, and open, create and the data path read it each time:
# a store uses a handful of distinct ones, so the (immutable) results are memoised.
@functools.lru_cache(maxsize=256)
def _encode(policy: Policy) -> bytes:
    return msgpack.packb([policy.mode, policy.key, policy.name])


@functools.lru_cache(maxsize=256)
def _decode(blob: bytes) -> Policy:
    mode, key, name = msgpack.unpackb(blob)
    return Policy(mode, key, name)


DEFAULT = Policy(SSE_S3)


def parse(value: bytes) -> tuple[str, str]:
    """Split an xattr value into (mode, key reference as given); EINVAL if malformed."""
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        raise S3fuseError("an encryption setting is ASCII", errno.EINVAL) from None
    if text == SSE_S3:
        return SSE_S3, ""
    if text == SSE_KMS:
        return SSE_KMS, ""
    if text.startswith("aws:kms:"):
        key = text[len("aws:kms:"):]
        if not _KEY_ID.match(key):
            raise S3fuseError(f"malformed KMS key id {key!r}", errno.EINVAL)
        return SSE_KMS, key
    if text.startswith("SSE-C:"):
        ref = text[len("SSE-C:"):]
        if not ref or len(ref) > 128 or any(c in ref for c in "/\0\n:"):
            raise S3fuseError(f"malformed customer key name or fingerprint {ref!r}", errno.EINVAL)
        return SSE_C, ref
    raise S3fuseError(f"unknown encryption setting {text[:64]!r} (use AES256, aws:kms[:KEY] or SSE-C:KEY)",
                      errno.EINVAL)


def is_fingerprint(ref: str) -> bool:
    return bool(_FINGERPRINT.match(ref))
