"""Authenticated metadata: the record MACs and per-inode set digests (sans I/O).

Every metadata row that decides what a reader sees carries a MAC (keyed BLAKE2b, 32 bytes;
a MAC by RFC 7693's keyed mode, at a third of HMAC-SHA256's cost per row) under the store's
metadata key (a random key in the keyring, docs/FORMAT.md "Authenticated metadata"). Each
MAC input starts with a record tag and the row's position (inode id; inode and block number;
parent and name), so a row copied to another position fails. An inode's MAC also covers a
*set digest*: the sum mod 2^256 of the MACs of the rows it owns (a file's block rows, a
directory's entries, a symlink's target), so deleting, adding or replaying a row changes
the sum. A change updates the sum in O(1): subtract the old row's MAC, add the new one's.

A sum, not an XOR: under XOR two copies of a row cancel out, under a sum they do not; and
the rows of one position are unique in the database anyway (primary keys).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import struct

KEY_LEN = 32
MAC_LEN = 32
ZERO = bytes(MAC_LEN)  # the set digest of no rows
_MOD = 1 << 256
_Q = struct.Struct(">Q")
_INODE = struct.Struct(">QQQQQQQ")
_BLOCK = struct.Struct(">QQQQQQ")

TAG_INODE = b"s3fuse/meta/inode\x00"
TAG_BLOCK = b"s3fuse/meta/block\x00"
TAG_ENTRY = b"s3fuse/meta/entry\x00"
TAG_SYMLINK = b"s3fuse/meta/symlink\x00"
TAG_CONFIG = b"s3fuse/meta/config\x00"
# store.json's settings that decide where keys come from and what new files get
# ("format" is not among them: the keyring, not store.json, says whether a store is upgraded)
CONFIG_FIELDS = ("store_id", "block_size", "segment_size", "default_sse", "kms")
CONFIG_MAC = "meta_mac"  # the store.json field that holds their MAC


# what a MAC function gives for a row whose values have the wrong types (an edit stored text
# where a number or bytes belong): it matches no stored MAC
BAD = b""


def _checked(fn):
    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except (TypeError, ValueError, OverflowError, AttributeError, struct.error):
            return BAD

    return wrapper


def _bytes(b: bytes | None) -> bytes:
    """Length-prefixed, with NULL apart from the empty string."""
    if b is None:
        return b"\xff" * 8
    if not isinstance(b, bytes | bytearray | memoryview):
        raise TypeError("not bytes")
    return _Q.pack(len(b)) + bytes(b)


def _mac(key: bytes, msg: bytes) -> bytes:
    return hashlib.blake2b(msg, key=key, digest_size=MAC_LEN).digest()


@_checked
def inode_mac(key: bytes, ino: int, mode: int, uid: int, gid: int, nlink: int, size: int, rdev: int,
              sse: bytes | None, digest: bytes) -> bytes:
    """Times and stored_bytes (st_blocks) are left out: they change no content."""
    return _mac(key, TAG_INODE + _INODE.pack(ino, mode, uid, gid, nlink, size, rdev) + _bytes(sse)
                + bytes(digest))


@_checked
def block_mac(key: bytes, ino: int, blockno: int, object_id: bytes, length: int, obj_length: int,
              hdr_len: int, mode: str, key_ref: str, key_version: int, key_slot: bytes) -> bytes:
    return _mac(key, TAG_BLOCK + _BLOCK.pack(ino, blockno, length, obj_length, hdr_len, key_version)
                + _bytes(object_id) + _bytes(mode.encode()) + _bytes(key_ref.encode()) + _bytes(key_slot))


@_checked
def entry_mac(key: bytes, parent: int, name: bytes, ino: int) -> bytes:
    return _mac(key, TAG_ENTRY + _Q.pack(parent) + _Q.pack(ino) + _bytes(name))


@_checked
def symlink_mac(key: bytes, ino: int, target: bytes) -> bytes:
    return _mac(key, TAG_SYMLINK + _Q.pack(ino) + _bytes(target))


def config_mac(key: bytes, raw: dict) -> str:
    """Hex MAC of store.json's authenticated settings (canonical JSON; absent = null)."""
    subset = {name: raw.get(name) for name in CONFIG_FIELDS}
    text = json.dumps(subset, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return _mac(key, TAG_CONFIG + text.encode()).hex()


def check_config(key: bytes, raw: dict) -> bool:
    mac = raw.get(CONFIG_MAC)
    return isinstance(mac, str) and hmac.compare_digest(mac, config_mac(key, raw))


def add(digest: bytes, mac: bytes) -> bytes:
    return ((int.from_bytes(digest, "big") + int.from_bytes(mac, "big")) % _MOD).to_bytes(MAC_LEN, "big")


def sub(digest: bytes, mac: bytes) -> bytes:
    return ((int.from_bytes(digest, "big") - int.from_bytes(mac, "big")) % _MOD).to_bytes(MAC_LEN, "big")


def digest_of(macs) -> bytes:
    """The set digest of rows with these MACs."""
    return (sum(int.from_bytes(m, "big") for m in macs) % _MOD).to_bytes(MAC_LEN, "big")


def same(a: bytes | None, b: bytes) -> bool:
    """Constant-time equality of a stored MAC (possibly NULL or mistyped) and the right one."""
    return (len(b) == MAC_LEN and isinstance(a, bytes | bytearray | memoryview)
            and hmac.compare_digest(bytes(a), b))
